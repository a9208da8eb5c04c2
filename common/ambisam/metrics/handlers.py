"""Ignite handlers over :mod:`ambisam.metrics.metric`, for MONAI evaluators and bundle configs.

Each handler wraps one metric, as MONAI's ``MeanDice`` wraps ``DiceMetric``, and can be a ``key_metric`` or one of
the ``additional_metrics`` of an evaluator. ``output_transform`` must turn ``engine.state.output`` into
``(y_pred, y)``: the samples ``(B, N, *spatial)`` (or a list of ``(N, *spatial)``) and the rater masks
``(B, K, *spatial)`` (or a list of ``(K, *spatial)``), e.g. ``monai.handlers.from_engine(["samples", "label"])``.
In a bundle config::

    "key_metric": {
        "val_ged": {
            "_target_": "ambisam.metrics.GEDHandler",
            "output_transform": "$monai.handlers.from_engine(['samples', 'label'])"
        }
    }

With ``save_details`` (default) the per-image values go to ``engine.state.metric_details[name]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler
from monai.utils import MetricReduction

from ambisam.metrics.metric import (
    DiceMaxMetric,
    DiceMeanMetric,
    ECEMetric,
    GEDMetric,
    HMIoUMetric,
    NCCMetric,
    PersonalisedDiceMetric,
    PresenceMetric,
    SampleDiversityMetric,
    SoftDiceMetric,
)

__all__ = [
    "GEDHandler",
    "SampleDiversityHandler",
    "HMIoUHandler",
    "DiceMaxHandler",
    "DiceMeanHandler",
    "SoftDiceHandler",
    "NCCHandler",
    "ECEHandler",
    "PresenceHandler",
    "PersonalisedDiceHandler",
]


def _record_details(handler: IgniteMetricHandler, engine: Engine, name: str, extra: Mapping[str, torch.Tensor]) -> None:
    """Put a multi-column metric's per-image values (its ``_per_image``) under ``name`` in
    ``engine.state.metric_details`` and each ``extra`` per-image column beside it (``name`` plus the key's
    suffix); the mean of each extra column goes into ``engine.state.metrics`` under the same name."""
    metric = handler.metric_fn
    if handler.save_details:
        engine.state.metric_details[name] = metric._per_image(metric.get_buffer())
    for key, values in extra.items():
        if handler.save_details:
            engine.state.metric_details[key] = values.reshape(-1, 1)
        engine.state.metrics[key] = float(values.double().mean().item())


class GEDHandler(IgniteMetricHandler):
    """Mean squared generalised energy distance (:class:`~ambisam.metrics.metric.GEDMetric`); report it
    with N (GED16, ...).

    Args:
        both_empty: the distance of two empty masks (0, default; 1 is D-Persona's convention).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        both_empty: float = 0.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(GEDMetric(both_empty, reduction), output_transform=output_transform, save_details=save_details)


class SampleDiversityHandler(IgniteMetricHandler):
    """Mean sample diversity ``E d(S, S')`` (:class:`~ambisam.metrics.metric.SampleDiversityMetric`).

    Args:
        both_empty: the distance of two empty masks (0, default; 1 is D-Persona's convention).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        both_empty: float = 0.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = SampleDiversityMetric(both_empty, reduction)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)


class HMIoUHandler(IgniteMetricHandler):
    """Mean Hungarian-matched IoU (:class:`~ambisam.metrics.metric.HMIoUMetric`).

    Args:
        tiling: ours (``True``, default) or P2SAM's evaluation (``False``, see
            :func:`~ambisam.metrics.functional.hm_iou`).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        tiling: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(HMIoUMetric(tiling, reduction), output_transform=output_transform, save_details=save_details)


class DiceMaxHandler(IgniteMetricHandler):
    """Mean ``D_max`` (:class:`~ambisam.metrics.metric.DiceMaxMetric`).

    Args:
        per: ``"rater"`` (CIMD, default), ``"sample"`` (SeqSAM, D-Persona) or ``"pair"`` (P2SAM).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        per: str = "rater",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(DiceMaxMetric(per, reduction), output_transform=output_transform, save_details=save_details)


class DiceMeanHandler(IgniteMetricHandler):
    """Mean ``D_mean`` (:class:`~ambisam.metrics.metric.DiceMeanMetric`).

    Args:
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(DiceMeanMetric(reduction), output_transform=output_transform, save_details=save_details)


