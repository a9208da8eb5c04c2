"""UR-SAM's uncertainty rectification as a post-processing step of the sampling inferer's split output, and the
multi-label volume of several structures."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import MapTransform

from ambisam.data.conventions import check_class_map
from ambisam.data.transforms._utils import _as_tensor

__all__ = ["RectifyByUncertaintyd", "multi_label_volume"]


def multi_label_volume(masks: torch.Tensor, probability: torch.Tensor, values: list[int]) -> torch.Tensor:
    """One label volume from per-structure masks: each voxel takes the value of the structure whose mask holds it,
    the most probable one where several do.

    Args:
        masks: ``(S, *spatial)`` bool.
        probability: ``(S, *spatial)`` each structure's probability (breaks ties between overlapping masks).
        values: the ``S`` label values.

    Returns:
        ``(1, *spatial)`` uint8 (0 background).
    """
    if masks.shape[0] == 0:
        return torch.zeros((1, *masks.shape[1:]), dtype=torch.uint8)
    score = torch.where(masks, probability.float(), torch.full_like(probability, -1.0, dtype=torch.float32))
    best = score.argmax(dim=0)
    label = torch.as_tensor(values, dtype=torch.uint8)[best]
    return torch.where(masks.any(dim=0), label, torch.zeros_like(label))[None]


class RectifyByUncertaintyd(MapTransform):
    """Apply one strategy of UR-SAM's Tables 3-4 (:func:`ambisam.networks.ursam.correct`) to every
    prompted slice of every structure, and build the multi-label volume.

    Reads what :class:`~ambisam.data.SplitSamplingOutputd` wrote (``mean``, the ensemble probability ``y_hat``:
    dense ``(S, H, W, D)`` or a region of the sampled slab), the image ``(1, H, W, D)`` in the intensities the
    network saw, and the per-slice boxes ``(S, D, 4)``. Slices without a box stay background for that structure.

    Args:
        class_map: ``{structure: label value}`` (the label volume's values).
        strategy: one of :data:`ambisam.networks.ursam.STRATEGIES` (``"ursam"``: the rectification).
        alpha_h: the rectification's upper bound factor.
        threshold: a fixed uncertainty threshold in bits; ``None``: eq. 4's class-specific one.
        pred_key: replaced by the strategy's mask ``(S, ...)`` (0/1, ``uint8`` in a region as the split writes it).
        mean_key, image_key, box_key, structures_key: the inputs.
        uncertain_key: output of the high-uncertainty masks ``M_unc`` ``(S, ...)``.
        labels_key: output of the multi-label volume ``(1, ...)``.

    Raises:
        ValueError: an unknown strategy.
    """

    def __init__(self, class_map: Mapping[str, int], strategy: str = "ursam", alpha_h: float = 1.5,
                 threshold: float | None = None, pred_key: str = "pred", mean_key: str = "mean",
                 image_key: str = "image", box_key: str = "box", structures_key: str = "structures",
                 uncertain_key: str = "uncertain", labels_key: str = "labels") -> None:
        from ambisam.networks.ursam import STRATEGIES

        super().__init__(pred_key)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.class_map = check_class_map(class_map)
        self.strategy, self.alpha_h, self.threshold = strategy, float(alpha_h), threshold
        self.pred_key, self.mean_key, self.image_key = pred_key, mean_key, image_key
        self.box_key, self.structures_key = box_key, structures_key
        self.uncertain_key, self.labels_key = uncertain_key, labels_key

    def strategy_masks(self, probability: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, k0: int,
                       strategy: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The strategy's masks and ``M_unc`` on a slab.

        Args:
            probability: ``(S, H, W, d)`` the ensemble probability of slices ``k0 .. k0 + d - 1``.
            image: ``(H, W, D)`` the whole volume's intensities.
            boxes: ``(S, D, 4)`` per-slice boxes (``-1`` rows: no prompt).
            k0: the slab's first slice.
            strategy: ``None``: this transform's.

        Returns:
            ``(S, H, W, d)`` bool masks and ``(S, H, W, d)`` bool ``M_unc``.
        """
        from ambisam.networks.ursam import correct

        s, h, w, depth = probability.shape
        masks = torch.zeros(probability.shape, dtype=torch.bool)
        unsure = torch.zeros_like(masks)
        units = [(t, k) for t in range(s) for k in range(depth) if bool((boxes[t, k0 + k] >= 0).all())]
        if units:
            ts, ks = torch.tensor(units).T
            out = correct(strategy or self.strategy, probability[ts, :, :, ks], image[:, :, ks + k0]
                                   .permute(2, 0, 1), boxes[ts, ks + k0], self.alpha_h, self.threshold)
            masks[ts, :, :, ks] = out["mask"]
            unsure[ts, :, :, ks] = out["uncertain"]
        return masks, unsure

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ambisam.inferers.region import is_region, region_like

        d = dict(data)
        mean = d[self.mean_key]
        region = is_region(mean)
        probability = _as_tensor(mean["values"] if region else mean).float()
        k0 = int(torch.as_tensor(mean["start"])[-1]) if region else 0
        image = _as_tensor(d[self.image_key])[0].float()
        boxes = torch.as_tensor(d[self.box_key]).float().reshape(probability.shape[0], -1, 4)
        masks, unsure = self.strategy_masks(probability, image, boxes, k0)
        values = [self.class_map[name] for name in d[self.structures_key]]
        labels = multi_label_volume(masks, probability, values)
        template = mean["values"] if region else mean
        for key, value in ((self.pred_key, masks), (self.uncertain_key, unsure), (self.labels_key, labels)):
            value = value.to(torch.uint8) if region else value.to(probability.dtype)
            value = _like(template, value)
            d[key] = region_like(mean, value) if region else value
        return d


def _like(template: Any, values: torch.Tensor) -> Any:
    from ambisam.data.transforms.outputs import SplitSamplingOutputd

    return SplitSamplingOutputd._like(template, values, copy=False)
