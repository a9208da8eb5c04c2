"""One benchmark for every method and the field's baselines, with the same data, split, prompts and metrics.

``python -m ambisam benchmark --data DATALIST --methods psam,seqsam,baseline,... --samples 16 --out DIR`` runs,
for each method and seed, one *job* (in a fresh Python process by default, so that its peak memory is its
own):

1. **train** on the ``training`` split, within ``--budget`` minutes: a bundle method runs its bundle's own
   ``train.json`` (through :func:`ambisam.demo.run_bundle`, as ``python -m monai.bundle run`` would) with
   the benchmark's data, seed, N and folders as overrides and :class:`TrainingBudget` added to its handlers
   (it ends training at an epoch end when the next epoch would not fit, or mid-epoch when one epoch alone
   overruns, and validates the last epoch if the bundle's ``val_interval`` skipped it, so that the saved best
   weights have seen it). A method without a bundle
   (``prob_unet``) trains through the *harness* bundle's ``train.json`` (``psam``'s) with its network and
   loss swapped in, so it sees the same slices, boxes and epochs. Training-free methods skip this step.
2. **evaluate** on the ``test`` split through the same bundle's ``evaluate.json`` (the harness's for the
   methods without a bundle): every method gets the same volumes, the same boxes (the raters' union per
   slice, no jitter), the same seed and the same metric handlers, and writes ``metrics.json``.
   :class:`EvaluationRecorder` is added to the evaluator's handlers: it times the sampling inferer, pools the
   calibration statistics for the reliability diagram and keeps the slices the figures show.

Every job shares one on-disk embedding cache (``DIR/embeddings``: the frozen encoder's embeddings depend on the
slice only), wrapped as :class:`TimedEmbeddingCache`: the time spent encoding a slice for the first time is a
one-time cost of the shared encoder, so it is reported apart and counts neither against a training budget nor
in a method's ms per sample.

The parent process then writes ``DIR/results.json`` (one object per method, mean and standard deviation
over seeds), ``DIR/results.md`` (the table) and the figures (:mod:`ambisam.benchmark_report`), and
``DIR/run.json`` (what was run: settings, versions, time). A method whose bundle does not exist yet is listed
as ``unavailable``; a job that fails is listed as ``failed`` with its error, and the other methods still run.
Running the same command on the same ``DIR`` again reuses every job already completed with the same settings
(``--rerun`` to redo them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import optional_import

from ambisam.errors import InputError
from ambisam.io import run_record, write_json
from ambisam.sam.cache import EmbeddingCache

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "MethodSpec",
    "METHODS",
    "HARNESS_BUNDLE",
    "METRIC_KEYS",
    "TimedEmbeddingCache",
    "TrainingBudget",
    "EvaluationRecorder",
    "method_availability",
    "run_job",
    "run_benchmark",
    "summarize_jobs",
]

logger = logging.getLogger(__name__)

#: the bundle whose configs train and evaluate the methods that have no bundle of their own
HARNESS_BUNDLE = "psam"

#: the metrics of every result, in table order (names as in ``results.json``, without N)
METRIC_KEYS = ("ged", "diversity", "hm_iou", "dice_max", "dice_mean", "soft_dice", "ncc", "ece")


def _sam_network(target: str, **kwargs: Any) -> dict:
    """A ``network_def`` for a SAM-based method on the config's backbone."""
    return {"_target_": target, "backbone": "@backbone", "checkpoint": "@backbone_checkpoint", **kwargs}


@dataclass(frozen=True)
class MethodSpec:
    """How the benchmark trains and evaluates one method.

    Args:
        name: the name in ``--methods``.
        kind: ``"bundle"`` (its own MONAI bundle), ``"trained"`` (trained through the harness bundle's configs)
            or ``"training_free"`` (evaluated through the harness bundle's configs, nothing trained).
        description: one line for the report.
        bundle: the bundle folder under ``bundles/`` (``kind="bundle"``; else the harness).
        train_configs: the bundle's training configs in merge order (``("train", "train_mcl")``); empty for a
            training-free bundle, which is evaluated as ``eval_base`` + ``evaluate``.
        eval_base: the configs ``evaluate.json`` is merged over; default ``train_configs``.
        network_def: the network swapped into the harness configs (``kind`` ``"trained"``/``"training_free"``).
        overrides: further config overrides for this method's training and evaluation.
        deterministic: its samples do not depend on the seed (run once whatever ``--seeds``).
    """

    name: str
    kind: str
    description: str
    bundle: str = HARNESS_BUNDLE
    train_configs: tuple[str, ...] = ("train",)
    eval_base: tuple[str, ...] | None = None
    network_def: Mapping | None = None
    overrides: Mapping = field(default_factory=dict)
    deterministic: bool = False

    @property
    def trains(self) -> bool:
        return self.kind != "training_free" and bool(self.train_configs)

    @property
    def eval_configs(self) -> tuple[str, ...]:
        base = self.train_configs if self.eval_base is None else self.eval_base
        return (*base, "evaluate")


