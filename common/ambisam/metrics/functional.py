"""The field's metrics for distributions of binary segmentation masks, as plain functions.

Every function takes one image's worth of data and returns a Python ``float``:

- ``samples``: ``(N, *spatial)`` binary masks drawn from the model (``bool`` or numbers in ``{0, 1}``),
- ``raters``: ``(K, *spatial)`` binary masks drawn by the raters,
- ``prob`` / ``sample_probs``: foreground probabilities in ``[0, 1]``,

with any number of spatial dimensions (2D slices, 3D volumes). numpy arrays and torch tensors are both
accepted; tensors are copied to host memory and all arithmetic is done in numpy (``float64``, overlaps counted
exactly). The definitions and edge cases follow ``METHODS.md``, section "Metrics":

- ``d(A, B) = 1 - IoU(A, B)`` of the foreground; two empty masks have IoU 1 and Dice 1 unless stated otherwise.
- GED and the sample diversity average over *all* ``N^2`` / ``K^2`` pairs, ``i = j`` included.
- GED depends on ``N``: always report it with ``N`` (GED16, GED32, GED100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "ArrayLike",
    "DICE_MAX_CONVENTIONS",
    "pairwise_iou",
    "pairwise_dice",
    "ged",
    "sample_diversity",
    "hm_iou",
    "dice_max",
    "dice_mean",
    "soft_dice",
    "ncc",
    "ece_bin_statistics",
    "ece_from_bin_statistics",
    "ece",
    "empty_fractions",
    "MATCHINGS",
    "personalised_dice",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

# Overlaps are counted with float32 matrix products over chunks of at most 2**20 pixels: every partial sum is an
# integer below 2**24, so float32 counts them exactly; the chunks are summed in float64.
_CHUNK = 1 << 20
#: the ``per`` values of :func:`dice_max`: over raters (ours), over samples, one maximum over all pairs (P2SAM)
DICE_MAX_CONVENTIONS = ("rater", "sample", "pair")
#: the ``matching`` values of :func:`personalised_dice`: prediction ``r`` with rater ``r``, or the best assignment
MATCHINGS = ("fixed", "hungarian", "shuffled")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``; raises ValueError naming ``name`` and the choices otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def _to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array (a tensor is detached and copied to host memory)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _masks(x: Any, name: str) -> np.ndarray:
    """``x`` as a boolean ``(M, *spatial)`` array; raises ValueError unless it is a non-empty stack of binary masks."""
    arr = _to_numpy(x)
    if arr.ndim < 2 or arr.shape[0] == 0 or arr.size == 0:
        raise ValueError(
            f"{name} must have shape (M, *spatial) with M >= 1 and a non-empty spatial shape, got {arr.shape}."
        )
    if arr.dtype == np.bool_:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(
            f"{name} must be binary masks (bool or values in {{0, 1}}), got other values (dtype {arr.dtype})."
        )
    return arr != 0


def _probabilities(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 array; raises ValueError unless every value is a probability in ``[0, 1]``."""
    arr = _to_numpy(x).astype(np.float64, copy=False)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}.")
    if not np.all((arr >= 0.0) & (arr <= 1.0)):  # also rejects NaN
        raise ValueError(f"{name} must hold probabilities in [0, 1].")
    return arr


def _check_spatial(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str, a_lead: int = 1) -> None:
    """Raise ValueError unless ``a`` (after its ``a_lead`` leading dims) and ``b`` (after one) share a spatial shape."""
    if a.shape[a_lead:] != b.shape[1:]:
        raise ValueError(
            f"{a_name} and {b_name} must share their spatial shape, got {a_name} {tuple(a.shape)} "
            f"and {b_name} {tuple(b.shape)}."
        )


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections ``(M, L)`` and areas ``(M,)``, ``(L,)`` of boolean stacks ``(M, *spatial)``, ``(L, *spatial)``."""
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter = np.zeros((fa.shape[0], fb.shape[0]), dtype=np.float64)
    for start in range(0, fa.shape[1], _CHUNK):
        ca = fa[:, start : start + _CHUNK].astype(np.float32)
        cb = fb[:, start : start + _CHUNK].astype(np.float32)
        inter += ca @ cb.T
    area_a = np.count_nonzero(fa, axis=1).astype(np.float64)
    area_b = np.count_nonzero(fb, axis=1).astype(np.float64)
    return inter, area_a, area_b


def _iou(a: np.ndarray, b: np.ndarray, empty_score: float) -> np.ndarray:
    inter, area_a, area_b = _overlaps(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, float(empty_score))


def _dice(a: np.ndarray, b: np.ndarray, empty_score: float) -> np.ndarray:
    inter, area_a, area_b = _overlaps(a, b)
    total = area_a[:, None] + area_b[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / total, float(empty_score))


def pairwise_iou(a: ArrayLike, b: ArrayLike, empty_score: float = 1.0) -> np.ndarray:
    """IoU of the foreground between every mask of ``a`` and every mask of ``b``.

    Args:
        a: binary masks ``(M, *spatial)``.
        b: binary masks ``(L, *spatial)``.
        empty_score: the IoU of two empty masks (default 1: they agree perfectly).

    Returns:
        ``(M, L)`` float64 array.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    ma, mb = _masks(a, "a"), _masks(b, "b")
    _check_spatial(ma, mb, "a", "b")
    return _iou(ma, mb, empty_score)


