"""Ignite handlers the bundles share, for what MONAI's own handlers do not cover: resuming from the latest
training checkpoint when there is one, and writing an evaluation's metrics as JSON (MONAI's ``MetricsSaver``
writes the CSV beside it)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import time

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.utils import string_list_all_gather

from ambisam.data.ids import case_id
from ambisam.errors import InputError
from ambisam.io import atomic_path, run_record, write_json
from ambisam.inferers.layout import OPTIONAL_OUTPUT_SUFFIXES, OUTPUT_NAMES
from ambisam.outputs import write_case_outputs
from ambisam.registry import method_registry
from ambisam.weights import load_weights

__all__ = [
    "ResumeFromCheckpoint",
    "MetricsReportWriter",
    "SamplingOutputWriter",
    "latest_checkpoint",
    "lower_is_better",
    "key_metric_score",
    "require_weights",
]

logger = logging.getLogger(__name__)


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for error-like key metrics (GED): a new best is a smaller value."""
    return current < best


def key_metric_score(engine: Engine) -> float:
    """``score_function`` of MONAI's ``EarlyStopHandler`` (and ignite's ``EarlyStopping``), which count a higher
    score as an improvement, for an evaluator whose key metric is error-like (:func:`lower_is_better`).

    Args:
        engine: a MONAI evaluator after a run (``engine.state.key_metric_name`` names its key metric).

    Returns:
        The key metric, negated.
    """
    return -float(engine.state.metrics[engine.state.key_metric_name])


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
    state (epoch, iteration) comes back too, so ``max_epochs`` counts from the start of the first run. When the
    resumed run completes with a newer checkpoint saved, the file it resumed from is removed.

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
        load_weights(path, "a training checkpoint")  # one clear error for a file that needs pickle
        CheckpointLoader(str(path), self.load_dict, map_location=self.map_location).attach(engine)

        def _drop_resumed(_: Engine) -> None:  # the new run's saver keeps its own latest file only
            newest = latest_checkpoint(self.ckpt_dir, self.prefix)
            if newest is not None and newest != path and path.exists():
                path.unlink()

        engine.add_event_handler(Events.COMPLETED, _drop_resumed)


