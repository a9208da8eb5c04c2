"""A thin stateful predictor over :class:`SamBackbone` (like segment-anything's ``SamPredictor``): set an image
once, then ask for masks from as many boxes as you like; and :func:`segment_with_box`, the deterministic
box-prompted baseline in one call."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ambisam.errors import InputError
from ambisam.sam.backbone import SamBackbone
from ambisam.sam.build import DEFAULT_BACKBONE, build_backbone
from ambisam.sam.precision import check_precision

__all__ = ["BoxPredictor", "segment_with_box", "scale_to_unit"]


def scale_to_unit(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Min-max scale intensities to ``[0, 1]`` (a constant image becomes all zeros).

    Args:
        image: any array.

    Returns:
        A float32 tensor of the same shape.
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


class BoxPredictor:
    """Encode one 2D image once, then segment it from any number of boxes.

    Args:
        backbone: the backbone to use.
    """

    def __init__(self, backbone: SamBackbone) -> None:
        self.backbone = backbone
        self.embedding: torch.Tensor | None = None
        self.image_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray | torch.Tensor, scaled: bool = False) -> None:
        """Encode ``image`` and keep its embedding.

        Args:
            image: ``(H, W)`` grey or ``(C, H, W)`` with C in {1, 3}.
            scaled: the intensities are already in ``[0, 1]``; otherwise they are min-max scaled.

        Raises:
            ValueError: when the image is not 2D (with an optional channel axis) or holds NaN.
        """
        x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected a (H, W) or (1|3, H, W) image, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the image holds NaN or infinite intensities")
        if not scaled:
            x = scale_to_unit(x)
        device = next(self.backbone.parameters()).device
        self.embedding = self.backbone.encode(x[None].to(device))
        self.image_size = tuple(x.shape[-2:])

    @torch.no_grad()
    def predict(self, boxes: np.ndarray | torch.Tensor | list, multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits at the image's size for one or more boxes.

        Args:
            boxes: ``(4,)`` or ``(P, 4)`` ``[x_min, y_min, x_max, y_max]`` in image pixels (x = column).
            multimask: return the decoder's multimask outputs (``backbone.num_multimask_outputs``, SAM: 3).

        Returns:
            ``logits (P, M, H, W)`` and ``iou (P, M)``.

        Raises:
            RuntimeError: when no image was set.
            ValueError: when a box lies outside the image or has min > max.
        """
        if self.embedding is None:
            raise RuntimeError("call set_image() before predict()")
        h, w = self.image_size
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        if (b[:, 0] > b[:, 2]).any() or (b[:, 1] > b[:, 3]).any():
            raise ValueError(f"box min exceeds max: {b.tolist()}")
        if (b < 0).any() or (b[:, [0, 2]] > w - 1).any() or (b[:, [1, 3]] > h - 1).any():
            raise ValueError(f"box {b.tolist()} lies outside the {h}x{w} image")
        b = self.backbone.boxes_to_input(b.to(self.embedding.device), (h, w))
        logits, iou = self.backbone.decode_boxes(self.embedding, b, multimask=multimask)
        return self.backbone.postprocess(logits, (h, w)), iou


@functools.lru_cache(maxsize=4)
def _cached_backbone(name: str, checkpoint: str | None, precision: str = "fp32") -> SamBackbone:
    return build_backbone(name, checkpoint, precision=precision)


def segment_with_box(
    image_2d: np.ndarray | torch.Tensor,
    box_xyxy: np.ndarray | list | tuple,
    backbone: str | SamBackbone = DEFAULT_BACKBONE,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """The deterministic baseline: SAM's single mask for one box.

    Args:
        image_2d: ``(H, W)`` image, any intensity range (min-max scaled to ``[0, 1]``).
        box_xyxy: ``[x_min, y_min, x_max, y_max]`` in pixels, x along columns, inclusive.
        backbone: a registry name (built once and kept) or a built backbone.
        checkpoint: weights for a registry name that needs them.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` for a registry name (a built backbone keeps its own).

    Returns:
        ``(H, W)`` boolean mask.

    Raises:
        InputError: an unknown backbone or precision, or a missing checkpoint.
        ValueError: a box outside the image, or a non-2D image.
    """
    image = np.asarray(image_2d)
    if image.ndim != 2:
        raise ValueError(f"segment_with_box takes a 2D image, got shape {image.shape}")
    if isinstance(backbone, str):
        checkpoint = None if checkpoint is None else str(checkpoint)
        backbone = _cached_backbone(backbone, checkpoint, check_precision(precision))
    predictor = BoxPredictor(backbone)
    predictor.set_image(image)
    logits, _ = predictor.predict(box_xyxy)
    return (logits[0, 0] > 0).cpu().numpy()