def pairwise_dice(a: ArrayLike, b: ArrayLike, empty_score: float = 1.0) -> np.ndarray:
    """Dice of the foreground between every mask of ``a`` and every mask of ``b``.

    Args:
        a: binary masks ``(M, *spatial)``.
        b: binary masks ``(L, *spatial)``.
        empty_score: the Dice of two empty masks (default 1).

    Returns:
        ``(M, L)`` float64 array.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    ma, mb = _masks(a, "a"), _masks(b, "b")
    _check_spatial(ma, mb, "a", "b")
    return _dice(ma, mb, empty_score)


def _samples_raters(samples: ArrayLike, raters: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, r = _masks(samples, "samples"), _masks(raters, "raters")
    _check_spatial(s, r, "samples", "raters")
    return s, r


def ged(samples: ArrayLike, raters: ArrayLike, both_empty: float = 0.0) -> float:
    """Squared generalised energy distance between the sample and the rater distributions.

    ``GED^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with ``d = 1 - IoU`` of the foreground; each expectation is
    the mean over all ``N x K``, ``N^2`` and ``K^2`` pairs, ``i = j`` included. The value depends on ``N``: report
    it as GED``N``.

    Args:
        samples: binary masks ``(N, *spatial)``.
        raters: binary masks ``(K, *spatial)``.
        both_empty: the distance ``d`` of two empty masks: 0 (default; PHiSeg, MoSE, SeqSAM) or 1 (D-Persona,
            ProSeg). It applies to ``i = j`` pairs as well.

    Returns:
        GED^2 as a float.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    s, r = _samples_raters(samples, raters)
    n = s.shape[0]
    both = np.concatenate([s, r])  # one (N + K)^2 overlap matrix holds all three sets of pairs
    d = 1.0 - _iou(both, both, 1.0 - both_empty)
    return float(2.0 * d[:n, n:].mean() - d[:n, :n].mean() - d[n:, n:].mean())


def sample_diversity(samples: ArrayLike, both_empty: float = 0.0) -> float:
    """Mean pairwise distance ``E d(S, S')`` of the samples (``d = 1 - IoU``, all ``N^2`` pairs, ``i = j`` included).

    Args:
        samples: binary masks ``(N, *spatial)``.
        both_empty: the distance of two empty masks (default 0; 1 is D-Persona's convention).

    Returns:
        the diversity as a float (0 for identical non-empty samples).

    Raises:
        ValueError: when ``samples`` is not a binary mask stack.
    """
    s = _masks(samples, "samples")
    return float((1.0 - _iou(s, s, 1.0 - both_empty)).mean())