#: every method the benchmark knows, by ``--methods`` name
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("psam", "bundle", "pSAM: latent code on the box prompt (Ward & Imran 2025)", bundle="psam"),
        MethodSpec("seqsam", "bundle", "SeqSAM: recurrent set of masks, Hungarian set loss", bundle="seqsam"),
        MethodSpec("mcl", "bundle", "multiple choice learning on SAM's multimask heads (SeqSAM's baseline)",
                   bundle="seqsam", train_configs=("train", "train_mcl")),
        MethodSpec("p2sam", "bundle", "P2SAM: probabilistic prompt generation", bundle="p2sam"),
        MethodSpec("proseg", "bundle", "ProSeg: rater-preference and image-ambiguity latents", bundle="proseg"),
        MethodSpec("ursam", "bundle", "UR-SAM: prompt augmentation and uncertainty rectification (training-free)",
                   bundle="ursam", train_configs=(), eval_base=("inference",)),
        MethodSpec("baseline", "training_free", "deterministic box-prompted SAM (every sample the same)",
                   network_def=_sam_network("ambisam.networks.BoxPromptedSam"), deterministic=True),
        MethodSpec("multimask", "training_free", "SAM's 3 multimask outputs as 3 hypotheses, tiled to N",
                   network_def=_sam_network("ambisam.networks.MultimaskSam"), deterministic=True),
        MethodSpec("jitter", "training_free", "prompt-jitter ensemble: N boxes moved by up to 10% of their side",
                   network_def=_sam_network("ambisam.networks.PromptJitterSam")),
        MethodSpec("mc_dropout", "training_free", "MC dropout (p = 0.1) in the mask decoder's MLPs at sampling",
                   network_def=_sam_network("ambisam.networks.McDropoutSam")),
        MethodSpec(
            "prob_unet",
            "trained",
            "Probabilistic U-Net (Kohl et al. 2018) from scratch, MONAI BasicUNet, box as input channel",
            network_def={"_target_": "ambisam.networks.ProbabilisticUNet"},
            overrides={
                "loss": "$@network.default_loss()",
                "learning_rate": 1e-4,
                "max_epochs": 50,
                # nothing to encode: the image on a 128 x 128 grid is its "embedding"
                "train#trainer#embedding_cache": None,
                "validate#inferer#cache": None,
            },
        ),
    )
}


# ------------------------------------------------------------------------------------------------- handlers
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


def _encoding_seconds(clock: Any) -> float:
    return float(getattr(clock, "encoding_seconds", 0.0) or 0.0)


