"""MONAI cumulative metrics over :mod:`ambisam.metrics.functional`, for evaluators and DDP.

Input convention for every metric, per call (batch-first tensors or lists of channel-first tensors):

- ``y_pred``: ``(B, N, *spatial)`` the ``N`` binary samples of each image. The probability-based metrics
  (:class:`SoftDiceMetric`, :class:`ECEMetric`) use the mean over ``N`` as the confidence, so a probability map
  given as ``(B, 1, *spatial)`` is used as it is; their ``confidence`` names what ``y_pred`` holds: ``"samples"``
  (the binary samples: the confidence is the fraction of samples marking a voxel) or ``"probability"`` (the
  samples' sigmoid maps: the mean sigmoid probability). :class:`NCCMetric` takes per-sample probability maps (the
  inferer's ``probabilities``; binary samples are accepted).
- ``y``: ``(B, K, *spatial)`` the ``K`` rater masks of each image.
- ``rater_valid`` (optional keyword, for the metrics whose function takes it: :class:`PersonalisedDiceMetric`):
  ``(B, K)`` or a list of ``(K,)``, which raters read each image.

Each call computes one value per image into the buffer (gathered across ranks by MONAI's ``Cumulative``);
``aggregate()`` reduces with :func:`monai.metrics.utils.do_metric_reduction` (default: the mean over images, NaN
values left out), like MONAI's own metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ambisam.metrics.functional import (
    DICE_MAX_CONVENTIONS,
    MATCHINGS,
    _check_choice,
    dice_max,
    dice_mean,
    ece_bin_statistics,
    ece_from_bin_statistics,
    empty_fractions,
    ged,
    hm_iou,
    ncc,
    personalised_dice,
    sample_diversity,
    soft_dice,
)

__all__ = [
    "DistributionMetric",
    "GEDMetric",
    "SampleDiversityMetric",
    "HMIoUMetric",
    "DiceMaxMetric",
    "DiceMeanMetric",
    "SoftDiceMetric",
    "NCCMetric",
    "ECEMetric",
    "PresenceMetric",
    "PersonalisedDiceMetric",
    "CONFIDENCES",
]

#: what a probability-based metric's ``y_pred`` holds (its ``confidence``)
CONFIDENCES = ("samples", "probability")


def _check_confidence(confidence: str) -> str:
    if confidence not in CONFIDENCES:
        raise ValueError(f'confidence must be "samples" or "probability", got {confidence!r}.')
    return confidence


class DistributionMetric(CumulativeIterationMetric):
    """Base class: a per-image function of (samples, raters), accumulated over iterations and reduced.

    Args:
        metric_fn: ``metric_fn(y_pred_i, y_i)`` for one image: ``y_pred_i`` ``(N, *spatial)`` (or the
            ``(*spatial)`` mean over ``N`` when ``mean_over_samples``), ``y_i`` ``(K, *spatial)``; returns a float
            (or a flat array of values per image, for subclasses that pool).
        reduction: the MONAI reduction mode of ``aggregate`` (``"mean"``, ``"sum"``, ``"none"``, ...); NaN values
            are left out.
        get_not_nans: whether ``aggregate`` also returns the count of non-NaN values.
        mean_over_samples: give ``metric_fn`` the mean of ``y_pred_i`` over ``N`` (float64) instead of
            ``y_pred_i``.
    """

    def __init__(
        self,
        metric_fn: Callable[[Any, Any], Any],
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        mean_over_samples: bool = False,
    ) -> None:
        super().__init__()
        self.metric_fn = metric_fn
        self.reduction = reduction
        self.get_not_nans = get_not_nans
        self.mean_over_samples = mean_over_samples

    def __call__(self, y_pred: Any, y: Any = None, rater_valid: Any = None, **kwargs: Any) -> Any:
        """Accumulate the values of a batch (see :meth:`_compute_tensor`).

        Args:
            y_pred: ``(B, N, *spatial)`` or a list of ``(N, *spatial)``.
            y: ``(B, K, *spatial)`` or a list of ``(K, *spatial)``.
            rater_valid: ``(B, K)`` or a list of ``(K,)`` flags handed per image to ``metric_fn`` (only for a
                ``metric_fn`` taking ``rater_valid``); ``None``: not passed.
            kwargs: as MONAI's ``CumulativeIterationMetric``.

        Returns:
            the per-image values ``(B, C)`` of this batch.
        """
        if rater_valid is None:
            return super().__call__(y_pred, y, **kwargs)
        if isinstance(y_pred, torch.Tensor) and isinstance(y, torch.Tensor):
            valid = torch.stack([torch.as_tensor(v).reshape(-1) for v in rater_valid])
            return super().__call__(y_pred, y, rater_valid=valid, **kwargs)
        values = [
            super(DistributionMetric, self).__call__(p[None], t[None], rater_valid=torch.as_tensor(v).reshape(1, -1))
            for p, t, v in zip(y_pred, y, rater_valid, strict=True)
        ]
        return torch.cat(values)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Per-image values ``(B, C)`` (``C = 1`` for a scalar metric) for ``y_pred`` ``(B, N, *spatial)``, ``y``
        ``(B, K, *spatial)`` (and the keyword ``rater_valid (B, K)``, handed per image to ``metric_fn``).

        Raises:
            ValueError: when ``y`` is missing, an input has fewer than 3 dimensions, or the batch sizes differ.
        """
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the rater masks y.")
        if y_pred.ndim < 3 or y.ndim < 3:
            raise ValueError(
                f"y_pred and y must have shape (B, N, *spatial) and (B, K, *spatial), got {tuple(y_pred.shape)} "
                f"and {tuple(y.shape)}."
            )
        if y_pred.shape[0] != y.shape[0]:
            raise ValueError(f"y_pred and y must share the batch size, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
        valid = kwargs.get("rater_valid")
        values = []
        for i, (pred_i, y_i) in enumerate(zip(y_pred, y)):
            if self.mean_over_samples:
                pred_i = pred_i.double().mean(dim=0)
            extra = {} if valid is None else {"rater_valid": valid[i]}
            values.append(np.atleast_1d(np.asarray(self.metric_fn(pred_i, y_i, **extra), dtype=np.float64)).ravel())
        return torch.as_tensor(np.stack(values), dtype=torch.float64, device=y_pred.device)

    def _filled_buffer(self) -> torch.Tensor:
        """The buffer of every image seen so far (all ranks).

        Raises:
            ValueError: when nothing has been accumulated.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate, call the metric on some data first.")
        return data

    def _per_image(self, buffer: torch.Tensor) -> torch.Tensor:
        """The per-image values ``(images, C)`` from the buffer (identity here; pooling subclasses override it)."""
        return buffer

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the per-image values of every image seen so far (all ranks).

        Args:
            reduction: overrides the reduction mode given at construction.

        Returns:
            the reduced value, and the count of non-NaN values when ``get_not_nans``.

        Raises:
            ValueError: when nothing has been accumulated.
        """
        data = self._filled_buffer()
        f, not_nans = do_metric_reduction(self._per_image(data).clone(), reduction or self.reduction)
        if not_nans.numel() == 1 and not_nans.item() == 0:  # every value undefined (e.g. NCC of identical samples)
            f = torch.full_like(f, float("nan"))
        return (f, not_nans) if self.get_not_nans else f


def _diversity_of_samples(samples: Any, raters: Any, both_empty: float) -> float:
    """:func:`~ambisam.metrics.functional.sample_diversity` with the (samples, raters) signature; raters unused."""
    return sample_diversity(samples, both_empty=both_empty)


class GEDMetric(DistributionMetric):
    """Squared generalised energy distance per image (:func:`~ambisam.metrics.functional.ged`); report it with N.

    Args:
        both_empty: the distance of two empty masks (0, default; 1 is D-Persona's convention).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(
        self,
        both_empty: float = 0.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(partial(ged, both_empty=both_empty), reduction, get_not_nans)


class SampleDiversityMetric(DistributionMetric):
    """Sample diversity ``E d(S, S')`` per image (:func:`~ambisam.metrics.functional.sample_diversity`); ``y`` is
    required like for the other metrics but does not enter the value.

    Args:
        both_empty: the distance of two empty masks (0, default; 1 is D-Persona's convention).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(
        self,
        both_empty: float = 0.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(partial(_diversity_of_samples, both_empty=both_empty), reduction, get_not_nans)


class HMIoUMetric(DistributionMetric):
    """Hungarian-matched IoU per image (:func:`~ambisam.metrics.functional.hm_iou`).

    Args:
        tiling: repeat samples and raters to ``lcm(N, K)`` before matching (ours, default); ``False`` is P2SAM's
            evaluation (only ``min(N, K)`` matched pairs count).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(
        self, tiling: bool = True, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False
    ) -> None:
        super().__init__(partial(hm_iou, tiling=bool(tiling)), reduction, get_not_nans)


class DiceMaxMetric(DistributionMetric):
    """``D_max`` per image (:func:`~ambisam.metrics.functional.dice_max`).

    Args:
        per: ``"rater"`` (CIMD, default), ``"sample"`` (SeqSAM, D-Persona) or ``"pair"`` (P2SAM: one maximum over
            all pairs).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.

    Raises:
        ValueError: an unknown ``per``.
    """

    def __init__(
        self,
        per: str = "rater",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        per = _check_choice("per", per, DICE_MAX_CONVENTIONS)
        super().__init__(partial(dice_max, per=per), reduction, get_not_nans)


class DiceMeanMetric(DistributionMetric):
    """``D_mean`` per image (:func:`~ambisam.metrics.functional.dice_mean`).

    Args:
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(dice_mean, reduction, get_not_nans)


class SoftDiceMetric(DistributionMetric):
    """QUBIQ soft Dice per image (:func:`~ambisam.metrics.functional.soft_dice`) of the mean of ``y_pred`` over N.

    Args:
        thresholds: the thresholds (QUBIQ: 0.1, 0.3, 0.5, 0.7, 0.9).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
        confidence: what ``y_pred`` holds: ``"samples"`` (binary samples; confidence = fraction of samples) or
            ``"probability"`` (the samples' probability maps; confidence = mean sigmoid probability).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        confidence: str = "samples",
    ) -> None:
        super().__init__(partial(soft_dice, thresholds=tuple(thresholds)), reduction, get_not_nans, True)
        self.confidence = _check_confidence(confidence)


def _ncc_and_undefined(sample_probs: Any, raters: Any, eps: float) -> list[float]:
    """``[S_NCC, number of raters whose NCC_j is NaN]`` of one image."""
    value, undefined = ncc(sample_probs, raters, eps=eps, return_nan_count=True)
    return [value, float(undefined)]


class NCCMetric(DistributionMetric):
    """PHiSeg's S_NCC per image (:func:`~ambisam.metrics.functional.ncc`) of per-sample probabilities ``y_pred``.

    An image where every per-rater NCC is NaN (constant maps) gives NaN, which the reduction leaves out; use
    ``get_not_nans=True`` to get the count of images that did count. The buffer holds two values per image, the
    S_NCC and how many of its raters' NCC_j were undefined; :meth:`undefined_raters` sums the latter.

    Args:
        eps: added inside the logarithms (PHiSeg: 1e-8).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(
        self,
        eps: float = 1e-8,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(partial(_ncc_and_undefined, eps=eps), reduction, get_not_nans)

    def _per_image(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[:, :1]

    def undefined_raters(self, per_image: bool = False) -> torch.Tensor | int:
        """How many (image, rater) NCC_j values were NaN (constant maps), over every image seen.

        Args:
            per_image: return the ``(images,)`` counts instead of their sum.

        Raises:
            ValueError: when nothing has been accumulated.
        """
        data = self._filled_buffer()
        return data[:, 1] if per_image else int(data[:, 1].sum().item())


class ECEMetric(DistributionMetric):
    """Expected calibration error (:func:`~ambisam.metrics.functional.ece`) of the mean of ``y_pred`` over N.

    The buffer holds each image's bin statistics (``3 * n_bins`` values: counts, confidence sums, target sums).

    Args:
        n_bins: the number of equal-width confidence bins (MoSE: 10).
        pooled: ``True`` (default, MoSE): ``aggregate`` pools the pixels of every image seen into one set of bins
            and returns that single ECE (``reduction`` is not used; ``not_nans`` is the number of images).
            ``False``: one ECE per image, reduced like the other metrics (as MONAI's ``CalibrationErrorMetric``).
        reduction: see :class:`DistributionMetric` (per-image mode only).
        get_not_nans: see :class:`DistributionMetric`.
        confidence: what ``y_pred`` holds: ``"samples"`` (binary samples; confidence = fraction of samples) or
            ``"probability"`` (the samples' probability maps; confidence = mean sigmoid probability).
    """

    def __init__(
        self,
        n_bins: int = 10,
        pooled: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        confidence: str = "samples",
    ) -> None:
        super().__init__(partial(ece_bin_statistics, n_bins=n_bins), reduction, get_not_nans, True)
        self.confidence = _check_confidence(confidence)
        self.n_bins = n_bins
        self.pooled = pooled

    def _per_image(self, buffer: torch.Tensor) -> torch.Tensor:
        stats = buffer.reshape(-1, 3, self.n_bins).cpu().numpy()
        return torch.tensor([[ece_from_bin_statistics(s)] for s in stats], dtype=torch.float64, device=buffer.device)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.pooled:
            return super().aggregate(reduction)
        data = self._filled_buffer()
        stats = data.reshape(-1, 3, self.n_bins)
        f = torch.tensor(ece_from_bin_statistics(stats.cpu().numpy()), dtype=torch.float64, device=data.device)
        return (f, torch.tensor(float(stats.shape[0]), device=data.device)) if self.get_not_nans else f


class PresenceMetric(DistributionMetric):
    """Presence per image: the fraction of empty samples against the fraction of empty raters
    (:func:`~ambisam.metrics.functional.empty_fractions`); the per-image value is their absolute difference, so the
    reduced value (mean) is the test set's ``presence_gap`` (0: the samples leave a case empty as often as its
    raters do).

    The buffer holds ``[samples_empty, raters_empty]`` per image; :meth:`empty_fractions` returns it.

    Args:
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(empty_fractions, reduction, get_not_nans)

    def _per_image(self, buffer: torch.Tensor) -> torch.Tensor:
        return (buffer[:, :1] - buffer[:, 1:2]).abs()

    def empty_fractions(self) -> torch.Tensor:
        """``(images, 2)``: per image the fraction of empty samples and the fraction of empty raters.

        Raises:
            ValueError: when nothing has been accumulated.
        """
        data = self._filled_buffer()
        return data[:, :2]


class PersonalisedDiceMetric(DistributionMetric):
    """Personalised Dice per image (:func:`~ambisam.metrics.functional.personalised_dice`): ``y_pred`` holds one
    prediction per rater, in rater order (``(B, K, *spatial)``, or ``N`` a multiple of ``K`` of which the first
    ``K`` count). Give ``rater_valid`` (see :meth:`DistributionMetric.__call__`) where some raters may not have read
    a case, so that the predictions stay paired with their raters.

    Args:
        matching: ``"fixed"`` (default: prediction ``r`` against rater ``r``) or ``"hungarian"`` (the best
            one-to-one assignment: D-Persona's and ProSeg's "personalised" Dice).
        reduction: see :class:`DistributionMetric`.
        get_not_nans: see :class:`DistributionMetric`.

    Raises:
        ValueError: an unknown ``matching``.
    """

    def __init__(
        self,
        matching: str = "fixed",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        self.matching = _check_choice("matching", matching, MATCHINGS)
        super().__init__(partial(personalised_dice, matching=matching), reduction, get_not_nans)
