"""Training losses shared by the methods.

- :class:`LatentSegmentationLoss`: the conditional-VAE objective of latent-variable methods (pSAM and others):
  BCE + soft Dice of the posterior-sample prediction against the chosen rater, plus ``beta`` times the KL
  divergence between posterior and prior.

Every loss here takes the ``dict`` a method's ``training_outputs`` returns and keeps its last components in
``last_components`` (detached scalars), so a trainer can log them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["LatentSegmentationLoss"]


class LatentSegmentationLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * Dice + beta * mean(KL)``.

    The logits are compared with the target at the **target's** size: low-resolution logits (``4h x 4w``,
    256 x 256 for LiteMedSAM) are upsampled bilinearly to the target's ``H x W`` (``align_corners=False``), as
    the reference code does and as :meth:`~ambisam.sam.SamBackbone.postprocess` does at inference, so the loss
    is taken where the masks are drawn and a thin structure in the target is never averaged away.

    The Dice term is MONAI's :class:`~monai.losses.DiceLoss` with ``sigmoid=True``; with ``dice_batch=True``
    (the default, as the reference code pools its soft Dice over the batch) the intersection and the sums are
    taken over the whole batch, so an empty rater mask in the batch still gets a useful Dice gradient from its
    false positives rather than a constant loss of 1. The BCE term is the mean over pixels of
    ``binary_cross_entropy_with_logits``.

    Args:
        beta: weight of the KL term (10 for pSAM).
        bce_weight: weight of the BCE term.
        dice_weight: weight of the soft Dice term.
        dice_batch: pool the Dice over the batch (``True``) or average per-image Dice values (``False``).

    Attributes:
        last_components: after each call, detached scalars ``bce``, ``dice``, ``kl`` (the batch mean, before
            ``beta``), ``kl_weighted`` (``beta * kl``) and ``total``.

    Raises:
        ValueError: on a negative weight.
    """

    def __init__(
        self, beta: float = 10.0, bce_weight: float = 1.0, dice_weight: float = 1.0, *, dice_batch: bool = True
    ) -> None:
        super().__init__()
        if min(beta, bce_weight, dice_weight) < 0:
            raise ValueError(f"weights must be non-negative, got beta={beta}, bce={bce_weight}, dice={dice_weight}")
        self.beta = float(beta)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(sigmoid=True, batch=dice_batch)
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The loss of one training step.

        Args:
            outputs: a method's ``training_outputs``: ``"logits" (B, 1, h, w)`` and, for latent-variable
                methods, ``"kl"`` (any shape, e.g. ``(B,)``; its mean is taken). Without ``"kl"`` the KL term
                is 0.
            target: ``(B, 1, H, W)`` the rater mask the prediction is compared with, values in ``[0, 1]``.

        Returns:
            the scalar loss.

        Raises:
            ValueError: when ``outputs`` has no ``"logits"``, or logits and target differ in batch or channels.
        """
        if "logits" not in outputs:
            raise ValueError(f"outputs must hold 'logits', got keys {sorted(outputs)}")
        logits = outputs["logits"]
        if logits.ndim != target.ndim or logits.shape[:2] != target.shape[:2]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must agree in batch and channels"
            )
        target = target.to(logits.dtype)
        if logits.shape[2:] != target.shape[2:]:
            mode = "bilinear" if logits.ndim == 4 else "trilinear"
            logits = F.interpolate(logits, size=tuple(target.shape[2:]), mode=mode, align_corners=False)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = self.dice(logits, target)
        kl = outputs["kl"].mean() if "kl" in outputs else logits.new_zeros(())
        total = self.bce_weight * bce + self.dice_weight * dice + self.beta * kl
        self.last_components = {
            "bce": bce.detach(),
            "dice": dice.detach(),
            "kl": kl.detach(),
            "kl_weighted": (self.beta * kl).detach(),
            "total": total.detach(),
        }
        return total

    def components(self) -> dict[str, float]:
        """The last call's components as Python floats (for logging); empty before the first call."""
        return {name: float(value) for name, value in self.last_components.items()}


# ----------------------------------------------------------------------------------------------------------------
# Set losses (reserved)
#
# Losses that compare a SET of M predictions with the K rater masks of an image (Hungarian matching on a
# Dice-loss matrix, chunking when M > K, empty raters masked out; SeqSAM) go in this section. They take the same
# ``outputs`` dict (``"logits" (B, M, h, w)``), a ``(B, K, H, W)`` target and a rater-validity mask, keep
# ``last_components`` like the loss above, and are added to ``__all__``.
# ----------------------------------------------------------------------------------------------------------------
