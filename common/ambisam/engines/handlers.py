"""Ignite handlers the bundles share, for what MONAI's own handlers do not cover: resuming from the latest
training checkpoint when there is one, and writing an evaluation's metrics as JSON (MONAI's ``MetricsSaver``
writes the CSV beside it)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import time

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from ambisam.errors import InputError
from ambisam.io import run_record, write_json
from ambisam.outputs import write_case_outputs

__all__ = [
    "ResumeFromCheckpoint",
    "MetricsJSONWriter",
    "SamplingOutputWriter",
    "latest_checkpoint",
    "lower_is_better",
    "require_weights",
]

logger = logging.getLogger(__name__)


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for error-like key metrics (GED): a new best is a smaller value."""
    return current < best


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """The training checkpoint of the highest epoch/iteration in ``ckpt_dir`` (``<prefix>_*=<n>.pt``), if any."""
    best, best_n = None, -1
    for path in Path(ckpt_dir).glob(f"{prefix}_*.pt"):
        found = re.search(r"=(\d+)\.pt$", path.name)
        if found and int(found.group(1)) > best_n:
            best, best_n = path, int(found.group(1))
    return best


class ResumeFromCheckpoint:
    """Resume training from the latest ``CheckpointSaver`` file in a folder, when there is one.

    Loads with MONAI's ``CheckpointLoader`` (``weights_only=True``) at ``Events.STARTED``; the trainer's own
    state (epoch, iteration) comes back too, so ``max_epochs`` counts from the start of the first run.

    Args:
        ckpt_dir: the folder a ``CheckpointSaver(save_dict={"model", "optimizer", "trainer", ...})`` writes to.
        load_dict: the same objects to restore.
        prefix: the saver's ``file_prefix``.
        map_location: where to load tensors.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: Mapping, prefix: str = "checkpoint", map_location=None):
        self.ckpt_dir = ckpt_dir
        self.load_dict = dict(load_dict)
        self.prefix = prefix
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None:
            logger.info(f"no checkpoint in {self.ckpt_dir}: training from the start")
            return
        logger.info(f"resuming from {path}")
        CheckpointLoader(str(path), self.load_dict, map_location=self.map_location).attach(engine)


class MetricsJSONWriter:
    """Write an evaluation's metrics to ``<save_dir>/metrics.json`` when the evaluation completes.

    The file holds every metric's overall value, its per-case values (from handlers with ``save_details``),
    the case ids, the number of samples N and any extra fields.

    Args:
        save_dir: the output folder.
        case_ids: maps one batch's decollated output to its case ids (e.g. the images' file names).
        extra: fields written as they are (``num_samples``, settings, ...).
        filename: the file name.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        case_ids: Callable[[list], list] | None = None,
        extra: Mapping | None = None,
        filename: str = "metrics.json",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.case_ids = case_ids
        self.extra = dict(extra or {})
        self.filename = filename
        self._ids: list = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._ids.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        if self.case_ids is not None:
            self._ids.extend(str(i) for i in self.case_ids(engine.state.output))

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        details = {}
        for name, values in (getattr(engine.state, "metric_details", None) or {}).items():
            arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=float).reshape(-1)
            details[name] = [None if np.isnan(v) else float(v) for v in arr]
        overall = {k: float(v) for k, v in engine.state.metrics.items() if np.isscalar(v) or getattr(v, "ndim", 1) == 0}
        report = dict(self.extra)
        report.update(overall=overall, cases=self._ids or None, per_case=details)
        write_json(self.save_dir / self.filename, report)


def require_weights(path: str | os.PathLike, bundle: str) -> str:
    """``path`` if the trained weights are there, else one clear error saying how to get them.

    Args:
        path: the bundle's ``models/model.pt``.
        bundle: the bundle's name, for the training command in the message.

    Raises:
        InputError: no weights at ``path``.
    """
    if not Path(path).is_file():
        raise InputError(
            path,
            f"no trained weights; train them first: python -m monai.bundle run --config_file "
            f"bundles/{bundle}/configs/train.json (or pass --ckpt_path PATH to weights you have)",
        )
    return str(path)


class SamplingOutputWriter:
    """Write each case's sampling outputs as it completes, and a ``run.json`` when the run completes.

    Per case (see :func:`ambisam.outputs.write_case_outputs`): the final mask, mean, uncertainty, variance, the
    N samples (one 4D file) and ``<id>.json`` with ``record`` plus the case's seconds. Files are written in the
    geometry of ``affine_key``'s MetaTensor (the pre-processed image: the input's own geometry unless the
    pre-processing resamples, in which case invert ``pred`` first and use ``affine_key="pred"``).

    Args:
        output_dir: the output folder.
        record: what was run (bundle, version, backbone, N, seed, ...).
        pred_key: the inferer's output ``(3 + N, H, W, D)`` in each decollated item.
        affine_key: the MetaTensor whose affine the outputs get.
        threshold: the final mask is ``mean > threshold``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        record: Mapping | None = None,
        pred_key: str = "pred",
        affine_key: str = "image",
        threshold: float = 0.5,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.record = dict(record or {})
        self.pred_key = pred_key
        self.affine_key = affine_key
        self.threshold = threshold
        self.cases: dict[str, float] = {}
        self._start = self._iter_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_cases)
        engine.add_event_handler(Events.COMPLETED, self._write_run)

    def _started(self, _engine: Engine) -> None:
        self._start = time.time()
        self.cases.clear()

    def _iteration_started(self, _engine: Engine) -> None:
        self._iter_start = time.time()

    def _write_cases(self, engine: Engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        seconds = (time.time() - self._iter_start) / max(1, len(items))
        for item in items:
            ref = item[self.affine_key]
            meta = getattr(ref, "meta", {})
            case_id = str(item.get("id") or Path(str(meta.get("filename_or_obj", "case"))).name.split(".")[0])
            record = dict(self.record, seconds=seconds, image=str(meta.get("filename_or_obj", "")))
            write_case_outputs(self.output_dir, case_id, item[self.pred_key], ref.affine, record, self.threshold)
            self.cases[case_id] = seconds

    def _write_run(self, _engine: Engine) -> None:
        total = time.time() - self._start
        write_json(self.output_dir / "run.json", run_record(**self.record, cases=self.cases, seconds=total))