class SoftDiceHandler(IgniteMetricHandler):
    """Mean QUBIQ soft Dice of the samples' mean (:class:`~ambisam.metrics.metric.SoftDiceMetric`).

    Args:
        thresholds: the thresholds (QUBIQ: 0.1, 0.3, 0.5, 0.7, 0.9).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
        confidence: what ``output_transform`` gives: ``"samples"`` (binary samples; confidence = fraction of
            samples) or ``"probability"`` (the samples' probability maps, e.g. through
            :class:`~ambisam.metrics.MetricInputs`; confidence = mean sigmoid probability).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        confidence: str = "samples",
    ) -> None:
        metric = SoftDiceMetric(thresholds, reduction, confidence=confidence)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)


class NCCHandler(IgniteMetricHandler):
    """Mean PHiSeg S_NCC over the images where it is defined (:class:`~ambisam.metrics.metric.NCCMetric`).

    Give it the samples' probability maps (``output_transform=ambisam.metrics.MetricInputs()``), as PHiSeg
    defines it. Besides ``engine.state.metrics[name]`` it puts the number of undefined per-rater values (summed
    over images) in ``engine.state.metrics[name + "_undefined_raters"]`` (as a count, not a mean), and with
    ``save_details`` the per-image counts in ``engine.state.metric_details`` under the same name.

    Args:
        eps: added inside the logarithms (PHiSeg: 1e-8).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        eps: float = 1e-8,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(NCCMetric(eps, reduction), output_transform=output_transform, save_details=save_details)

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        key = f"{name}_undefined_raters"
        _record_details(self, engine, name, {key: self.metric_fn.undefined_raters(per_image=True)})
        engine.state.metrics[key] = self.metric_fn.undefined_raters()


class ECEHandler(IgniteMetricHandler):
    """Expected calibration error of the samples' mean (:class:`~ambisam.metrics.metric.ECEMetric`).

    Args:
        n_bins: the number of equal-width confidence bins (MoSE: 10).
        pooled: ``True`` (default, MoSE): one ECE over the pixels of all images; ``False``: per-image ECEs, reduced.
            With ``save_details`` the per-image entries are the bin statistics.
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
        confidence: what ``output_transform`` gives: ``"samples"`` (binary samples; confidence = fraction of
            samples) or ``"probability"`` (the samples' probability maps; confidence = mean sigmoid probability).
    """

    def __init__(
        self,
        n_bins: int = 10,
        pooled: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        confidence: str = "samples",
    ) -> None:
        metric = ECEMetric(n_bins, pooled, reduction, confidence=confidence)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)


class PresenceHandler(IgniteMetricHandler):
    """The presence gap: the mean over images of ``|fraction of empty samples - fraction of empty raters|``
    (:class:`~ambisam.metrics.metric.PresenceMetric`).

    Besides ``engine.state.metrics[name]`` (the gap) it puts the means of the two fractions in
    ``engine.state.metrics["samples_empty"]`` and ``["raters_empty"]``, and with ``save_details`` the per-image
    values of all three in ``engine.state.metric_details`` under the same names.

    Args:
        reduction: the MONAI reduction over images (default ``"mean"``).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)`` (the binary samples and the raters).
        save_details: whether to store the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(PresenceMetric(reduction), output_transform=output_transform, save_details=save_details)

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        fractions = self.metric_fn.empty_fractions()
        _record_details(self, engine, name, {"samples_empty": fractions[:, 0], "raters_empty": fractions[:, 1]})


class PersonalisedDiceHandler(IgniteMetricHandler):
    """Mean personalised Dice (:class:`~ambisam.metrics.metric.PersonalisedDiceMetric`): for a personalised-mode
    evaluation, where the samples are one prediction per rater, in rater order.

    ``output_transform`` gives ``(y_pred, y)`` like for the other handlers, or ``(y_pred, y, rater_valid)`` (e.g.
    ``monai.handlers.from_engine(["samples", "label", "rater_valid"])``): give ``rater_valid`` wherever a rater may
    not have read a case, since :class:`~ambisam.data.SelectReadRatersd` in the evaluation's post-processing leaves
    only the raters who read it and the predictions must be paired with them by rater (the label may then hold
    all ``K`` raters or only those who read the case).

    Args:
        matching: ``"fixed"`` (default: prediction ``r`` against rater ``r``) or ``"hungarian"`` (the best
            one-to-one assignment: D-Persona's and ProSeg's "personalised" Dice).
        reduction: the MONAI reduction over images (default ``"mean"``; NaN values left out).
        output_transform: turns ``engine.state.output`` into ``(y_pred, y)`` or ``(y_pred, y, rater_valid)``.
        save_details: whether to store the per-image values in ``engine.state.metric_details``.

    Raises:
        ValueError: an unknown ``matching``; (from ``update``) an output of another length than 2 or 3.
    """

    def __init__(
        self,
        matching: str = "fixed",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = PersonalisedDiceMetric(matching, reduction)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)

    def iteration_completed(self, engine: Engine) -> None:
        """Hand the transformed output to :meth:`update` as it is (lists of per-image entries or batch-first
        tensors: the metric pairs them up), not unrolled by Ignite, which unrolls only ``(y_pred, y)``."""
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Sequence[Any]) -> None:
        if len(output) not in (2, 3):
            raise ValueError(f"output must be (y_pred, y) or (y_pred, y, rater_valid), got {len(output)} entries.")
        self.metric_fn(*output)
