"""The benchmark's clocks: :class:`TimedEmbeddingCache`, which times first-time encodings, and
:class:`TrainingBudget`, which ends a training stage when its share of the method's time budget is spent and
records the validation curve.

The shared base ``train.json`` attaches a :class:`TrainingBudget` to every bundle's trainer (its ``budget_minutes``
and ``training_record`` ids); the benchmark swaps in ``ambisam.benchmark.TimedEmbeddingCache`` for a bundle's
``embedding_cache`` and sets those ids.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ambisam.io import write_json
from ambisam.sam.cache import EmbeddingCache

__all__ = ["TimedEmbeddingCache", "TrainingBudget", "encoding_seconds", "count_parameters"]


class TimedEmbeddingCache(EmbeddingCache):
    """:class:`~ambisam.sam.EmbeddingCache` that also adds up the time it spends encoding (its misses).

    The benchmark swaps it in for a bundle's ``embedding_cache`` so that first-time encodings (a one-time cost
    of the frozen encoder, shared by every SAM method through the one on-disk cache) count neither against a
    method's training budget nor in its sampling time.

    Args: as :class:`~ambisam.sam.EmbeddingCache`.

    Attributes:
        encoding_seconds: wall time of the calls that encoded at least one image.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.encoding_seconds = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        misses, start = self.misses, time.perf_counter()
        embeddings = super().__call__(images)
        if self.misses > misses:
            self.encoding_seconds += time.perf_counter() - start
        return embeddings


def encoding_seconds(clock: Any) -> float:
    """The ``encoding_seconds`` of ``clock`` (a :class:`TimedEmbeddingCache`), 0 for ``None`` or any other object."""
    return float(getattr(clock, "encoding_seconds", 0.0) or 0.0)


