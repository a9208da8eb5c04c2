"""The deterministic baseline: SAM's single box-prompted mask; every "sample" is the same mask."""

from __future__ import annotations

import torch

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities

__all__ = ["BoxPromptedSam"]


class BoxPromptedSam(MaskSamplingNetwork):
    """Plain box-prompted SAM, the baseline every method is compared with under the same prompt.

    Args: as :class:`~ambisam.networks.base.MaskSamplingNetwork`.
    """

    capabilities = MethodCapabilities(training_target=None, stochastic=False)

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """SAM's single-mask output for ``conditions.boxes``, decoded once: ``(B, N, 4h, 4w)``, identical along N."""
        logits, _ = self.backbone.decode_boxes(embeddings, conditions.boxes)
        return logits.expand(-1, num_samples, -1, -1)
