"""The interface every method network implements, so that one sampling inferer serves them all.

A method is an ``nn.Module`` holding a :class:`~ambisam.sam.SamBackbone` as ``backbone`` and one sampling
method, :meth:`MaskSamplingNetwork.sample_logits`: N mask samples from image embeddings that were computed
once. ``forward`` in eval mode returns one tensor ``(B, 1, H, W)`` (a single, representative prediction), so
MONAI's ``verify_net_in_out``, ``ckpt_export`` and MONAI Label work with the network alone; samples and
uncertainty come from :class:`~ambisam.inferers.SlicewiseSamplingInferer`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ambisam.sam import DEFAULT_BACKBONE, SamBackbone, build_backbone

__all__ = ["MaskSamplingNetwork"]


class MaskSamplingNetwork(nn.Module):
    """Base class of the method networks.

    Args:
        backbone: a built backbone, or a registry name (``"litemedsam"``, ``"vit_b"``, ...).
        checkpoint: backbone weights for a registry name that needs them.
        freeze_encoder: freeze the image encoder (every method here but P2SAM's LoRA stage keeps it frozen,
            and trains from cached embeddings).

    Attributes:
        needs_box: whether the method takes a box prompt (the inferer then skips slices without one).
    """

    needs_box: bool = True

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, checkpoint) if isinstance(backbone, str) else backbone
        if freeze_encoder:
            self.backbone.image_encoder.requires_grad_(False)

    def sample_logits(
        self, embeddings: torch.Tensor, boxes: torch.Tensor | None, num_samples: int
    ) -> torch.Tensor:
        """Draw ``num_samples`` masks per image from precomputed embeddings.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings from ``backbone.encode``.
            boxes: ``(B, 4)`` boxes in backbone input coordinates, or ``None`` for prompt-free methods.
            num_samples: ``N``.

        Returns:
            ``(B, N, 4h, 4w)`` low-resolution mask logits.
        """
        raise NotImplementedError

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """One representative prediction per image.

        Args:
            images: ``(B, 1|3, H, W)`` in ``[0, 1]``.
            boxes: ``(B, 4)`` pixel boxes ``[x_min, y_min, x_max, y_max]``, or ``None`` for prompt-free methods.

        Returns:
            ``(B, 1, H, W)`` logits.
        """
        size = tuple(images.shape[-2:])
        embeddings = self.backbone.encode(images)
        boxes = None if boxes is None else self.backbone.boxes_to_input(boxes, size)
        return self.backbone.postprocess(self.sample_logits(embeddings, boxes, 1), size)
