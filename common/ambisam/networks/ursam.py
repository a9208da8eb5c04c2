"""UR-SAM (Zhang et al., "Segment Anything Model with Uncertainty Rectification for Auto-Prompting Medical Image
Segmentation"): prompt augmentation, predictive entropy, the class-specific uncertainty threshold and the intensity
rectification of its Algorithm 1, and the comparison strategies of its Tables 3-4.

UR-SAM is training-free for SAM. For one structure (organ) on one slice:

1. ``n`` augmented boxes ``b^i``: the box shifted at random (:meth:`UrSam.augment_boxes`);
2. ``y^i = f_SAM(x, b^i)``, all decoded from the slice's one embedding; the ensemble ``y_hat = mean_i y^i`` (eq. 2)
   and its predictive entropy ``u`` (eq. 3; :func:`ensemble_uncertainty`);
3. the class-specific threshold ``T_unc = min u + (S_yhat + S_b) / (2 S_b) (max u - min u)`` (eq. 4;
   :func:`class_specific_threshold`) and ``M_unc = u > T_unc`` (eq. 5);
4. the rectification (Algorithm 1, lines 7-13; :func:`rectify`): keep the certain target
   ``M_t = y_hat (1 - M_unc)``, and inside ``M_unc`` mark a pixel as target when
   ``(I_t - I_b) / 2 < x < alpha_h I_t``, ``I_t`` and ``I_b`` the mean intensities of the certain target and the
   certain background.

:func:`correct` applies one of the named strategies (:data:`STRATEGIES`) to a batch: the plain ensemble, the
uncertainty-based corrections of the paper's reference [37] (Unc-FPC, Unc-FNC, Unc-FPNC) or UR-SAM's rectification.
Every function works on a batch of ``B`` (slice, structure) units at once, so all organs and all augmented boxes
of a slice come from one embedding.

What the paper leaves open, and what is decided here (named in the model card):

- ``y_hat`` in eq. 2 is the mean of the ``n`` sigmoid probability maps (SAM's outputs before thresholding), so the
  entropy is continuous; its mask is ``y_hat > 0.5``, and ``S_yhat`` that mask's area.
- The shift ratio ``r`` is a fraction of the backbone's input side (SAM's 1024 px: ``r = 0.01`` is up to 10 px),
  not of the box's side: with the box's side the best ratios of the paper's Table 1 (0.005-0.01) would move a box
  by under one pixel, and its observation that large ratios push the target out of the box could not happen.
- ``I_b`` is the mean over the certain background *inside the box* (the region SAM was asked about); over the whole
  slice it would be the air and the table as much as the organ's surroundings.
- Where a unit has no certain target pixel, ``I_t`` is undefined: its ensemble mask is returned unrectified.
"""

from __future__ import annotations

import os

import torch

from ambisam.inferers.layout import binary_entropy
from ambisam.networks.base import Conditions
from ambisam.networks.baselines import PromptJitterSam
from ambisam.sam import DEFAULT_BACKBONE, SamBackbone

__all__ = [
    "UrSam",
    "STRATEGIES",
    "ensemble_uncertainty",
    "class_specific_threshold",
    "uncertainty_mask",
    "box_masks",
    "rectify",
    "correct",
    "MODES",
]

#: the strategies of the paper's Tables 3-4: the ensemble alone, the corrections of its reference [37] that remove
#: (FPC), add (FNC) or flip (FPNC) the high-uncertainty pixels, and UR-SAM's intensity rectification
STRATEGIES = ("ensemble", "unc_fpc", "unc_fnc", "unc_fpnc", "ursam")

#: the inference modes (``conditions.mode``; ``None`` is the first): ``"augmented"``, every sample an augmented
#: box; ``"given_box_first"``, sample 0 the box as given and samples 1..N-1 augmented (the evaluation's "SAM with
#: the prompt" row and its ensemble from one call, one embedding)
MODES = ("augmented", "given_box_first")