class TrainingBudget:
    """End training when its time budget is spent, at a point where the best weights are saved.

    At each epoch end (after validation and the checkpoint savers of the bundle, which are attached first),
    training stops when the time used plus the last epoch's time would exceed the budget. When one epoch alone
    runs past the budget, it is ended early (``terminate_epoch``: its validation still runs), then training
    stops. Time spent encoding slices for the first time (``clock``'s ``encoding_seconds``) is not counted.
    When the last epoch (by the budget or by ``max_epochs``) is one the bundle does not validate
    (``epoch % val_interval != 0``), ``validator`` runs once more, so that the saved best weights have seen it.
    At completion a JSON record is written: epochs and iterations run, the budgeted seconds and the encoding
    seconds, whether the budget stopped it, the trainable parameter count, the embedding cache's hits and
    misses, the last loss.

    Args:
        seconds: the budget in seconds (``None`` or ``inf``: no limit, only the record).
        record_path: where the JSON record goes.
        clock: an object whose ``encoding_seconds`` grows while slices are encoded (:class:`TimedEmbeddingCache`),
            or ``None``.
        validator: the bundle's validation evaluator (``@validate#evaluator``), or ``None``.
        val_interval: the epochs between the bundle's validations.
    """

    def __init__(
        self,
        seconds: float | None,
        record_path: str | os.PathLike,
        clock: Any = None,
        validator: Engine | None = None,
        val_interval: int = 1,
    ) -> None:
        self.seconds = math.inf if seconds is None else float(seconds)
        self.record_path = Path(record_path)
        self.clock = clock
        self.validator = validator
        self.val_interval = max(1, int(val_interval))
        self._encoding_start = 0.0
        self._start = self._epoch_start = 0.0
        self._last_epoch = 0.0
        self._start_epoch = 0
        self.stopped_by_budget = False
        self.ended_epoch_early = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _now(self) -> float:
        """A clock that stands still while slices are encoded for the first time."""
        return time.perf_counter() - _encoding_seconds(self.clock)

    def elapsed(self) -> float:
        """Budgeted seconds since training started."""
        return self._now() - self._start

    def _started(self, engine: Engine) -> None:
        self._start = self._now()
        self._encoding_start = _encoding_seconds(self.clock)
        self._start_epoch = int(engine.state.epoch)  # > 0 when resumed
        self.stopped_by_budget = self.ended_epoch_early = False

    def _epoch_started(self, _engine: Engine) -> None:
        self._epoch_start = self._now()

    def _iteration_completed(self, engine: Engine) -> None:
        if not self.ended_epoch_early and self.elapsed() > self.seconds:
            self.ended_epoch_early = True
            engine.terminate_epoch()

    def _epoch_completed(self, engine: Engine) -> None:
        self._last_epoch = self._now() - self._epoch_start
        last = engine.state.epoch >= engine.state.max_epochs
        if not last and (self.ended_epoch_early or self.elapsed() + self._last_epoch > self.seconds):
            self.stopped_by_budget = last = True
        if last and self.validator is not None and engine.state.epoch % self.val_interval:
            self.validator.run(engine.state.epoch)  # the bundle's interval skipped the last epoch
        if self.stopped_by_budget:
            engine.terminate()

    def _completed(self, engine: Engine) -> None:
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
                "encoding_seconds": _encoding_seconds(self.clock) - self._encoding_start,
                "epochs": int(engine.state.epoch),
                "epochs_this_run": int(engine.state.epoch) - self._start_epoch,
                "max_epochs": int(engine.state.max_epochs),
                "iterations": int(engine.state.iteration),
                "stopped_by_budget": self.stopped_by_budget,
                "last_epoch_seconds": self._last_epoch,
                "parameters_trained": _count_parameters(network, trainable=True),
                "cache_hits": getattr(cache, "hits", None),
                "cache_misses": getattr(cache, "misses", None),
                "last_loss": None if loss is None else float(loss),
            },
        )


def _count_parameters(network: torch.nn.Module | None, trainable: bool = False) -> int | None:
    if network is None:
        return None
    return int(sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable))


