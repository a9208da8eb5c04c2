"""The multiple-choice-learning (MCL) baseline SeqSAM is compared with: SAM's three multimask heads, trained
winner-takes-all against the raters, each head one hypothesis."""

from __future__ import annotations

import torch
from torch import nn

from ambisam.networks.baseline import BoxPromptedSam

__all__ = ["MultipleChoiceSam"]


class MultipleChoiceSam(BoxPromptedSam):
    """Box-prompted SAM whose multimask outputs (3 heads) are the hypotheses.

    Trained with :class:`~ambisam.losses.WinnerTakesAllLoss` (each rater's mask trains only the head closest to
    it); the image encoder is frozen, the prompt encoder and the mask decoder are trained. At inference the
    heads are the samples: ``N`` samples cycle through them (head 1, 2, 3, 1, ...), so ``N`` a multiple of 3
    weighs the heads equally; the number of distinct masks never exceeds 3 (the limitation SeqSAM addresses).

    Args: as :class:`~ambisam.networks.baseline.BoxPromptedSam`.
    """

    training_target = "label"

    def heads(self, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """SAM's multimask logits.

        Args:
            embeddings: ``(B, C, h, w)``.
            boxes: ``(B, 4)`` in backbone input coordinates.

        Returns:
            ``(B, 3, 4h, 4w)`` logits, one channel per head.

        Raises:
            ValueError: when ``boxes`` is ``None``.
        """
        if boxes is None:
            raise ValueError("MultipleChoiceSam needs a box prompt")
        logits, _ = self.backbone.decode_boxes(embeddings, boxes, multimask=True)
        return logits

    def sample_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, num_samples: int) -> torch.Tensor:
        """``num_samples`` masks cycling through the heads.

        Args:
            embeddings: ``(B, C, h, w)``.
            boxes: ``(B, 4)`` in backbone input coordinates.
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, 4h, 4w)`` logits; sample ``i`` is head ``i mod 3``.

        Raises:
            ValueError: when ``boxes`` is ``None`` or ``num_samples < 1``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        logits = self.heads(embeddings, boxes)
        order = torch.arange(num_samples, device=logits.device) % logits.shape[1]
        return logits.index_select(1, order)

    def default_loss(self) -> nn.Module:
        """Winner-takes-all Dice over the heads."""
        from ambisam.losses import WinnerTakesAllLoss

        return WinnerTakesAllLoss()

    def training_outputs(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every head's logits for the winner-takes-all loss.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            boxes: ``(B, 4)`` in backbone input coordinates.
            targets: ``(B, K, S, S)`` every rater's mask (not read: the loss compares).

        Returns:
            ``{"logits": (B, 3, 4h, 4w)}``.
        """
        return {"logits": self.heads(embeddings, boxes)}