class TrainingBudget:
    """End a training stage when its time budget is spent, at a point where the best weights are saved.

    At each epoch end (after validation and the checkpoint savers of the bundle, which are attached first),
    training stops when the time used plus the last epoch's time would exceed the budget. When one epoch alone
    runs past the budget, it is ended early (``terminate_epoch``: its validation still runs), then training
    stops. Time spent encoding slices for the first time (``clock``'s ``encoding_seconds``) is not counted.
    When the last epoch (by the budget or by ``max_epochs``) is one the bundle does not validate
    (``epoch % val_interval != 0``), ``validator`` runs once more, so that the saved best weights have seen it.
    After each run of ``validator`` during training, the budgeted seconds so far and its float metrics are
    recorded (the validation curve). In distributed training every rank stops at the same point (the ranks'
    budget decisions are reduced). At completion a JSON record is written: epochs and iterations run, the budgeted
    seconds and the encoding seconds, whether the budget stopped it, whether something else ended it before
    ``max_epochs`` (``stopped_early``: the bundle's early stopping), the validation curve, the trainable
    parameter count, the embedding cache's hits and misses, the last loss.

    Args:
        seconds: the budget in seconds (``None`` or ``inf``: no limit, only the record).
        record_path: where the JSON record goes (``None``: no record, as on the ranks other than 0).
        clock: an object whose ``encoding_seconds`` grows while slices are encoded (:class:`TimedEmbeddingCache`),
            or ``None``.
        validator: the bundle's validation evaluator (``@validate#evaluator``), or ``None``.
        val_interval: the epochs between the bundle's validations.
    """

    def __init__(
        self,
        seconds: float | None,
        record_path: str | os.PathLike | None,
        clock: Any = None,
        validator: Engine | None = None,
        val_interval: int = 1,
    ) -> None:
        self.seconds = math.inf if seconds is None else float(seconds)
        self.record_path = None if record_path is None else Path(record_path)
        self.clock = clock
        self.validator = validator
        self.val_interval = max(1, int(val_interval))
        self._encoding_start = 0.0
        self._start = self._epoch_start = 0.0
        self._last_epoch = 0.0
        self._start_epoch = 0
        self.stopped_by_budget = False
        self.ended_epoch_early = False
        self.validation_curve: list[dict[str, float]] = []
        self._training = False

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer ``engine`` (and to ``validator``'s completion, for the validation curve)."""
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        if isinstance(self.validator, Engine):
            self.validator.add_event_handler(Events.COMPLETED, self._validated, engine)

    def _now(self) -> float:
        """A clock that stands still while slices are encoded for the first time."""
        return time.perf_counter() - encoding_seconds(self.clock)

    def elapsed(self) -> float:
        """Budgeted seconds since training started."""
        return self._now() - self._start

    def _over(self, over: bool) -> bool:
        """``over`` on any rank (the ranks' clocks differ; all of them must stop together)."""
        if math.isinf(self.seconds) or idist.get_world_size() < 2:
            return over
        return bool(idist.all_reduce(int(over), op="MAX"))

    def _started(self, engine: Engine) -> None:
        self._start = self._now()
        self._encoding_start = encoding_seconds(self.clock)
        self._start_epoch = int(engine.state.epoch)  # > 0 when resumed
        self.stopped_by_budget = self.ended_epoch_early = False
        self.validation_curve = []
        self._training = True

    def _epoch_started(self, _engine: Engine) -> None:
        self._epoch_start = self._now()

    def _iteration_completed(self, engine: Engine) -> None:
        if not self.ended_epoch_early and self._over(self.elapsed() > self.seconds):
            self.ended_epoch_early = True
            engine.terminate_epoch()

    def _validated(self, validator: Engine, engine: Engine) -> None:
        """One point of the validation curve: the trainer's epoch, the budgeted seconds, the float metrics."""
        if not self._training:  # a run of the validator outside this training
            return
        metrics = {k: float(v) for k, v in validator.state.metrics.items()
                   if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        self.validation_curve.append({"epoch": int(engine.state.epoch), "seconds": self.elapsed(), **metrics})

    def _epoch_completed(self, engine: Engine) -> None:
        self._last_epoch = self._now() - self._epoch_start
        last = engine.state.epoch >= engine.state.max_epochs
        if not last and self._over(self.ended_epoch_early or self.elapsed() + self._last_epoch > self.seconds):
            self.stopped_by_budget = last = True
        if last and self.validator is not None and engine.state.epoch % self.val_interval:
            self.validator.run(engine.state.epoch)  # the bundle's interval skipped the last epoch
        if self.stopped_by_budget:
            engine.terminate()

    def _completed(self, engine: Engine) -> None:
        self._training = False
        if self.record_path is None:
            return
        network = getattr(engine, "network", None)
        cache = getattr(engine, "embedding_cache", None)
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(output, list) and output and isinstance(output[0], Mapping):
            loss = output[0].get("loss")
        write_json(
            self.record_path,
            {
                "budget_seconds": None if math.isinf(self.seconds) else self.seconds,
                "seconds": self.elapsed(),
                "encoding_seconds": encoding_seconds(self.clock) - self._encoding_start,
                "epochs": int(engine.state.epoch),
                "epochs_this_run": int(engine.state.epoch) - self._start_epoch,
                "max_epochs": int(engine.state.max_epochs),
                "iterations": int(engine.state.iteration),
                "stopped_by_budget": self.stopped_by_budget,
                "stopped_early": not self.stopped_by_budget and engine.state.epoch < engine.state.max_epochs,
                "last_epoch_seconds": self._last_epoch,
                "parameters_trained": count_parameters(network, trainable=True),
                "cache_hits": getattr(cache, "hits", None),
                "cache_misses": getattr(cache, "misses", None),
                "last_loss": None if loss is None else float(torch.as_tensor(loss).detach()),
                "validation_curve": self.validation_curve,
            },
        )


def count_parameters(network: torch.nn.Module | None, trainable: bool = False) -> int | None:
    """The parameter count of ``network`` (only those with ``requires_grad`` when ``trainable``); ``None`` for
    no network."""
    if network is None:
        return None
    return int(sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable))