class EvaluationRecorder:
    """What the benchmark needs from an evaluation beyond the metrics.

    - the sampling inferer's wall time (``ITERATION_STARTED`` to ``FORWARD_COMPLETED``: loading and metrics
      excluded) and the number of prompted slices it sampled;
    - the pooled calibration statistics of the mean prediction against the raters' fraction
      (:func:`~ambisam.metrics.ece_bin_statistics` summed over every test case: the reliability diagram);
    - for the first ``figure_cases`` cases, the slice where the raters' union is largest: image, raters, the
      samples, mean and uncertainty (``<save_dir>/cases/<id>.npz``).

    Time the inferer's embedding cache spends encoding slices for the first time (``clock``) is reported apart
    (``encoding_seconds``) and left out of ``ms_per_sample``, which is then the sampling cost of the method on a
    cached embedding (as ``bench sampling``'s decoder ms per sample).

    Written at completion to ``<save_dir>/recorder.json``. The evaluator's post-processing must split the
    inferer's output (:class:`~ambisam.data.SplitSamplingOutputd`), as every bundle's does.

    Args:
        save_dir: the output folder.
        num_samples: N.
        figure_cases: how many cases to keep for the figures.
        n_bins: calibration bins.
        clock: the inferer's :class:`TimedEmbeddingCache`, or ``None``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        num_samples: int,
        figure_cases: int = 4,
        n_bins: int = 10,
        clock: Any = None,
    ):
        self.clock = clock
        self.save_dir = Path(save_dir)
        self.num_samples = int(num_samples)
        self.figure_cases = int(figure_cases)
        self.n_bins = int(n_bins)
        self._reset()

    def _reset(self, _engine: Engine | None = None) -> None:
        self.sampling_seconds = 0.0
        self._encoding_start = _encoding_seconds(self.clock)
        self.sampled_slices = 0
        self.cases: list[str] = []
        self.bins = np.zeros((3, self.n_bins))
        self._kept: dict[str, dict] = {}
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _iteration_started(self, _engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _forward_completed(self, engine: Engine) -> None:
        self.sampling_seconds += time.perf_counter() - self._t0
        batch = engine.state.batch
        box = batch.get("box") if isinstance(batch, Mapping) else None
        if box is not None:
            self.sampled_slices += int((torch.as_tensor(box) >= 0).all(dim=-1).sum())
        elif isinstance(batch, Mapping) and "image" in batch:  # prompt-free: every slice is sampled
            image = batch["image"]
            self.sampled_slices += int(image.shape[0] * (image.shape[-1] if image.ndim == 5 else 1))

    def _collect(self, engine: Engine) -> None:
        from ambisam.figures import lesion_slice
        from ambisam.metrics import ece_bin_statistics

        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            label = _numpy(item["label"]) > 0  # (K, H, W[, D])
            mean = _numpy(item["mean"])[0]
            self.bins += ece_bin_statistics(mean, label, self.n_bins)
            meta = getattr(item.get("image"), "meta", {})
            case = str(item.get("id") or Path(str(meta.get("filename_or_obj", "case"))).name.split(".")[0])
            self.cases.append(case)
            if len(self._kept) < self.figure_cases:
                self._kept[case] = self._figure_slice(item, label, lesion_slice)

    @staticmethod
    def _figure_slice(item: Mapping, label: np.ndarray, lesion_slice) -> dict:
        volume = label.ndim == 4
        k = lesion_slice(label) if volume else 0
        pick = (lambda a: a[..., k]) if volume else (lambda a: a)  # noqa: E731
        return {
            "image": pick(_numpy(item["image"]))[0].astype(np.float32),
            "raters": pick(label).astype(np.uint8),
            "samples": pick(_numpy(item["samples"])).astype(np.uint8),
            "mean": pick(_numpy(item["mean"]))[0].astype(np.float32),
            "uncertainty": pick(_numpy(item["uncertainty"]))[0].astype(np.float32),
            "slice": np.int64(k),
        }

    def _write(self, _engine: Engine) -> None:
        from ambisam.io import atomic_path

        for case, arrays in self._kept.items():
            with atomic_path(self.save_dir / "cases" / f"{case}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
        per_sample = self.sampled_slices * self.num_samples
        encoding = _encoding_seconds(self.clock) - self._encoding_start
        misses = getattr(self.clock, "misses", None)
        sampling = self.sampling_seconds - encoding
        write_json(
            self.save_dir / "recorder.json",
            {
                "num_samples": self.num_samples,
                "cases": self.cases,
                "figure_cases": list(self._kept),
                "sampling_seconds": sampling,
                "encoding_seconds": encoding,
                "encoded_slices": misses,
                "encoder_ms_per_slice": 1000 * encoding / misses if misses else None,
                "sampled_slices": self.sampled_slices,
                "ms_per_sample": 1000 * sampling / per_sample if per_sample else None,
                "ms_per_slice": 1000 * sampling / self.sampled_slices if self.sampled_slices else None,
                "reliability_bins": self.bins.tolist(),
                "parameters_total": _count_parameters(getattr(_engine, "network", None)),
            },
        )


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return (x.as_tensor() if hasattr(x, "as_tensor") else x).detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------- one job
def method_availability(spec: MethodSpec) -> str | None:
    """Why ``spec`` cannot run here (its bundle or one of its configs is missing), or ``None`` when it can."""
    from ambisam.demo import bundle_dir

    folder = bundle_dir(spec.bundle) / "configs"
    needed = ["metadata.json", *(f"{c}.json" for c in (*spec.train_configs, *spec.eval_configs))]
    missing = [n for n in dict.fromkeys(needed) if not (folder / n).is_file()]
    if not missing:
        return None
    if not folder.parent.is_dir():
        return f"bundle '{spec.bundle}' does not exist yet (no bundles/{spec.bundle})"
    return f"bundle '{spec.bundle}' lacks configs/{', configs/'.join(missing)}"


def _merged_config(bundle: str, configs: Sequence[str]):
    """A ``ConfigParser`` over a bundle's merged configs (raw content, nothing instantiated)."""
    from monai.bundle import ConfigParser

    from ambisam.demo import bundle_dir

    folder = bundle_dir(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(folder / f"{c}.json") for c in configs])
    return parser