def hm_iou(samples: ArrayLike, raters: ArrayLike, tiling: bool = True) -> float:
    """Hungarian-matched IoU between the samples and the raters.

    With ``tiling`` (ours, default) both sides are repeated to ``L = lcm(N, K)`` masks (so when ``N`` is a multiple
    of ``K`` only the raters are tiled, ``N / K`` times), the ``L x L`` cost ``1 - IoU`` is matched one-to-one with
    ``scipy.optimize.linear_sum_assignment``, and the matched IoUs are averaged: every sample counts. Without
    (``tiling=False``, P2SAM's evaluation code) the ``N x K`` cost is matched as it is, so only ``min(N, K)`` pairs
    (the best samples) count: a more lenient figure. Two empty masks have IoU 1.

    Args:
        samples: binary masks ``(N, *spatial)``.
        raters: binary masks ``(K, *spatial)``.
        tiling: repeat both sides to ``lcm(N, K)`` before matching.

    Returns:
        the mean matched IoU as a float in ``[0, 1]``.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    s, r = _samples_raters(samples, raters)
    iou = _iou(s, r, 1.0)
    if tiling:
        n, k = s.shape[0], r.shape[0]
        size = math.lcm(n, k)
        iou = np.tile(iou, (size // n, size // k))
    rows, cols = linear_sum_assignment(1.0 - iou)
    return float(iou[rows, cols].mean())


def dice_max(samples: ArrayLike, raters: ArrayLike, per: Literal["rater", "sample", "pair"] = "rater") -> float:
    """Best-match Dice ``D_max``.

    Args:
        samples: binary masks ``(N, *spatial)``.
        raters: binary masks ``(K, *spatial)``.
        per: ``"rater"`` (CIMD, default): the mean over raters of the best Dice among the samples;
            ``"sample"`` (SeqSAM, D-Persona): the mean over samples of the best Dice among the raters;
            ``"pair"`` (P2SAM's eq. 12 and evaluation code): one maximum over all ``N x K`` pairs, the most
            lenient. Two empty masks have Dice 1.

    Returns:
        ``D_max`` as a float.

    Raises:
        ValueError: when the inputs are not binary mask stacks, their spatial shapes differ, or ``per`` is not
            one of ``"rater"``, ``"sample"``, ``"pair"``.
    """
    _check_choice("per", per, DICE_MAX_CONVENTIONS)
    s, r = _samples_raters(samples, raters)
    dice = _dice(s, r, 1.0)  # (N, K)
    if per == "pair":
        return float(dice.max())
    best = dice.max(axis=0) if per == "rater" else dice.max(axis=1)
    return float(best.mean())


def dice_mean(samples: ArrayLike, raters: ArrayLike) -> float:
    """Mean Dice over all ``N x K`` sample-rater pairs ``D_mean`` (PixelSeg); two empty masks have Dice 1.

    Args:
        samples: binary masks ``(N, *spatial)``.
        raters: binary masks ``(K, *spatial)``.

    Returns:
        ``D_mean`` as a float.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    s, r = _samples_raters(samples, raters)
    return float(_dice(s, r, 1.0).mean())


def soft_dice(prob: ArrayLike, raters: ArrayLike, thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """QUBIQ's soft Dice: Dice of the thresholded mean prediction and mean rater mask, averaged over thresholds.

    At each threshold ``t`` a pixel is foreground when its value is strictly greater than ``t`` (so with the
    default thresholds a pixel that half the raters marked is foreground at 0.1 and 0.3, background from 0.5 on).
    The rater mean is computed exactly as ``count / K``. When both binarised maps are empty at a threshold, the
    Dice at that threshold is 1 (they agree that nothing exceeds ``t``), the same convention as for two empty masks
    elsewhere in this module; the threshold is never skipped.

    Args:
        prob: the mean foreground probability ``(*spatial)`` in ``[0, 1]`` (e.g. the mean of the ``N`` samples).
        raters: binary masks ``(K, *spatial)``.
        thresholds: the thresholds (QUBIQ: 0.1, 0.3, 0.5, 0.7, 0.9).

    Returns:
        the mean Dice over the thresholds as a float.

    Raises:
        ValueError: when ``prob`` is not in ``[0, 1]``, ``raters`` is not a binary mask stack, the spatial shapes
            differ, or ``thresholds`` is empty.
    """
    p = _probabilities(prob, "prob")
    r = _masks(raters, "raters")
    _check_spatial(p, r, "prob", "raters", a_lead=0)
    if len(thresholds) == 0:
        raise ValueError("thresholds must not be empty.")
    target = np.count_nonzero(r, axis=0) / r.shape[0]
    pred_bin = np.stack([p > t for t in thresholds])
    target_bin = np.stack([target > t for t in thresholds])
    inter = np.count_nonzero(pred_bin & target_bin, axis=tuple(range(1, pred_bin.ndim)))
    total = pred_bin.reshape(len(thresholds), -1).sum(1) + target_bin.reshape(len(thresholds), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_threshold = np.where(total > 0, 2.0 * inter / total, 1.0)
    return float(per_threshold.mean())


def _pearson_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flat maps; NaN when either map is constant (all values equal)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    return float(np.dot(da, db) / math.sqrt(np.dot(da, da) * np.dot(db, db)))


def ncc(
    sample_probs: ArrayLike, raters: ArrayLike, eps: float = 1e-8, return_nan_count: bool = False
) -> float | tuple[float, int]:
    """PHiSeg's S_NCC: normalised cross-correlation of expected cross-entropy maps.

    Our reading of PHiSeg (Baumgartner et al. 2019, eq. for S_NCC, and ``utils.variance_ncc_dist`` in its code):
    with ``CE(q, p) = -(q log(p + eps) + (1 - q) log(1 - p + eps))`` the pixel-wise binary cross-entropy of a
    prediction ``p`` against a target ``q`` (PHiSeg's two-class softmax form, ``eps = 1e-8``), ``s_i`` the
    samples' foreground probabilities and ``s_bar`` their mean,

    - ``E_ss(x) = mean_i CE(s_bar(x), s_i(x))``, the expected cross-entropy between the mean and the samples
      (the model's own variability map),
    - ``E_sy_j(x) = mean_i CE(y_j(x), s_i(x))``, the expected cross-entropy of the samples against rater ``j``,
    - ``NCC_j`` = Pearson correlation of ``E_ss`` and ``E_sy_j`` over all pixels (PHiSeg's ``ncc`` with zero-mean,
      unit-(population-)std normalisation),
    - ``S_NCC = mean_j NCC_j``.

    ``NCC_j`` is NaN when ``E_ss`` or ``E_sy_j`` is constant over the image (all values equal, e.g. all samples
    identical and binary); the result is the mean over the raters whose ``NCC_j`` is not NaN (NaN if none).
    Higher is better (1: the model's uncertainty sits exactly where it disagrees with the raters).

    Args:
        sample_probs: the samples' foreground probabilities ``(N, *spatial)`` in ``[0, 1]``: each sample's sigmoid
            map, as PHiSeg uses its softmax outputs (the evaluation passes the inferer's ``probabilities``; binary
            samples are accepted but give a different, coarser value).
        raters: binary masks ``(K, *spatial)``.
        eps: added inside the logarithms (PHiSeg: 1e-8).
        return_nan_count: also return how many of the ``K`` per-rater values were NaN.

    Returns:
        ``S_NCC`` as a float, or ``(S_NCC, nan_count)`` when ``return_nan_count`` is True.

    Raises:
        ValueError: when ``sample_probs`` is not in ``[0, 1]`` or is not ``(N, *spatial)``, ``raters`` is not a
            binary mask stack, or the spatial shapes differ.
    """
    s = _probabilities(sample_probs, "sample_probs")
    r = _masks(raters, "raters")
    if s.ndim < 2:
        raise ValueError(f"sample_probs must have shape (N, *spatial), got {s.shape}.")
    _check_spatial(s, r, "sample_probs", "raters")
    s = s.reshape(s.shape[0], -1)
    y = r.reshape(r.shape[0], -1).astype(np.float64)
    # CE is linear in its target q, so E_q[CE] only needs the mean log-probabilities of the samples per pixel.
    mean_log_fg = np.zeros(s.shape[1])
    mean_log_bg = np.zeros(s.shape[1])
    for s_i in s:  # one sample at a time: memory O(pixels), also for volumes
        mean_log_fg += np.log(s_i + eps)
        mean_log_bg += np.log(1.0 - s_i + eps)
    mean_log_fg /= s.shape[0]
    mean_log_bg /= s.shape[0]
    s_bar = s.mean(axis=0)
    e_ss = -(s_bar * mean_log_fg + (1.0 - s_bar) * mean_log_bg)
    e_sy = -(y * mean_log_fg + (1.0 - y) * mean_log_bg)  # (K, pixels)
    per_rater = np.array([_pearson_or_nan(e_ss, e_sy_j) for e_sy_j in e_sy])
    nan_count = int(np.isnan(per_rater).sum())
    value = float("nan") if nan_count == per_rater.size else float(np.nanmean(per_rater))
    return (value, nan_count) if return_nan_count else value


def ece_bin_statistics(prob: ArrayLike, raters: ArrayLike, n_bins: int = 10) -> np.ndarray:
    """Per-bin pixel counts and sums behind the ECE, so that it can be pooled over many images.

    Bins are ``n_bins`` equal-width intervals of the confidence: ``[0, 1/n]``, ``(1/n, 2/n]``, ..., ``((n-1)/n, 1]``.

    Args:
        prob: the confidence, the mean foreground probability ``(*spatial)`` in ``[0, 1]``.
        raters: binary masks ``(K, *spatial)``; the target of a pixel is the fraction of raters marking it.
        n_bins: the number of bins.

    Returns:
        ``(3, n_bins)`` float64 array: pixel count, sum of confidences, sum of targets per bin.

    Raises:
        ValueError: when ``prob`` is not in ``[0, 1]``, ``raters`` is not a binary mask stack, the spatial shapes
            differ, or ``n_bins < 1``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}.")
    p = _probabilities(prob, "prob")
    r = _masks(raters, "raters")
    _check_spatial(p, r, "prob", "raters", a_lead=0)
    conf = p.ravel()
    target = np.count_nonzero(r.reshape(r.shape[0], -1), axis=0) / r.shape[0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    return np.stack(
        [
            np.bincount(idx, minlength=n_bins).astype(np.float64),
            np.bincount(idx, weights=conf, minlength=n_bins),
            np.bincount(idx, weights=target, minlength=n_bins),
        ]
    )


def ece_from_bin_statistics(stats: ArrayLike) -> float:
    """The ECE from (summed) :func:`ece_bin_statistics`: ``sum_b |sum conf_b - sum target_b| / n_pixels``.

    This equals ``sum_b (n_b / n) |mean conf_b - mean target_b|``.

    Args:
        stats: ``(3, n_bins)`` counts and sums, or ``(B, 3, n_bins)`` for ``B`` images, pooled by summation.

    Returns:
        the ECE as a float in ``[0, 1]``.

    Raises:
        ValueError: when ``stats`` does not have shape ``(..., 3, n_bins)`` or holds no pixel.
    """
    arr = _to_numpy(stats).astype(np.float64)
    if arr.ndim < 2 or arr.shape[-2] != 3:
        raise ValueError(f"stats must have shape (..., 3, n_bins), got {arr.shape}.")
    counts, sum_conf, sum_target = arr.reshape(-1, 3, arr.shape[-1]).sum(axis=0)
    total = counts.sum()
    if total <= 0:
        raise ValueError("stats hold no pixel.")
    return float(np.abs(sum_conf - sum_target).sum() / total)


def ece(prob: ArrayLike, raters: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error of the foreground probability against the raters' agreement (MoSE).

    Confidence = the mean foreground probability of a pixel, target = the fraction of raters marking it; all pixels
    of the input are pooled into ``n_bins`` equal-width confidence bins (``[0, 0.1], (0.1, 0.2], ..., (0.9, 1]``)
    and ``ECE = sum_b (n_b / n) |mean conf_b - mean target_b|``. MoSE pools all pixels of the test set (see
    ``ECEMetric(pooled=True)``); MONAI's ``CalibrationErrorMetric`` averages per-image values instead.

    Unlike MoSE's code, whose bins are ``(lo, hi]`` for every bin, a confidence of exactly 0 falls into the first
    bin: MoSE's code leaves those pixels out of every bin while still counting them in ``n``, so a pixel that no
    sample marks but some rater does adds no error there.

    Args:
        prob: the mean foreground probability ``(*spatial)`` in ``[0, 1]``.
        raters: binary masks ``(K, *spatial)``.
        n_bins: the number of bins (MoSE: 10).

    Returns:
        the ECE as a float in ``[0, 1]`` (0: perfectly calibrated).

    Raises:
        ValueError: when ``prob`` is not in ``[0, 1]``, ``raters`` is not a binary mask stack, the spatial shapes
            differ, or ``n_bins < 1``.
    """
    return ece_from_bin_statistics(ece_bin_statistics(prob, raters, n_bins))


def empty_fractions(samples: ArrayLike, raters: ArrayLike) -> tuple[float, float]:
    """Presence: the fraction of samples and the fraction of raters that mark nothing in the case.

    A mask is empty when it has no foreground voxel anywhere in the case (the whole image or volume). Where raters
    disagree on whether a lesion is there at all, a model whose samples capture that should leave about as many
    samples empty as raters; ``|samples_empty - raters_empty|`` is the case's presence gap.

    Args:
        samples: binary masks ``(N, *spatial)``.
        raters: binary masks ``(K, *spatial)``.

    Returns:
        ``(samples_empty, raters_empty)``, each a float in ``[0, 1]``.

    Raises:
        ValueError: when the inputs are not binary mask stacks or their spatial shapes differ.
    """
    s, r = _samples_raters(samples, raters)
    return float(np.mean(~s.reshape(s.shape[0], -1).any(1))), float(np.mean(~r.reshape(r.shape[0], -1).any(1)))


def personalised_dice(
    predictions: ArrayLike,
    raters: ArrayLike,
    matching: Literal["fixed", "hungarian", "shuffled"] = "fixed",
    rater_valid: ArrayLike | None = None,
) -> float:
    """Personalised Dice: how well the prediction for rater ``r`` matches what rater ``r`` drew.

    ``matching="fixed"`` ("what would Dr X draw"): the mean over raters ``r`` of Dice(prediction ``r``, rater
    ``r``), the pairing fixed by the rater order. ``"hungarian"``: the one-to-one assignment of predictions to
    raters maximising the total Dice (``scipy.optimize.linear_sum_assignment`` on the :func:`pairwise_dice`
    matrix), and the mean matched Dice: what D-Persona's and ProSeg's reference code report as "personalised"
    Dice; never below the fixed value. ``"shuffled"``: the control, the mean Dice of the prediction for rater
    ``r`` against every *other* rater ``s != r`` (the expected fixed-pairing Dice when the rater ids are shuffled
    among the raters, each id landing on another rater); a personalised model's fixed value should beat it (with one
    rater who read the case it is that rater's fixed value). Two empty masks have Dice 1.

    Raters who did not read the case (``rater_valid`` 0) are left out, with their predictions, before either
    matching. ``raters`` may hold all ``K`` raters (the unread ones as zero channels) or only the ``sum(rater_valid)``
    raters who read it, in order (what :class:`~ambisam.data.SelectReadRatersd` leaves).

    Args:
        predictions: binary masks ``(N, *spatial)``, row ``r`` the prediction for rater ``r``; ``N = K``, or a
            multiple of ``K`` (e.g. ``N / K`` draws per rater laid out rater-major in blocks of ``K``), of which only
            the first ``K`` rows count.
        raters: binary masks ``(K, *spatial)``, or ``(K', *spatial)`` with ``K' = sum(rater_valid)``.
        matching: ``"fixed"`` (default), ``"hungarian"`` or ``"shuffled"``.
        rater_valid: ``(K,)`` 1 = the rater read the case, 0 = not; ``None``: every rater of ``raters`` read it.

    Returns:
        the mean (matched) Dice over the raters who read the case, a float in ``[0, 1]``.

    Raises:
        ValueError: the inputs are not binary mask stacks or their spatial shapes differ, ``N`` is not a positive
            multiple of ``K``, ``raters`` has neither ``K`` nor ``sum(rater_valid)`` masks, no rater read the case,
            or ``matching`` is unknown.
    """
    _check_choice("matching", matching, MATCHINGS)
    p, r = _masks(predictions, "predictions"), _masks(raters, "raters")
    _check_spatial(p, r, "predictions", "raters")
    read = np.ones(r.shape[0], dtype=bool) if rater_valid is None else _to_numpy(rater_valid).reshape(-1) > 0
    k = read.size
    if not read.any():
        raise ValueError("rater_valid: no rater read this case.")
    if r.shape[0] == k:
        r = r[read]
    elif r.shape[0] != int(read.sum()):
        raise ValueError(
            f"raters has {r.shape[0]} masks for {k} rater flags ({int(read.sum())} read): give all {k} raters or "
            "only the ones who read the case."
        )
    if p.shape[0] % k:
        raise ValueError(f"predictions must have K = {k} rows (or a multiple of K), got {p.shape[0]}.")
    dice = pairwise_dice(p[:k][read], r)
    if matching == "fixed" or (matching == "shuffled" and dice.shape[0] == 1):
        return float(np.diag(dice).mean())
    if matching == "shuffled":
        return float(dice[~np.eye(dice.shape[0], dtype=bool)].mean())
    rows, cols = linear_sum_assignment(dice, maximize=True)
    return float(dice[rows, cols].mean())
