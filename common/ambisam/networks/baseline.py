"""The deterministic baseline: SAM's single box-prompted mask; every "sample" is the same mask."""

from __future__ import annotations

import torch

from ambisam.networks.base import MaskSamplingNetwork

__all__ = ["BoxPromptedSam"]


class BoxPromptedSam(MaskSamplingNetwork):
    """Plain box-prompted SAM, the baseline every method is compared with under the same prompt.

    Args: as :class:`~ambisam.networks.base.MaskSamplingNetwork`.
    """

    def sample_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, num_samples: int) -> torch.Tensor:
        """SAM's single-mask output, decoded once and repeated ``num_samples`` times.

        Args:
            embeddings: ``(B, C, h, w)``.
            boxes: ``(B, 4)`` in backbone input coordinates.
            num_samples: ``N``.

        Returns:
            ``(B, N, 4h, 4w)`` logits, identical along ``N``.

        Raises:
            ValueError: when ``boxes`` is ``None``.
        """
        if boxes is None:
            raise ValueError("BoxPromptedSam needs a box prompt")
        logits, _ = self.backbone.decode_boxes(embeddings, boxes)
        return logits.expand(-1, num_samples, -1, -1)