class MetricsReportWriter:
    """Write an evaluation's metrics as ``metrics.json`` and ``metrics.csv`` when the evaluation completes.

    The JSON holds every metric's overall value, its per-case values (metric handlers keep them with
    ``save_details=True``, MONAI's default), the case ids, N and any extra fields; the CSV has one row per case
    and a last ``mean`` row. Metrics whose value depends on N are named with it (``ged`` -> ``ged16``). In a
    distributed evaluation it runs on every rank (it gathers every rank's case ids, as MONAI's metric buffers gather
    their values, in rank order) and writes on rank 0.

    Args:
        save_dir: the output folder.
        num_samples: N, the samples per case the metrics were computed on.
        sample_dependent: metric names that get N appended.
        case_ids: maps one iteration's (decollated) output to its case ids; default: each item's ``id``, else
            its image's file name.
        extra: fields written into the JSON as they are (settings).
        merge: add this evaluation's metrics to the report already in ``save_dir`` (a second scoring of the same
            cases, e.g. a rater-conditioned method's personalised metrics beside its distribution metrics; its
            ``extra`` fields go under ``merged``) instead of replacing it.

    Raises:
        ValueError: (when writing, ``merge``) the report there scored other cases.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        num_samples: int,
        sample_dependent: tuple[str, ...] = (
            "ged", "diversity", "hm_iou", "dice_max", "dice_mean", "hm_iou_untiled", "dice_max_pairs"),
        case_ids: Callable[[list], list] | None = None,
        extra: Mapping | None = None,
        merge: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.merge = bool(merge)
        self.num_samples = int(num_samples)
        self.sample_dependent = tuple(sample_dependent)
        self.case_ids = case_ids or self._default_ids
        self.extra = dict(extra or {})
        self._ids: list[str] = []

    @staticmethod
    def _default_ids(output: list | dict) -> list[str]:
        items = output if isinstance(output, list) else [output]
        return [case_id(item) for item in items]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._ids.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self._ids.extend(self.case_ids(e.state.output)))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _name(self, metric: str) -> str:
        return f"{metric}{self.num_samples}" if metric in self.sample_dependent else metric

    def __call__(self, engine: Engine) -> None:
        ids = list(self._ids)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank's case ids, in rank order: the order in which MONAI's metric buffers gather the values
            ids = string_list_all_gather(ids) if torch.distributed.get_world_size() > 1 else ids
            if torch.distributed.get_rank():
                return
        per_case = {}
        for name, values in (getattr(engine.state, "metric_details", None) or {}).items():
            arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=float)
            if arr.size != len(ids):  # not one value per case (e.g. pooled ECE keeps bin counts)
                continue
            per_case[self._name(name)] = [None if np.isnan(v) else float(v) for v in arr.reshape(-1)]
        overall = {
            self._name(k): None if np.isnan(float(v)) else float(v)  # undefined (NaN) is null in JSON
            for k, v in engine.state.metrics.items()
            if np.ndim(v) == 0
        }
        report = dict(self.extra, num_samples=self.num_samples, overall=overall, cases=list(ids), per_case=per_case)
        existing = self.save_dir / "metrics.json"
        if self.merge and existing.is_file():
            previous = json.loads(existing.read_text())
            if previous.get("cases") != report["cases"]:
                raise ValueError(f"{existing} scored the cases {previous.get('cases')}, not {report['cases']}")
            previous["overall"].update(overall)
            previous["per_case"].update(per_case)
            previous.setdefault("merged", []).append(dict(self.extra, num_samples=self.num_samples, metrics=list(overall)))
            report, overall, per_case = previous, previous["overall"], previous["per_case"]
        write_json(existing, report)
        names = list(overall)
        lines = [",".join(["case", *names])]
        for i, case in enumerate(ids):
            row = [per_case[n][i] if n in per_case else None for n in names]
            lines.append(",".join([case, *("" if v is None else f"{v:.6g}" for v in row)]))
        lines.append(",".join(["mean", *("" if overall[n] is None else f"{overall[n]:.6g}" for n in names)]))
        with atomic_path(self.save_dir / "metrics.csv") as tmp:
            tmp.write_text("\n".join(lines) + "\n")


def require_weights(path: str | os.PathLike, bundle: str) -> str:
    """``path`` if the trained weights are there, else one clear error saying how to get them.

    Args:
        path: the bundle's ``models/model.pt``.
        bundle: the bundle's name, for the training command in the message.

    Raises:
        InputError: no weights at ``path``, or weights that need pickle to load (refused:
            :func:`ambisam.weights.load_weights`; MONAI's ``CheckpointLoader`` would stop the run with
            PyTorch's long ``UnpicklingError`` instead).
    """
    if not Path(path).is_file():
        spec = method_registry.get(bundle)
        if spec is not None and len(spec.stages) > 1:
            how = f"python -m ambisam train {bundle} (its {len(spec.stages)} training stages in order)"
        else:
            how = f"python -m monai.bundle run --config_file bundles/{bundle}/configs/train.json"
        raise InputError(path, f"no trained weights; train them first: {how} (or pass --ckpt_path PATH to weights you have)")
    load_weights(path, f"the trained weights of {bundle}")
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
        affine_key: the MetaTensor whose affine the outputs get.
        sample_names: a name per sample: each sample is also written on its own as ``<id>_<name>.nii.gz`` (a
            rater-conditioned method's personalised masks, one per rater).

    Each decollated item must hold the split output (``ambisam.data.SplitSamplingOutputd`` in the
    post-processing): ``pred``, ``mean``, ``uncertainty``, ``variance``, ``samples``, each a tensor or, from the
    inference bundles' ``region_output``, a region of one (:mod:`ambisam.inferers.region`); each file is streamed
    plane by plane, so no output volume is built in memory.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        record: Mapping | None = None,
        affine_key: str = "image",
        sample_names: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.sample_names = None if sample_names is None else [str(n) for n in sample_names]
        self.record = dict(record or {})
        self.affine_key = affine_key
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
            case = case_id(item)
            record = dict(self.record, seconds=seconds, image=str(meta.get("filename_or_obj", "")))
            maps = {k: item[k] for k in (*OUTPUT_NAMES, *OPTIONAL_OUTPUT_SUFFIXES) if k in item}
            write_case_outputs(self.output_dir, case, maps, ref.affine, record, self.sample_names)
            self.cases[case] = seconds

    def _write_run(self, _engine: Engine) -> None:
        total = time.time() - self._start
        write_json(self.output_dir / "run.json", run_record(**self.record, cases=self.cases, seconds=total))
