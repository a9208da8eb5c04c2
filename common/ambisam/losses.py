"""Training losses shared by the methods.

- :class:`LatentSegmentationLoss`: the conditional-VAE objective of latent-variable methods (pSAM and others):
  BCE + soft Dice of the posterior-sample prediction against the chosen rater, plus ``beta`` times the KL
  divergence between posterior and prior.
- :class:`HungarianSetLoss`: a set of ``M`` predictions against the ``K`` raters of an image (SeqSAM): Hungarian
  matching on a Dice-loss matrix, chunking when ``M > K``, empty raters masked out.
- :class:`WinnerTakesAllLoss`: multiple choice learning (SAM's multimask heads): each rater trains the head
  closest to it.
- :class:`P2SamLoss`: P2SAM's BCE (or the reference code's cross-entropy) + Dice + focal loss of the assembled
  logit against one rater, plus an L2 term on the parameters the network names.
- :class:`ProSegLoss`: ProSeg's generalised Dice against one rater, plus the cross-entropy of its rater
  classifier, the image reconstruction MSE and the two latents' KL divergences.
- :class:`RelativeDistanceLoss`, :class:`PointEmbeddingLoss` and their sum :class:`LocaliserLoss`: UR-SAM's
  self-supervised localiser (MedLAM-style): ``MSE(r * tanh(p_a - p_b), delta)`` on two crops' latent positions,
  and an InfoNCE cross-entropy over positions that aligns the point embeddings of a crop and its augmented copy.

Every loss here takes the ``dict`` a method's ``training_outputs`` returns and keeps its last components in
``last_components`` (detached scalars), so a trainer can log them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss, GeneralizedDiceLoss
from scipy.optimize import linear_sum_assignment
from torch import nn

from ambisam.data.transforms.localiser import DISTANCE_PAIRS, EMBEDDING_PAIR, PATCH_SIZE
from ambisam.networks.localiser import RELATIVE_RANGE_MM, point_features, relative_offset_mm

__all__ = [
    "LatentSegmentationLoss",
    "HungarianSetLoss",
    "WinnerTakesAllLoss",
    "P2SamLoss",
    "ProSegLoss",
    "RelativeDistanceLoss",
    "PointEmbeddingLoss",
    "LocaliserLoss",
]


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


class HungarianSetLoss(nn.Module):
    """SeqSAM's set loss: the ``M`` predictions of an image are matched one-to-one to its ``K`` rater masks by
    the Hungarian algorithm on a Dice-loss matrix, and the matched pairs' losses are averaged.

    Per image (``outputs["logits"] (B, M, h, w)``, ``target (B, K, H, W)``):

    1. :meth:`select` (paper Fig. 1C): when ``M > K`` the predictions, in step order, are split into ``K``
       consecutive groups of near-equal size (``torch.tensor_split``) and one prediction per group, drawn at
       random, is kept; ``M == K`` keeps all; ``M < K`` keeps all (at most ``M`` raters are then matched).
    2. :meth:`pairwise_dice_loss`: the Dice loss of every (prediction, rater) pair, MONAI's
       :class:`~monai.losses.DiceLoss` (``sigmoid=True``, ``squared_pred`` as the reference code, one value per
       pair), the logits upsampled bilinearly to the target's size first.
    3. :meth:`match`: ``scipy.optimize.linear_sum_assignment`` on that matrix restricted to the **valid**
       raters (default: the non-empty ones), so an empty rater neither takes a prediction away from a real
       mask nor contributes to the loss ("empty raters masked out"). Predictions left unmatched get no loss.
    4. the loss: the mean over all matched pairs of the batch of ``dice + bce_weight * BCE``.

    An image without a valid rater contributes nothing; a batch without any gives a zero loss that still has a
    graph (so DDP and ``backward`` work).

    Args:
        bce_weight: weight of a pixel-mean BCE on the matched pairs (0 in the reference code). The matching
            always uses the Dice loss alone.
        squared_pred: square the predictions in the Dice denominator (``True`` in the reference code).
        mask_empty_raters: treat empty rater masks as absent (``True``, SeqSAM); ``False`` matches them like
            any other mask (the model is then also taught to predict "nothing").
        smooth: ``smooth_nr`` and ``smooth_dr`` of the Dice loss.

    Attributes:
        last_components: after each call, detached scalars ``dice`` and ``bce`` (means over matched pairs),
            ``matched`` (matched pairs per image) and ``total``.

    Raises:
        ValueError: on a negative ``bce_weight`` or ``smooth``.
    """

    def __init__(
        self, bce_weight: float = 0.0, squared_pred: bool = True, mask_empty_raters: bool = True, smooth: float = 1e-5
    ) -> None:
        super().__init__()
        if bce_weight < 0 or smooth < 0:
            raise ValueError(f"bce_weight and smooth must be non-negative, got {bce_weight}, {smooth}")
        self.bce_weight = float(bce_weight)
        self.mask_empty_raters = bool(mask_empty_raters)
        self.dice = DiceLoss(
            sigmoid=True, squared_pred=squared_pred, reduction="none", smooth_nr=smooth, smooth_dr=smooth
        )
        self.last_components: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------- steps
    def select(self, logits: torch.Tensor, num_raters: int) -> torch.Tensor:
        """Keep one prediction per group when there are more predictions than raters (paper Fig. 1C).

        Args:
            logits: ``(B, M, h, w)``, in step order.
            num_raters: ``K``.

        Returns:
            ``(B, K, h, w)`` when ``M > K`` (group ``k``'s pick at position ``k``; each image draws its own
            picks), else ``logits`` unchanged.
        """
        m = logits.shape[1]
        if m <= num_raters:
            return logits
        groups = torch.tensor_split(torch.arange(m), num_raters)
        starts = torch.tensor([int(g[0]) for g in groups])
        sizes = torch.tensor([len(g) for g in groups])
        picks = starts + (torch.rand(logits.shape[0], num_raters) * sizes).long().clamp_max(sizes - 1)  # (B, K)
        index = picks.to(logits.device).view(*picks.shape, 1, 1).expand(-1, -1, *logits.shape[2:])
        return logits.gather(1, index)

    def pairwise_dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Dice loss of every (prediction, rater) pair.

        Args:
            logits: ``(B, P, H, W)`` at the target's size.
            target: ``(B, K, H, W)`` binary masks.

        Returns:
            ``(B, P, K)``: entry ``[b, i, k]`` is the Dice loss of prediction ``i`` against rater ``k``.
        """
        b, p = logits.shape[:2]
        k = target.shape[1]
        spatial = tuple(logits.shape[2:])
        pairs_in = logits.unsqueeze(2).expand(b, p, k, *spatial).reshape(b, p * k, *spatial)
        pairs_tg = target.unsqueeze(1).expand(b, p, k, *spatial).reshape(b, p * k, *spatial)
        return self.dice(pairs_in, pairs_tg).view(b, p, k)

    def match(self, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The matched (prediction, rater) pairs of one image.

        Args:
            cost: ``(P, V)`` Dice losses of the predictions against the image's valid raters.

        Returns:
            ``rows``, ``cols``: equal-length index arrays into ``cost`` (``min(P, V)`` one-to-one pairs with the
            smallest total cost).
        """
        return linear_sum_assignment(cost)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, rater_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of one training step.

        Args:
            outputs: a method's ``training_outputs``: ``"logits" (B, M, h, w)``.
            target: ``(B, K, H, W)`` every rater's mask, values in ``{0, 1}``.
            rater_valid: ``(B, K)`` which raters read the image (the data's ``rater_valid``); a rater counts when
                it read the image and, with ``mask_empty_raters``, drew something. ``None``: every rater read it.

        Returns:
            the scalar loss.

        Raises:
            ValueError: when ``outputs`` has no ``"logits"``, the shapes are not ``(B, M, h, w)`` /
                ``(B, K, H, W)`` with one ``B``, or ``rater_valid`` is not ``(B, K)``.
        """
        if "logits" not in outputs:
            raise ValueError(f"outputs must hold 'logits', got keys {sorted(outputs)}")
        logits = outputs["logits"]
        if logits.ndim != 4 or target.ndim != 4 or logits.shape[0] != target.shape[0]:
            raise ValueError(
                f"expected logits (B, M, h, w) and target (B, K, H, W), got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}"
            )
        b, k = target.shape[:2]
        target = target.to(logits.dtype)
        valid = target.flatten(2).amax(dim=2) > 0 if self.mask_empty_raters else target.new_ones((b, k)).bool()
        if rater_valid is not None:
            if tuple(rater_valid.shape) != (b, k):
                raise ValueError(f"rater_valid must be ({b}, {k}), got {tuple(rater_valid.shape)}")
            valid = valid & rater_valid.bool()
        valid = valid.cpu().numpy()

        logits = self.select(logits, k)
        if logits.shape[2:] != target.shape[2:]:
            logits = F.interpolate(logits, size=tuple(target.shape[2:]), mode="bilinear", align_corners=False)
        pair_loss = self.pairwise_dice_loss(logits, target)  # (B, P, K)

        cost = pair_loss.detach().float().cpu().numpy()
        images, rows, cols = [], [], []
        for i in range(b):
            valid_cols = np.flatnonzero(valid[i])
            if valid_cols.size == 0:
                continue
            r, c = self.match(cost[i][:, valid_cols])
            images += [i] * len(r)
            rows += list(r)
            cols += list(valid_cols[c])
        if not rows:  # nothing to learn from in this batch, but keep the graph
            total = logits.sum() * 0.0
            zero = total.detach()
            self.last_components = {"dice": zero, "bce": zero, "matched": zero, "total": zero}
            return total
        bi = torch.as_tensor(images, device=logits.device)
        ri = torch.as_tensor(rows, device=logits.device)
        ci = torch.as_tensor(cols, device=logits.device)
        dice = pair_loss[bi, ri, ci].mean()
        if self.bce_weight > 0:
            bce = F.binary_cross_entropy_with_logits(logits[bi, ri], target[bi, ci])
        else:
            bce = logits.new_zeros(())
        total = dice + self.bce_weight * bce
        self.last_components = {
            "dice": dice.detach(),
            "bce": bce.detach(),
            "matched": torch.tensor(len(rows) / b),
            "total": total.detach(),
        }
        return total

    def components(self) -> dict[str, float]:
        """The last call's components as Python floats (for logging); empty before the first call."""
        return {name: float(value) for name, value in self.last_components.items()}


class WinnerTakesAllLoss(HungarianSetLoss):
    """Multiple choice learning: every valid rater's mask trains only the prediction (head) with the smallest
    Dice loss against it; all predictions compete (no selection), and one prediction may win several raters.

    This is the loss of the MCL baseline (SAM's multimask heads) SeqSAM is compared with. The reference
    baseline draws one non-empty rater per image and takes the best head's loss; this loss takes every valid
    rater of the image at once, which is that loss's expectation over the draw.

    Args: as :class:`HungarianSetLoss`.
    """

    def select(self, logits: torch.Tensor, num_raters: int) -> torch.Tensor:
        """Every prediction competes: ``logits`` unchanged."""
        return logits

    def match(self, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each valid rater with its best prediction.

        Args:
            cost: ``(P, V)``.

        Returns:
            ``rows`` (the winning prediction of each rater) and ``cols = 0 .. V - 1``.
        """
        return cost.argmin(axis=0), np.arange(cost.shape[1])


def _at_target_size(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One rater's logits upsampled bilinearly to its mask's size, and the mask in the logits' dtype.

    Args:
        logits: ``(B, 1, h, w)``.
        target: ``(B, 1, H, W)``.

    Returns:
        ``(B, 1, H, W)`` logits and target.

    Raises:
        ValueError: when they are not ``(B, 1, ...)`` with one ``B``.
    """
    if logits.ndim != 4 or target.ndim != 4 or logits.shape[:2] != target.shape[:2] or logits.shape[1] != 1:
        raise ValueError(f"expected logits and target (B, 1, H, W), got {tuple(logits.shape)}, {tuple(target.shape)}")
    target = target.to(logits.dtype)
    if logits.shape[2:] != target.shape[2:]:
        logits = F.interpolate(logits, size=tuple(target.shape[2:]), mode="bilinear", align_corners=False)
    return logits, target


class P2SamLoss(nn.Module):
    """P2SAM's loss: ``ce_weight * CE + dice_weight * Dice + focal_weight * focal + l2_weight * L2``.

    The terms on the assembled logit (``outputs["logits"] (B, 1, h, w)``, upsampled bilinearly to the target's
    size as :class:`LatentSegmentationLoss` does) against one rater's mask:

    - CE, ``classification="bce"``: the pixel-mean BCE of the assembled logit (the same as a 2-class
      cross-entropy on logits ``(0, l)``); ``classification="weighted_masks"``: the reference code's
      ``CrossEntropyLoss`` over the ``M`` weighted mask logits ``w_i M_i`` (``outputs["mask_logits"]`` and
      ``outputs["assembling_weights"]``) with the binary target as the class index (classes 0 and 1);
    - Dice: MONAI's :class:`~monai.losses.DiceLoss` (``sigmoid=True``, pooled over the batch with
      ``dice_batch``; the reference sums a smoothed Dice per image row);
    - focal: MONAI's :class:`~monai.losses.FocalLoss` (sigmoid, ``gamma`` 2, ``alpha`` 0.25 as the reference's
      RetinaNet focal loss);
    - L2: ``outputs["l2"]``, the sum of squares of the network's ``l2_parameters()`` (P2SAM's stage 2: 1e-5;
      stage 1: 0), 0 when absent.

    Args:
        classification: ``"bce"`` or ``"weighted_masks"``.
        ce_weight: weight of the CE term.
        dice_weight: weight of the Dice term.
        focal_weight: weight of the focal term.
        l2_weight: weight of the L2 term.
        focal_gamma: focusing exponent.
        focal_alpha: weight of the positive class in the focal term, or ``None`` for none.
        dice_batch: pool the Dice over the batch.

    Attributes:
        last_components: after each call, detached scalars ``ce``, ``dice``, ``focal``, ``l2`` (the sum of
            squares, before ``l2_weight``), ``l2_weighted`` and ``total``.

    Raises:
        ValueError: on an unknown ``classification`` or a negative weight.
    """

    CLASSIFICATIONS = ("bce", "weighted_masks")

    def __init__(
        self,
        classification: str = "bce",
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_weight: float = 1.0,
        l2_weight: float = 0.0,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = 0.25,
        *,
        dice_batch: bool = True,
    ) -> None:
        super().__init__()
        if classification not in self.CLASSIFICATIONS:
            raise ValueError(f"classification must be one of {self.CLASSIFICATIONS}, got {classification!r}")
        weights = {"ce": ce_weight, "dice": dice_weight, "focal": focal_weight, "l2": l2_weight}
        if min(weights.values()) < 0:
            raise ValueError(f"weights must be non-negative, got {weights}")
        self.classification = classification
        self.weights = {k: float(v) for k, v in weights.items()}
        self.dice = DiceLoss(sigmoid=True, batch=dice_batch)
        self.focal = FocalLoss(gamma=focal_gamma, alpha=focal_alpha, use_softmax=False)
        self.last_components: dict[str, torch.Tensor] = {}

    def cross_entropy(self, outputs: dict[str, torch.Tensor], logits: torch.Tensor, target: torch.Tensor):
        """The CE term: ``logits`` and ``target`` ``(B, 1, H, W)`` at the target's size."""
        if self.classification == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        if "mask_logits" not in outputs or "assembling_weights" not in outputs:
            raise ValueError("classification='weighted_masks' needs 'mask_logits' and 'assembling_weights' outputs")
        weighted = outputs["mask_logits"] * outputs["assembling_weights"].view(1, -1, 1, 1)
        weighted = F.interpolate(weighted, size=tuple(target.shape[2:]), mode="bilinear", align_corners=False)
        return F.cross_entropy(weighted, target[:, 0].round().long())

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The loss of one training step.

        Args:
            outputs: the network's training outputs: ``"logits" (B, 1, h, w)``, optionally ``"l2"`` (a scalar),
                and ``"mask_logits" (B, M, h, w)`` with ``"assembling_weights" (M,)`` for ``"weighted_masks"``.
            target: ``(B, 1, H, W)`` one rater's binary mask.

        Returns:
            the scalar loss.

        Raises:
            ValueError: when ``outputs`` lacks what the terms need, or logits and target are not
                ``(B, 1, ...)`` with one ``B``.
        """
        if "logits" not in outputs:
            raise ValueError(f"outputs must hold 'logits', got keys {sorted(outputs)}")
        logits, target = _at_target_size(outputs["logits"], target)
        terms = {
            "ce": self.cross_entropy(outputs, logits, target),
            "dice": self.dice(logits, target),
            "focal": self.focal(logits, target),
            "l2": outputs["l2"] if "l2" in outputs else logits.new_zeros(()),
        }
        total = sum(self.weights[k] * v for k, v in terms.items())
        self.last_components = {k: v.detach() for k, v in terms.items()}
        self.last_components["l2_weighted"] = (self.weights["l2"] * terms["l2"]).detach()
        self.last_components["total"] = total.detach()
        return total

    def components(self) -> dict[str, float]:
        """The last call's components as Python floats (for logging); empty before the first call."""
        return {name: float(value) for name, value in self.last_components.items()}


class ProSegLoss(nn.Module):
    """ProSeg's loss: ``dice_weight * GDL + rater_weight * CE + reconstruction_weight * MSE
    + kl_weight * (KL_dir + KL_gauss)``.

    - GDL: MONAI's :class:`~monai.losses.GeneralizedDiceLoss` (``sigmoid=True``) of ``outputs["logits"]
      (B, 1, h, w)``, upsampled bilinearly to the target's size as :class:`LatentSegmentationLoss` does. With one
      channel its class weight cancels, so per image (``dice_batch=False``, the default) it is the soft Dice loss,
      and an image whose rater mask is empty contributes 0 (no gradient); ``dice_batch=True`` pools it over the
      batch instead (an empty mask then still penalises false positives);
    - CE: the cross-entropy of ``outputs["rater_logits"] (B, K)`` against ``outputs["rater_ids"] (B,)``, one
      softmax (the reference code applies softmax twice; not copied); 0 for one rater (``K = 1``);
    - MSE: ``outputs["reconstruction"]`` against ``outputs["reconstruction_target"]``;
    - KL: the batch means of ``outputs["kl_rater"]`` (``KL(Dir(softplus(alpha_r)) || Dir(1))``) and
      ``outputs["kl_image"]`` (the per-pixel Gaussian KL, summed over channels, averaged over pixels).

    The reference's small L2 (1e-5) is the optimizer's ``weight_decay``, not a term here.

    Args:
        kl_weight: weight of the two KL terms (0.1 in the reference code).
        dice_weight: weight of the generalised Dice term.
        rater_weight: weight of the rater cross-entropy.
        reconstruction_weight: weight of the reconstruction MSE.
        dice_batch: pool the generalised Dice over the batch.

    Attributes:
        last_components: after each call, detached scalars ``dice``, ``rater_ce``, ``reconstruction``,
            ``kl_rater``, ``kl_image`` (batch means, before ``kl_weight``), ``kl_weighted`` and ``total``.

    Raises:
        ValueError: on a negative weight.
    """

    KEYS = ("logits", "rater_logits", "rater_ids", "reconstruction", "reconstruction_target", "kl_rater", "kl_image")

    def __init__(
        self,
        kl_weight: float = 0.1,
        dice_weight: float = 1.0,
        rater_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        *,
        dice_batch: bool = False,
    ) -> None:
        super().__init__()
        weights = {"kl": kl_weight, "dice": dice_weight, "rater": rater_weight, "reconstruction": reconstruction_weight}
        if min(weights.values()) < 0:
            raise ValueError(f"weights must be non-negative, got {weights}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.dice = GeneralizedDiceLoss(sigmoid=True, batch=dice_batch)
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The loss of one training step.

        Args:
            outputs: :meth:`ProSeg.training_outputs <ambisam.networks.ProSeg.compute_training_outputs>`: the keys
                in :attr:`KEYS`.
            target: ``(B, 1, H, W)`` the rater's mask, values in ``[0, 1]``.

        Returns:
            the scalar loss.

        Raises:
            ValueError: when ``outputs`` lacks a key, or logits and target are not ``(B, 1, ...)`` with one ``B``.
        """
        missing = [key for key in self.KEYS if key not in outputs]
        if missing:
            raise ValueError(f"outputs lack {missing} (got keys {sorted(outputs)})")
        logits, target = _at_target_size(outputs["logits"], target)
        kl_rater, kl_image = outputs["kl_rater"].mean(), outputs["kl_image"].mean()
        terms = {
            "dice": self.dice(logits, target),
            "rater": F.cross_entropy(outputs["rater_logits"], outputs["rater_ids"].long()),
            "reconstruction": F.mse_loss(outputs["reconstruction"], outputs["reconstruction_target"]),
            "kl": kl_rater + kl_image,
        }
        total = sum(self.weights[k] * v for k, v in terms.items())
        self.last_components = {
            "dice": terms["dice"].detach(),
            "rater_ce": terms["rater"].detach(),
            "reconstruction": terms["reconstruction"].detach(),
            "kl_rater": kl_rater.detach(),
            "kl_image": kl_image.detach(),
            "kl_weighted": (self.weights["kl"] * terms["kl"]).detach(),
            "total": total.detach(),
        }
        return total

    def components(self) -> dict[str, float]:
        """The last call's components as Python floats (for logging); empty before the first call."""
        return {name: float(value) for name, value in self.last_components.items()}


# ----------------------------------------------------------------------------------------------------------------
# UR-SAM's localiser (self-supervised; see ambisam.networks.localiser for the axes and the views)
# ----------------------------------------------------------------------------------------------------------------


class RelativeDistanceLoss(nn.Module):
    """``MSE(r * tanh(p_a - p_b), delta)``, in mm^2: the relative-distance regression of MedLAM.

    ``delta`` is the offset in mm from crop ``b``'s centre to crop ``a``'s (``centre_a - centre_b``), so that at
    inference the displacement from a query patch to a support point is ``r * tanh(p_support - p_query)``
    (:func:`ambisam.networks.localiser.relative_offset_mm`). The mean is over the batch and the three axes.

    Args:
        range_mm: ``r`` along ``(i, j, k)`` of the localiser's RAS grid (default ``(600, 600, 1500)``, METHODS.md's
            ``[1500, 600, 600]`` in ``(z, y, x)``).

    Raises:
        ValueError: ``range_mm`` not three positive values.
    """

    def __init__(self, range_mm: Sequence[float] = RELATIVE_RANGE_MM) -> None:
        super().__init__()
        range_mm = tuple(float(v) for v in range_mm)
        if len(range_mm) != 3 or min(range_mm) <= 0:
            raise ValueError(f"range_mm must be three positive values, got {range_mm}")
        self.range_mm = range_mm

    def forward(self, position_a: torch.Tensor, position_b: torch.Tensor, offset_mm: torch.Tensor) -> torch.Tensor:
        """The loss of a batch of crop pairs.

        Args:
            position_a: ``(B, 3)`` latent positions of crops ``a``.
            position_b: ``(B, 3)`` latent positions of crops ``b``.
            offset_mm: ``(B, 3)`` ``centre_a - centre_b`` in mm along ``(i, j, k)``.

        Returns:
            The scalar mean squared error in mm^2.

        Raises:
            ValueError: shapes that are not ``(B, 3)`` alike.
        """
        if position_a.shape != position_b.shape or position_a.shape != offset_mm.shape or position_a.shape[-1] != 3:
            raise ValueError(f"expected (B, 3) positions and offset, got {tuple(position_a.shape)}, "
                             f"{tuple(position_b.shape)}, {tuple(offset_mm.shape)}")
        predicted = relative_offset_mm(position_a, position_b, self.range_mm)
        return F.mse_loss(predicted, offset_mm.to(predicted.dtype))


class PointEmbeddingLoss(nn.Module):
    """InfoNCE over positions: the embedding of point ``n`` in crop ``a`` should be most similar to the embedding
    of the same physical point ``n`` in crop ``b`` among the ``N`` points of ``b`` (and the other way round).

    Per batch item the logits are ``f_a @ f_b^T / temperature`` ``(N, N)``; the loss is the cross-entropy with the
    diagonal as the target, averaged over both directions, the points and the batch.

    Args:
        temperature: the softmax temperature (the embeddings are unit vectors, so the logits lie in
            ``[-1/t, 1/t]``).

    Raises:
        ValueError: a temperature that is not positive.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
        """The loss of a batch of point sets.

        Args:
            features_a: ``(B, N, F)`` the points' embeddings in crop ``a``.
            features_b: ``(B, N, F)`` the same points' embeddings in crop ``b``.

        Returns:
            The scalar cross-entropy.

        Raises:
            ValueError: shapes that are not ``(B, N, F)`` alike.
        """
        if features_a.ndim != 3 or features_a.shape != features_b.shape:
            raise ValueError(f"expected (B, N, F) features alike, got {tuple(features_a.shape)}, "
                             f"{tuple(features_b.shape)}")
        logits = features_a @ features_b.transpose(1, 2) / self.temperature  # (B, N, N)
        target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        return 0.5 * (F.cross_entropy(logits.transpose(1, 2), target) + F.cross_entropy(logits, target))


class LocaliserLoss(nn.Module):
    """The localiser's training loss: ``distance_weight * relative distance (mm^2) + embedding_weight * mean over
    scales of the point-embedding InfoNCE``.

    The default ``distance_weight`` of 0.01 counts the distance term in cm^2, so that neither term swamps the other
    (an RMS error of 10 mm is 1, as is an InfoNCE of 1).

    Args:
        range_mm: ``r`` along ``(i, j, k)``.
        distance_weight: weight of the relative-distance MSE in mm^2.
        embedding_weight: weight of the point-embedding cross-entropy.
        temperature: of the InfoNCE.
        patch_size: the views' side (the points' frame).

    Attributes:
        last_components: after each call, detached scalars ``distance_mse_mm2``, ``distance_rmse_mm``,
            ``embedding`` and ``total``.

    Raises:
        ValueError: a negative weight, or as the two losses.
    """

    def __init__(self, range_mm: Sequence[float] = RELATIVE_RANGE_MM, distance_weight: float = 0.01,
                 embedding_weight: float = 1.0, temperature: float = 0.1, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        if min(distance_weight, embedding_weight) < 0:
            raise ValueError(f"weights must be non-negative, got {distance_weight}, {embedding_weight}")
        self.distance = RelativeDistanceLoss(range_mm)
        self.embedding = PointEmbeddingLoss(temperature)
        self.distance_weight, self.embedding_weight = float(distance_weight), float(embedding_weight)
        self.patch_size = int(patch_size)
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, outputs: dict, target: dict) -> torch.Tensor:
        """The loss of one training step.

        Args:
            outputs: the localiser's outputs on the three views of each volume
                (:data:`~ambisam.data.transforms.localiser.LOCALISER_VIEWS`): ``"position" (B, 3 views, 3)`` and
                ``"features"``, a list of ``(B, 3 views, E, s, s, s)``.
            target: ``"offset_mm" (B, 2, 3)`` (a row per pair of
                :data:`~ambisam.data.transforms.localiser.DISTANCE_PAIRS`) and ``"points" (B, 2, N, 3)`` (the
                points in the two views of :data:`~ambisam.data.transforms.localiser.EMBEDDING_PAIR`).

        Returns:
            The scalar loss.

        Raises:
            ValueError: a key missing from ``outputs`` or ``target``.
        """
        missing = [k for k in ("position", "features") if k not in outputs]
        missing += [k for k in ("offset_mm", "points") if k not in target]
        if missing:
            raise ValueError(f"the localiser loss needs {missing} (outputs {sorted(outputs)}, target {sorted(target)})")
        position, offsets = outputs["position"], target["offset_mm"]
        distance = torch.stack([self.distance(position[:, a], position[:, b], offsets[:, n])
                                for n, (a, b) in enumerate(DISTANCE_PAIRS)]).mean()
        first, second = EMBEDDING_PAIR
        points = target["points"]
        embedding = torch.stack([
            self.embedding(point_features([f[:, first]], points[:, 0], self.patch_size),
                           point_features([f[:, second]], points[:, 1], self.patch_size))
            for f in outputs["features"]
        ]).mean()
        total = self.distance_weight * distance + self.embedding_weight * embedding
        self.last_components = {
            "distance_mse_mm2": distance.detach(),
            "distance_rmse_mm": distance.detach().sqrt(),
            "embedding": embedding.detach(),
            "total": total.detach(),
        }
        return total

    def components(self) -> dict[str, float]:
        """The last call's components as Python floats (for logging); empty before the first call."""
        return {name: float(value) for name, value in self.last_components.items()}
