"""Splitting the sampling inferer's output into the maps a user gets."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["SplitSamplingOutputd"]


class SplitSamplingOutputd(MapTransform):
    """Split the sampling inferer's output into the final mask, the mean, the uncertainty maps and the samples.

    The inferer returns one tensor per case ``(3 + N, H, W, D)``: channels ``[mean probability, entropy of the mean,
    variance, N binary samples ...]``. Each output keeps the input's MetaTensor metadata (affine, file name) and
    transform trace, so ``Invertd(keys=[...], orig_keys="image")`` maps each back through
    ``Orientationd``/``Spacingd`` and ``SaveImaged`` writes each in the input's geometry (invert ``pred`` and
    ``samples`` with ``nearest_interp=True``, the continuous maps with ``False``).

    Args:
        key: key of the inferer's output; it is replaced by the final mask.
        num_samples: the expected ``N``; ``None`` accepts any ``N >= 0``.
        threshold: the final mask is ``mean > threshold``.
        mean_key: output key of the mean probability ``(1, H, W, D)``.
        uncertainty_key: output key of the entropy of the mean ``(1, H, W, D)``.
        variance_key: output key of the variance ``(1, H, W, D)``.
        samples_key: output key of the samples ``(N, H, W, D)``.

    Returns:
        (from ``__call__``) the dict with ``pred`` ``(1, H, W, D)`` (0/1, the mean's dtype), ``mean``,
        ``uncertainty``, ``variance`` and ``samples``.

    Raises:
        ValueError: when the output has fewer than 3 channels or not ``3 + num_samples``.
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
    ) -> None:
        super().__init__(key)
        self.key = key
        self.num_samples = None if num_samples is None else int(num_samples)
        self.threshold = float(threshold)
        self.mean_key = mean_key
        self.uncertainty_key = uncertainty_key
        self.variance_key = variance_key
        self.samples_key = samples_key

    @staticmethod
    def _part(x: Any, start: int, stop: int) -> Any:
        if isinstance(x, MetaTensor):
            return MetaTensor(
                x.as_tensor()[start:stop].clone(),
                meta=deepcopy(x.meta),
                applied_operations=deepcopy(x.applied_operations),
            )
        return x[start:stop].clone() if torch.is_tensor(x) else np.array(x[start:stop])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        out = d[self.key]
        channels = int(out.shape[0])
        if channels < 3:
            raise ValueError(
                f"'{self.key}' has {channels} channels; expected 3 + N (mean, entropy, variance, samples)."
            )
        if self.num_samples is not None and channels != 3 + self.num_samples:
            raise ValueError(f"'{self.key}' has {channels} channels; expected 3 + {self.num_samples} samples.")
        mean = self._part(out, 0, 1)
        pred = self._part(out, 0, 1)
        if torch.is_tensor(pred):
            pred.copy_((mean > self.threshold).to(pred.dtype))
        else:
            pred = (mean > self.threshold).astype(mean.dtype)
        d[self.mean_key] = mean
        d[self.uncertainty_key] = self._part(out, 1, 2)
        d[self.variance_key] = self._part(out, 2, 3)
        d[self.samples_key] = self._part(out, 3, channels)
        d[self.key] = pred
        return d
