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
    #: the batch key a training step's target comes from: one rater (``rater_mask``) or all of them (``label``)
    training_target: str = "rater_mask"

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, checkpoint) if isinstance(backbone, str) else backbone
        self.encoder_frozen = bool(freeze_encoder)
        if freeze_encoder:
            self.backbone.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> MaskSamplingNetwork:
        """Set train/eval mode; a frozen image encoder stays in eval mode (its BatchNorm statistics and cached
        attention biases must not change, and cached embeddings must stay valid)."""
        super().train(mode)
        if self.encoder_frozen:
            self.backbone.image_encoder.eval()
        return self

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

    def training_outputs(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, targets: torch.Tensor) -> dict:
        """What one training step needs from the network (the loss function reads it).

        Args:
            embeddings: ``(B, C, h, w)``.
            boxes: ``(B, 4)`` in backbone input coordinates, or ``None``.
            targets: ``(B, 1, S, S)`` one rater's mask, or ``(B, K, S, S)`` every rater's for set losses.

        Returns:
            A dict with at least ``logits``.
        """
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def default_loss(self) -> nn.Module:
        """The loss this method trains with by default (bundles name theirs in train.json; benchmarks use this)."""
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None, *args, training_outputs: bool = False):
        """One representative prediction per image; with ``training_outputs=True``, :meth:`training_outputs`
        (so that trainers go through ``forward`` and DDP synchronises gradients).

        Args:
            images: ``(B, 1|3, H, W)`` in ``[0, 1]`` (embeddings ``(B, C, h, w)`` with ``training_outputs``).
            boxes: ``(B, 4)`` pixel boxes ``[x_min, y_min, x_max, y_max]``, or ``None`` for prompt-free methods
                (backbone input coordinates with ``training_outputs``).
            args: the targets, with ``training_outputs``.
            training_outputs: dispatch to :meth:`training_outputs`.

        Returns:
            ``(B, 1, H, W)`` logits, or the training outputs dict.
        """
        if training_outputs:
            return self.training_outputs(images, boxes, *args)
        size = tuple(images.shape[-2:])
        embeddings = self.backbone.encode(images)
        boxes = None if boxes is None else self.backbone.boxes_to_input(boxes, size)
        return self.backbone.postprocess(self.sample_logits(embeddings, boxes, 1), size)
