"""Splitting the sampling inferer's output into the maps a user gets."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["SplitSamplingOutputd"]


class SplitSamplingOutputd(MapTransform):
    """Split the sampling inferer's output into the final mask, the mean, the uncertainty maps and the samples.

    The inferer returns one tensor per case ``(S * (3 + N), H, W, D)`` in the layout of
    :mod:`ambisam.inferers.layout` (one structure: ``[mean probability, entropy of the mean, variance, N binary
    samples ...]``), which also does the split. Each output keeps the input's MetaTensor metadata (affine, file name) and
    transform trace, so ``Invertd(keys=[...], orig_keys="image")`` maps each back through
    ``Orientationd``/``Spacingd`` and ``SaveImaged`` writes each in the input's geometry (invert ``pred`` and
    ``samples`` with ``nearest_interp=True``, the continuous maps with ``False``).

    The inferer's output may also be a region (:mod:`ambisam.inferers.region`: the slab of sampled slices, the
    inference bundles' ``region_output``). Each output is then a region of the same slab, ``pred`` and
    ``samples`` as ``uint8`` (0/1) and the maps in float32, so that nothing of the volume's size is built: the
    writers (:func:`ambisam.outputs.write_case_outputs`) stream the files from it. With ``dense=True`` each output
    is built as the full volume instead, exactly as from the dense output (float32, with the metadata), for what
    needs whole tensors, e.g. ``Invertd`` when the pre-processing resamples: that costs the dense output's memory
    again (a 512 x 512 x 300 CT with N = 16: 5.6 GiB), only there.

    Args:
        key: key of the inferer's output; it is replaced by the final mask.
        num_samples: the expected ``N``; ``None`` accepts any ``N >= 0``.
        threshold: the final mask is ``mean > threshold``.
        mean_key: output key of the mean probability ``(S, H, W, D)``.
        uncertainty_key: output key of the entropy of the mean ``(S, H, W, D)``.
        variance_key: output key of the variance ``(S, H, W, D)``.
        samples_key: output key of the samples ``(S * N, H, W, D)``.
        probabilities: the output also holds each sample's probability map (the inferer's ``keep_probabilities``).
        probabilities_key: output key of those maps ``(S * N, H, W, D)`` (only with ``probabilities``).
        dense: from a region output, build every output as the full volume (see above); no effect on a dense one.

    Returns:
        (from ``__call__``) the dict with ``pred`` ``(S, H, W, D)`` (0/1, the mean's dtype), ``mean``,
        ``uncertainty``, ``variance`` and ``samples``, and ``probabilities`` with ``probabilities=True``; from a
        region output (without ``dense``) each of them a region ``{"values": (S, H, W, d) ..., "start", "shape"}``
        with ``pred`` and ``samples`` in ``uint8``.

    Raises:
        ValueError: when the channels are not ``S * (3 + num_samples)`` (``S * (3 + 2 num_samples)``).
    """

    def __init__(
        self,
        key: str = "pred",
        num_samples: int | None = None,
        threshold: float = 0.5,
        mean_key: str = "mean",
        uncertainty_key: str = "uncertainty",
        variance_key: str = "variance",
        samples_key: str = "samples",
        probabilities: bool = False,
        probabilities_key: str = "probabilities",
        dense: bool = False,
    ) -> None:
        super().__init__(key)
        self.key = key
        self.num_samples = None if num_samples is None else int(num_samples)
        self.threshold = float(threshold)
        self.mean_key = mean_key
        self.uncertainty_key = uncertainty_key
        self.variance_key = variance_key
        self.samples_key = samples_key
        self.probabilities = bool(probabilities)
        self.probabilities_key = probabilities_key
        self.dense = bool(dense)

    @staticmethod
    def _like(x: Any, values: torch.Tensor, copy: bool = True) -> Any:
        """``values`` (copied unless ``copy`` is false: already new memory) with ``x``'s MetaTensor metadata and
        transform trace (or as ``x``'s array type)."""
        values = values.clone() if copy else values
        if isinstance(x, MetaTensor):
            return MetaTensor(values, meta=deepcopy(x.meta), applied_operations=deepcopy(x.applied_operations))
        return values if torch.is_tensor(x) else values.numpy()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ambisam.inferers.layout import split_sampling_output
        from ambisam.inferers.region import dense, is_region, region_like

        d = dict(data)
        out = d[self.key]
        region = is_region(out)
        source = out["values"] if region else out
        values = source.as_tensor() if isinstance(source, MetaTensor) else torch.as_tensor(source)
        try:
            maps = split_sampling_output(values, self.threshold, self.num_samples, self.probabilities)
        except ValueError as e:
            raise ValueError(f"'{self.key}': {e}") from None
        keys = {"pred": self.key, "mean": self.mean_key, "uncertainty": self.uncertainty_key,
                "variance": self.variance_key, "samples": self.samples_key, "probabilities": self.probabilities_key}
        for name, value in maps.items():
            if not region:
                d[keys[name]] = self._like(out, value)
            elif self.dense:  # the full volume, as the dense output gives it
                d[keys[name]] = self._like(source, dense(region_like(out, value)), copy=False)
            else:
                masks = name in ("pred", "samples")
                value = value.to(torch.uint8) if masks else value.clone()
                d[keys[name]] = region_like(out, self._like(source, value, copy=False))
        return d
