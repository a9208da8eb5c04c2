"""What the trainer, the inferer and the embedding cache use of a backbone: :class:`ImageBackbone`.

:class:`~ambisam.sam.backbone.SamBackbone` satisfies it; so can any other image backbone (e.g. a U-Net on a
grid) that encodes images once and maps boxes and logits between image pixels and its own input frame.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ImageBackbone"]


@runtime_checkable
class ImageBackbone(Protocol):
    """An image encoder with its input and output geometry.

    ``isinstance(obj, ImageBackbone)`` checks only that the members exist, not their signatures.

    Attributes:
        name: the registry name the backbone was built under; part of the embedding cache's key.
        image_size: the square input size ``S`` the encoder expects.
        image_encoder: the module whose weights determine the embeddings (the cache fingerprints it).
    """

    name: str
    image_size: int
    image_encoder: nn.Module

    @property
    def mask_size(self) -> tuple[int, int]:
        """``(h, w)`` of the low-resolution mask logits the backbone's decoder gives."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: ``(B, 1 or 3, H, W)`` intensities in ``[0, 1]``, any ``H, W``.

        Returns:
            ``(B, C, h, w)`` embeddings, the same shape for every input size.
        """
        ...

    def boxes_to_input(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Map ``[x_min, y_min, x_max, y_max]`` boxes from image pixels to the ``S x S`` input frame.

        Args:
            boxes: ``(..., 4)``, x along the image's columns.
            image_size: ``(H, W)`` of the image the boxes refer to.

        Returns:
            ``(..., 4)`` float boxes.
        """
        ...

    def postprocess(self, logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Resize low-resolution logits ``(B, M, *mask_size)`` to the image's ``(B, M, H, W)``."""
        ...
