"""The multiple-choice-learning (MCL) baseline SeqSAM is compared with: SAM's three multimask heads, trained
winner-takes-all against the raters, each head one hypothesis."""

from __future__ import annotations

import torch

from ambisam.networks.base import Conditions, MethodCapabilities
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

    capabilities = MethodCapabilities(training_target="raters", stochastic=False)

    def heads(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """SAM's multimask logits ``(B, 3, 4h, 4w)``, one channel per head, for ``boxes (B, 4)``."""
        logits, _ = self.backbone.decode_boxes(embeddings, boxes, multimask=True)
        return logits

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``num_samples`` masks cycling through the heads: ``(B, N, 4h, 4w)``, sample ``i`` is head ``i mod 3``."""
        logits = self.heads(embeddings, conditions.boxes)
        order = torch.arange(num_samples, device=logits.device) % logits.shape[1]
        return logits.index_select(1, order)

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every head's logits for the winner-takes-all loss: ``{"logits": (B, 3, 4h, 4w)}`` (``targets``, every
        rater's ``(B, K, S, S)``, are compared by the loss)."""
        return {"logits": self.heads(embeddings, conditions.boxes)}