def ensemble_uncertainty(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble of the augmented prompts' outputs and its predictive entropy (eqs. 2-3).

    Args:
        probs: ``(B, n, H, W)`` foreground probabilities of the ``n`` augmented boxes of each unit.

    Returns:
        ``(B, H, W)`` the ensemble probability ``y_hat`` and ``(B, H, W)`` its entropy ``u`` in bits.
    """
    mean = probs.float().mean(dim=1)
    return mean, binary_entropy(mean)


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pixels inside each box.

    Args:
        boxes: ``(B, 4)`` ``[x_min, y_min, x_max, y_max]`` in pixels of the ``(H, W)`` grid, corners included.
        size: ``(H, W)``.

    Returns:
        ``(B, H, W)`` bool.
    """
    ys = torch.arange(size[0], device=boxes.device, dtype=torch.float32)[None, :, None]
    xs = torch.arange(size[1], device=boxes.device, dtype=torch.float32)[None, None, :]
    b = boxes.float()[:, :, None, None]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


def class_specific_threshold(uncertainty: torch.Tensor, mask: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """UR-SAM's class-specific uncertainty threshold (eq. 4).

    ``T_unc = min u + (S_yhat + S_b) / (2 S_b) (max u - min u)``: the smaller the target's share of its box, the
    lower the threshold and the more of the box counts as uncertain.

    Args:
        uncertainty: ``(B, H, W)`` the entropy ``u``.
        mask: ``(B, H, W)`` bool, the ensemble mask (its area is ``S_yhat``).
        box: ``(B, H, W)`` bool, the box's pixels (their count is ``S_b``; see :func:`box_masks`).

    Returns:
        ``(B,)`` the threshold per unit.
    """
    flat = uncertainty.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    box_area = box.flatten(1).sum(dim=1).clamp(min=1).float()
    share = (mask.flatten(1).sum(dim=1).float() + box_area) / (2 * box_area)
    return low + share * (high - low)


def uncertainty_mask(
    uncertainty: torch.Tensor, mask: torch.Tensor, box: torch.Tensor, threshold: float | None = None
) -> torch.Tensor:
    """The high-uncertainty pixels ``M_unc = u > T_unc`` (eq. 5).

    Args:
        uncertainty, mask, box: as :func:`class_specific_threshold`.
        threshold: a fixed ``T_unc`` in bits (the paper's Table 2 "fixed T_unc", reference [37]'s ``u_th``);
            ``None``: the class-specific one.

    Returns:
        ``(B, H, W)`` bool.
    """
    if threshold is None:
        limit = class_specific_threshold(uncertainty, mask, box)[:, None, None]
    else:
        limit = torch.full_like(uncertainty[:, :1, :1], float(threshold))
    return uncertainty > limit


def rectify(
    mask: torch.Tensor, unsure: torch.Tensor, image: torch.Tensor, box: torch.Tensor, alpha_h: float
) -> torch.Tensor:
    """UR-SAM's uncertainty rectification (Algorithm 1, lines 7-13).

    The certain target ``M_t = mask & ~unsure`` stays target; a pixel of ``unsure`` becomes target when its
    intensity ``x`` satisfies ``(I_t - I_b) / 2 < x < alpha_h * I_t``, with ``I_t`` the mean intensity of ``M_t``
    and ``I_b`` that of the certain background inside the box (``box & ~mask & ~unsure``); every other pixel is
    background. A unit without a certain target pixel keeps ``mask`` as it is (``I_t`` is undefined there).

    Args:
        mask: ``(B, H, W)`` bool, the ensemble mask.
        unsure: ``(B, H, W)`` bool, ``M_unc``.
        image: ``(B, H, W)`` intensities, on the grid of the masks.
        box: ``(B, H, W)`` bool, the box's pixels.
        alpha_h: the upper bound's factor on ``I_t``.

    Returns:
        ``(B, H, W)`` bool, the rectified mask.
    """
    image = image.float()
    target = mask & ~unsure
    background = box & ~mask & ~unsure

    def mean_over(region: torch.Tensor) -> torch.Tensor:
        count = region.flatten(1).sum(dim=1)
        total = (image * region).flatten(1).sum(dim=1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    i_t, i_b = mean_over(target)[:, None, None], mean_over(background)[:, None, None]
    i_b = torch.where(torch.isnan(i_b), torch.zeros_like(i_b), i_b)  # no certain background: the lower bound is I_t / 2
    added = unsure & (image > (i_t - i_b) / 2) & (image < alpha_h * i_t)  # NaN I_t compares False everywhere
    defined = ~torch.isnan(i_t)
    return torch.where(defined, target | added, mask)


def correct(
    strategy: str,
    probability: torch.Tensor,
    image: torch.Tensor | None,
    boxes: torch.Tensor,
    alpha_h: float = 1.5,
    threshold: float | None = None,
) -> dict[str, torch.Tensor]:
    """One strategy of the paper's Tables 3-4 on a batch of units.

    Args:
        strategy: one of :data:`STRATEGIES`.
        probability: ``(B, n, H, W)`` the augmented boxes' probabilities, or ``(B, H, W)`` their ensemble ``y_hat``
            already (eq. 2; the sampling inferer's mean map).
        image: ``(B, H, W)`` intensities (needed by ``"ursam"`` only).
        boxes: ``(B, 4)`` the unaugmented box per unit, pixels of the ``(H, W)`` grid.
        alpha_h: see :func:`rectify`.
        threshold: see :func:`uncertainty_mask`.

    Returns:
        ``{"mask": (B, H, W) bool, "probability": (B, H, W) y_hat, "uncertainty": (B, H, W) u in bits,
        "uncertain": (B, H, W) bool M_unc}``.

    Raises:
        ValueError: an unknown strategy, or ``"ursam"`` without an image.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if probability.dim() == 4:
        probability, uncertainty = ensemble_uncertainty(probability)
    else:
        probability = probability.float()
        uncertainty = binary_entropy(probability)
    mask = probability > 0.5
    box = box_masks(boxes, tuple(probability.shape[-2:]))
    unsure = uncertainty_mask(uncertainty, mask, box, threshold)
    if strategy == "ensemble":
        out = mask
    elif strategy == "unc_fpc":
        out = mask & ~unsure
    elif strategy == "unc_fnc":
        out = mask | unsure
    elif strategy == "unc_fpnc":
        out = mask ^ unsure
    else:
        if image is None:
            raise ValueError("the 'ursam' strategy rectifies by intensity and needs the image")
        out = rectify(mask, unsure, image, box, alpha_h)
    return {"mask": out, "probability": probability, "uncertainty": uncertainty, "uncertain": unsure}


class UrSam(PromptJitterSam):
    """UR-SAM's prompt augmentation and rectification on the shared SAM backbone (training-free).

    Its samples are the ``N`` augmented boxes' masks (``N = n``, 3 in the paper's best setting of Table 1), all
    decoded from the slice's one embedding, so the sampling inferer's mean and entropy are eqs. 2-3;
    :meth:`rectified` turns them into one strategy's mask (:func:`correct`).

    Inference modes (``conditions.mode``, :data:`MODES`): ``"augmented"`` (the default) and ``"given_box_first"``.

    Args:
        backbone: a built backbone or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        ratio: the largest shift of each box coordinate as a fraction of the backbone's input side (Table 1's best:
            0.005-0.01).
        alpha_h: the rectification's upper bound factor on the certain target's mean intensity.
        strategy: the default strategy of :meth:`rectified`, one of :data:`STRATEGIES`.
        threshold: a fixed uncertainty threshold in bits; ``None``: the class-specific one (eq. 4).

    Raises:
        ValueError: a negative ``ratio`` or an unknown ``strategy``.
    """

    inference_modes = MODES

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        ratio: float = 0.01,
        alpha_h: float = 1.5,
        strategy: str = "ursam",
        threshold: float | None = None,
    ) -> None:
        super().__init__(backbone, checkpoint, ratio=ratio, min_shift=0.0)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.alpha_h = float(alpha_h)
        self.strategy = strategy
        self.threshold = threshold

    def shift_limit(self, boxes: torch.Tensor) -> torch.Tensor:
        """The largest shift of each coordinate: ``ratio`` times the backbone's input side ``S``, for every box.

        Args:
            boxes: ``(B, 4)`` float boxes.

        Returns:
            ``(B, 4)`` in pixels of backbone input.
        """
        return torch.full_like(boxes, self.ratio * self.backbone.image_size)

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """The augmented boxes' masks; with ``conditions.mode == "given_box_first"`` sample 0 is the box as given.

        Args and shapes as :meth:`PromptJitterSam.draw_samples`.

        Raises:
            ValueError: an unknown mode.
        """
        if conditions.mode is not None and conditions.mode not in MODES:
            raise ValueError(f"unknown mode {conditions.mode!r}: UR-SAM offers {MODES} ('augmented' is the default)")
        if conditions.mode != "given_box_first":
            return super().draw_samples(embeddings, conditions, num_samples)
        boxes = conditions.boxes.float()
        prompts = torch.cat([boxes[:, None], self.jitter_boxes(boxes, num_samples - 1, conditions)], dim=1)
        b, n = prompts.shape[:2]
        logits, _ = self.backbone.decode_boxes(embeddings, prompts.reshape(b * n, 4))
        return logits.view(b, n, *logits.shape[-2:])

    def rectified(
        self, logits: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, strategy: str | None = None
    ) -> dict[str, torch.Tensor]:
        """One strategy's result from the augmented boxes' logits (:func:`correct`).

        Args:
            logits: ``(B, n, H, W)`` from :meth:`sample_logits`.
            image: ``(B, H, W)`` or ``(B, C, H, W)`` (the first channel is used) on the logits' grid.
            boxes: ``(B, 4)`` the unaugmented boxes on that grid.
            strategy: ``None``: this network's.

        Returns:
            as :func:`correct`.
        """
        if image.dim() == 4:
            image = image[:, 0]
        return correct(strategy or self.strategy, torch.sigmoid(logits), image, boxes, self.alpha_h, self.threshold)