def _is_checkpoint_loader(handler: Any) -> bool:
    return isinstance(handler, Mapping) and str(handler.get("_target_", "")).endswith("CheckpointLoader")


def run_job(job: Mapping) -> dict:
    """Train (when the method trains) and evaluate one method with one seed; write ``<job_dir>/result.json``.

    Args:
        job: the settings (see :func:`run_benchmark`): ``method``, ``seed``, ``job_dir``, ``datalist``,
            ``num_samples``, ``budget_seconds``, ``max_epochs``, ``backbone``, ``checkpoint``, ``modality``,
            ``window``, ``num_raters``, ``figure_cases``, ``cache_dir``, ``threads``.

    Returns:
        The result: ``status`` ``"ok"``, the metrics, timings, memory and parameter counts.
    """
    from ambisam.demo import BASELINE_EVAL_OVERRIDES, run_bundle

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    spec = METHODS[job["method"]]
    job_dir = Path(job["job_dir"])
    datalist = Path(job["datalist"])
    common: dict[str, Any] = {
        "datalist": str(datalist),
        "dataset_dir": str(datalist.parent),
        "seed": int(job["seed"]),
        "num_samples": int(job["num_samples"]),
        "backbone": job["backbone"],
        "backbone_checkpoint": job.get("checkpoint"),
        "modality": job["modality"],
        "window": list(job["window"]),
        "ckpt_dir": str(job_dir / "models"),
        "output_dir": str(job_dir / "train"),
    }
    has_cache = "embedding_cache" in _merged_config(spec.bundle, spec.eval_configs)
    if has_cache:  # one on-disk cache for all jobs, timed so that first-time encoding is reported apart
        common["embedding_cache#_target_"] = "ambisam.benchmark.TimedEmbeddingCache"
        common["embedding_cache#cache_dir"] = job.get("cache_dir")
    clock = "@embedding_cache" if has_cache else None
    if job.get("num_raters") is not None:
        common["num_raters"] = int(job["num_raters"])
    if spec.kind != "bundle":
        common["network_def"] = dict(spec.network_def or {})
    common.update(spec.overrides)
    if job.get("max_epochs") is not None:
        common["max_epochs"] = int(job["max_epochs"])

    training: dict[str, Any] = {}
    train_seconds = 0.0
    if spec.trains:
        record = job_dir / "train" / "budget.json"
        handlers = list(_merged_config(spec.bundle, spec.train_configs).get("train#handlers"))
        handlers.append({"_target_": "ambisam.benchmark.TrainingBudget", "seconds": job.get("budget_seconds"),
                         "record_path": str(record), "clock": clock, "validator": "@validate#evaluator",
                         "val_interval": "@val_interval"})
        started = time.perf_counter()
        run_bundle(spec.bundle, list(spec.train_configs), **common, **{"train#handlers": handlers})
        train_seconds = time.perf_counter() - started
        training = json.loads(record.read_text()) if record.is_file() else {}

    eval_dir = job_dir / "evaluate"
    handlers = list(_merged_config(spec.bundle, spec.eval_configs).get("validate#handlers"))
    if spec.kind == "training_free":
        handlers = [dict(h, _disabled_=True) if _is_checkpoint_loader(h) else h for h in handlers]
    handlers.append({"_target_": "ambisam.benchmark.EvaluationRecorder", "save_dir": str(eval_dir),
                     "num_samples": "@num_samples", "figure_cases": int(job.get("figure_cases", 4)), "clock": clock})
    handlers.append({"_target_": "ignite.handlers.ProgressBar", "desc": f"evaluating {spec.name} (test cases)"})
    evaluate = dict(common, eval_dir=str(eval_dir), **{"validate#handlers": handlers})
    if spec.kind == "training_free":
        evaluate["initialize"] = list(BASELINE_EVAL_OVERRIDES["initialize"])  # no weights to require
    started = time.perf_counter()
    run_bundle(spec.bundle, list(spec.eval_configs), **evaluate)
    eval_seconds = time.perf_counter() - started

    report = json.loads((eval_dir / "metrics.json").read_text())
    recorded = json.loads((eval_dir / "recorder.json").read_text())
    n = int(job["num_samples"])
    metrics = {}
    for key in METRIC_KEYS:
        value = report["overall"].get(f"{key}{n}", report["overall"].get(key))
        metrics[key] = None if value is None or not np.isfinite(value) else float(value)
    result = {
        "method": spec.name,
        "seed": int(job["seed"]),
        "status": "ok",
        "kind": spec.kind,
        "bundle": spec.bundle,
        "settings": job.get("settings"),
        "metrics": metrics,
        "num_samples": n,
        "test_cases": len(recorded["cases"]),
        "timings": {
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "train_budgeted_seconds": training.get("seconds"),
            "train_encoding_seconds": training.get("encoding_seconds"),
            "sampling_seconds": recorded["sampling_seconds"],
            "encoding_seconds": recorded["encoding_seconds"],
            "encoder_ms_per_slice": recorded["encoder_ms_per_slice"],
            "sampled_slices": recorded["sampled_slices"],
            "ms_per_sample": recorded["ms_per_sample"],
            "ms_per_slice": recorded["ms_per_slice"],
        },
        "memory": {"peak_rss_mb": peak_rss_mb(), "scope": job.get("memory_scope", "job process")},
        "parameters_trained": int(training.get("parameters_trained") or 0) if spec.trains else 0,
        "parameters_total": recorded.get("parameters_total"),
        "training": training,
        "reliability_bins": recorded["reliability_bins"],
        "figure_cases": recorded["figure_cases"],
    }
    write_json(job_dir / "result.json", result)
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``resource.getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _job_main(job_file: str) -> None:
    """Entry point of a job's own process: ``python -m ambisam.benchmark JOB.json``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    run_job(json.loads(Path(job_file).read_text()))


# ------------------------------------------------------------------------------------------------- the run
def _parse_methods(methods: str | Sequence[str]) -> list[str]:
    names = methods.split(",") if isinstance(methods, str) else [str(m) for m in methods]
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise InputError(None, f"unknown method(s) {unknown or names}; choose from {', '.join(METHODS)}")
    return names


def _parse_window(window: str | Sequence[float]) -> tuple[float, float]:
    try:
        values = [float(v) for v in (window.split(",") if isinstance(window, str) else window)]
        assert len(values) == 2 and values[0] < values[1]
    except (ValueError, TypeError, AssertionError) as e:
        raise InputError(None, f"window must be 'low,high' with low < high, got {window!r}") from e
    return values[0], values[1]


def _resolve_datalist(data: str | os.PathLike) -> Path:
    """The datalist file: ``data`` itself, or ``data/datalist.json`` (written as the synthetic default when
    ``data`` is a new or empty folder, as the bundles do)."""
    from ambisam.data import ensure_dataset

    path = Path(data)
    if path.is_file():
        return path.resolve()
    if path.suffix == ".json":
        raise InputError(path, "datalist file not found")
    return ensure_dataset(path).resolve()


def _check_data(datalist: Path, needs_training: bool) -> dict[str, int]:
    from ambisam.data import load_datalist

    counts = {}
    for split in ("training", "validation", "test"):
        counts[split] = len(load_datalist(datalist, split))
    if counts["test"] == 0:
        raise InputError(datalist, "the 'test' list is empty: the benchmark evaluates on it")
    if needs_training and (counts["training"] == 0 or counts["validation"] == 0):
        raise InputError(datalist, "the trained methods need non-empty 'training' and 'validation' lists")
    return counts


def _launch(job: dict, isolate: bool) -> dict:
    """Run one job (in its own process when ``isolate``) and return its result, or a failure record."""
    job_dir = Path(job["job_dir"])
    result_path = job_dir / "result.json"
    if result_path.exists():
        result_path.unlink()
    try:
        job_file = write_json(job_dir / "job.json", job)  # what this job runs, beside its outputs
        if isolate:
            done = subprocess.run([sys.executable, "-m", "ambisam.benchmark", str(job_file)], check=False)
            if done.returncode != 0 or not result_path.is_file():
                raise RuntimeError(f"job process exited with status {done.returncode} (its log is above)")
            return json.loads(result_path.read_text())
        return run_job(dict(job, memory_scope="benchmark process (not isolated)"))
    except Exception as e:  # noqa: BLE001 - one failing method must not stop the others
        logger.exception(f"benchmark: {job['method']} seed {job['seed']} failed")
        return {"method": job["method"], "seed": job["seed"], "status": "failed", "reason": f"{type(e).__name__}: {e}"}


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), (float(np.std(finite)) if len(finite) > 1 else None)


def summarize_jobs(name: str, jobs: list[dict]) -> dict:
    """One method's entry of ``results.json`` from its jobs (one per seed): means and standard deviations
    over seeds (population std; ``None`` for a single run), summed calibration bins, worst peak memory.

    Args:
        name: the method.
        jobs: its job results (``status`` ``"ok"``; a failed seed makes the whole method ``failed``).

    Returns:
        The entry: ``method``, ``status``, the metrics (means), ``std``, ``num_samples``, ``seeds``,
        ``timings``, ``memory``, ``parameters_trained``, ``parameters_total``, ``per_seed``, ...
    """
    spec = METHODS[name]
    failed = [j for j in jobs if j.get("status") != "ok"]
    if failed:
        return {"method": name, "status": "failed", "kind": spec.kind, "description": spec.description,
                "reason": "; ".join(f"seed {j['seed']}: {j.get('reason')}" for j in failed)}
    entry: dict[str, Any] = {"method": name, "status": "ok", "kind": spec.kind, "description": spec.description}
    std = {}
    for key in METRIC_KEYS:
        entry[key], std[key] = _mean_std([j["metrics"][key] for j in jobs])
    timing_keys = ("train_seconds", "train_budgeted_seconds", "train_encoding_seconds", "eval_seconds",
                   "sampling_seconds", "encoding_seconds", "encoder_ms_per_slice", "ms_per_sample", "ms_per_slice")
    entry.update(
        std=std,
        num_samples=jobs[0]["num_samples"],
        seeds=[j["seed"] for j in jobs],
        deterministic=spec.deterministic,
        test_cases=jobs[0]["test_cases"],
        timings={k: _mean_std([j["timings"][k] for j in jobs])[0] for k in timing_keys}
        | {"sampled_slices": jobs[0]["timings"]["sampled_slices"]},
        memory={"peak_rss_mb": max(j["memory"]["peak_rss_mb"] for j in jobs), "scope": jobs[0]["memory"]["scope"]},
        parameters_trained=jobs[0]["parameters_trained"],
        parameters_total=jobs[0]["parameters_total"],
        training=[j["training"] for j in jobs] if spec.trains else [],
        reliability_bins=np.sum([j["reliability_bins"] for j in jobs], axis=0).tolist(),
        per_seed=[{"seed": j["seed"], **j["metrics"]} for j in jobs],
    )
    return entry


def run_benchmark(
    data: str | os.PathLike = "data/synthetic",
    methods: str | Sequence[str] = "psam,baseline,multimask,jitter,mc_dropout,prob_unet",
    samples: int = 16,
    out: str | os.PathLike = "runs/benchmark",
    budget: float | None = 3.0,
    seeds: int = 1,
    max_epochs: int | None = None,
    backbone: str = "litemedsam",
    checkpoint: str | None = None,
    modality: str = "ct",
    window: str | Sequence[float] = (-1000, 400),
    num_raters: int | None = None,
    figure_cases: int = 4,
    threads: int | None = None,
    isolate: bool = True,
    rerun: bool = False,
) -> list[dict]:
    """Train (or reuse), evaluate and compare methods; see the module docstring.

    Args:
        data: a datalist JSON file, or a folder holding ``datalist.json`` (a new or empty folder gets the
            synthetic default data set, as the bundles do).
        methods: names in :data:`METHODS`, comma-separated or a sequence.
        samples: N, the samples per prompted slice.
        out: the output folder.
        budget: training minutes per method and seed (``None``: no limit, the bundle's ``max_epochs``).
        seeds: seeds ``0 .. seeds - 1``; deterministic methods run once.
        max_epochs: overrides every trained method's ``max_epochs`` (default: the bundle's own; 50 for
            ``prob_unet``).
        backbone: SAM backbone registry name.
        checkpoint: backbone weights, where the backbone needs them.
        modality: ``ct``, ``mri`` or ``none`` (intensity scaling, as the bundles'; ``none`` for converted
            LIDC JPEG crops).
        window: the CT window (``ct`` only).
        num_raters: raters per case (default: the bundle's own, 4).
        figure_cases: test cases drawn in the per-case figures.
        threads: torch threads per job.
        isolate: one process per job (peak memory per job); ``False`` runs in this process.
        rerun: redo jobs whose result with the same settings is already in ``out``.

    Returns:
        The entries written to ``results.json``.

    Raises:
        InputError: bad arguments or data, before anything is written.
    """
    from ambisam.benchmark_report import write_report

    names = _parse_methods(methods)
    if int(samples) < 1 or int(seeds) < 1 or int(figure_cases) < 0:
        raise InputError(None, f"samples and seeds must be >= 1, figure_cases >= 0; got {samples}, {seeds}, {figure_cases}")
    if budget is not None and not float(budget) > 0:
        raise InputError(None, f"budget must be a positive number of minutes, got {budget}")
    if max_epochs is not None and int(max_epochs) < 1:
        raise InputError(None, f"max_epochs must be >= 1, got {max_epochs}")
    if str(modality).lower() not in ("ct", "mri", "none"):
        raise InputError(None, f"modality must be ct, mri or none, got {modality!r}")
    low, high = _parse_window(window)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    unavailable = {n: method_availability(METHODS[n]) for n in names}
    runnable = [n for n in names if unavailable[n] is None]
    datalist = _resolve_datalist(data)
    counts = _check_data(datalist, any(METHODS[n].trains for n in runnable))

    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "datalist": str(datalist),
        "num_samples": int(samples),
        "budget_minutes": None if budget is None else float(budget),
        "max_epochs": None if max_epochs is None else int(max_epochs),
        "backbone": backbone,
        "checkpoint": checkpoint,
        "modality": str(modality).lower(),
        "window": [low, high],
        "num_raters": None if num_raters is None else int(num_raters),
    }
    jobs = []
    for name in runnable:
        for seed in range(1 if METHODS[name].deterministic else int(seeds)):
            job_dir = (out / name / f"seed{seed}").resolve()
            jobs.append({
                **settings,
                "method": name,
                "seed": seed,
                "job_dir": str(job_dir),
                "window": [low, high],
                "budget_seconds": None if budget is None else 60.0 * float(budget),
                "figure_cases": int(figure_cases),
                "cache_dir": str((out / "embeddings").resolve()),
                "threads": threads,
                "settings": dict(settings, method=name, seed=seed),
            })

    results: dict[str, list[dict]] = {n: [] for n in runnable}
    progress = tqdm(jobs, desc="benchmark", unit="job") if _has_tqdm else jobs
    for job in progress:
        if _has_tqdm:
            progress.set_postfix_str(f"{job['method']} seed {job['seed']}")
        job_dir = Path(job["job_dir"])
        if (job_dir / "result.json").is_file():
            old = json.loads((job_dir / "result.json").read_text())
            if not rerun and old.get("status") == "ok" and old.get("settings") == job["settings"]:
                logger.info(f"benchmark: reusing {job_dir / 'result.json'}")
                results[job["method"]].append(old)
                continue
            # other settings, or --rerun: start over (a job that died without a result resumes its training)
            for stale in ("models", "train", "evaluate"):
                shutil.rmtree(job_dir / stale, ignore_errors=True)
        results[job["method"]].append(_launch(job, isolate))

    entries = []
    for name in names:
        if unavailable[name] is not None:
            spec = METHODS[name]
            entries.append({"method": name, "status": "unavailable", "kind": spec.kind,
                            "description": spec.description, "reason": unavailable[name]})
        else:
            entries.append(summarize_jobs(name, results[name]))
    seconds = time.time() - started
    record = run_record(
        job="benchmark",
        methods=names,
        seeds=int(seeds),
        figure_cases=int(figure_cases),
        threads=threads or torch.get_num_threads(),
        isolate=bool(isolate),
        counts=counts,
        machine=f"{platform.machine()} {platform.processor()}".strip(),
        cpu_count=os.cpu_count(),
        device="cuda" if torch.cuda.is_available() else "cpu",
        seconds=seconds,
        load_average={"start": load_before, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        **settings,
    )
    write_report(out, entries, record)
    write_json(out / "run.json", record)
    for entry in entries:
        if entry["status"] == "ok":
            print(f"{entry['method']:11s} " + "  ".join(
                f"{k} {entry[k]:.3f}" if entry[k] is not None else f"{k} n/a" for k in ("ged", "hm_iou", "dice_max")))
        else:
            print(f"{entry['method']:11s} {entry['status']}: {entry['reason']}")
    print(f"results: {out / 'results.md'}  {out / 'results.json'}  figures: {out / 'figures'}")
    return entries


if __name__ == "__main__":
    _job_main(sys.argv[1])
