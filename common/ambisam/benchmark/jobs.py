"""One benchmark job: one method with one seed, trained stage by stage (when it trains) and evaluated through
its bundle's own configs (the harness bundle's, network swapped in, for a method without a bundle).

A job runs in its own process as ``python -m ambisam.benchmark JOB.json`` (:func:`job_main`), or in the caller's
(:func:`run_job`), and writes ``<job_dir>/result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambisam.errors import InputError
from ambisam.io import write_json
from ambisam.registry import MethodSpec, get_method

__all__ = [
    "METRIC_KEYS",
    "OPTIONAL_METRIC_KEYS",
    "method_implemented",
    "method_availability",
    "method_kind",
    "run_job",
    "peak_rss_mb",
    "job_main",
]

logger = logging.getLogger(__name__)

#: the metrics of every result, in table order (names as in ``results.json``, without N). ``soft_dice`` and ``ece``
#: take the fraction of binary samples as the confidence, ``soft_dice_prob`` and ``ece_prob`` the mean sigmoid
#: probability; ``ncc`` is computed on the samples' probability maps and ``ncc_undefined_raters`` counts the
#: (case, rater) pairs where it was undefined; ``presence_gap`` is the mean over test cases of
#: ``|samples_empty - raters_empty|``, the fractions of empty samples and of empty raters (means over cases);
#: ``hm_iou_untiled`` and ``dice_max_pairs`` are P2SAM's evaluation conventions (more lenient; not in the table).
METRIC_KEYS = ("ged", "diversity", "hm_iou", "dice_max", "dice_mean", "soft_dice", "ncc", "ece", "presence_gap",
               "soft_dice_prob", "ece_prob", "ncc_undefined_raters", "samples_empty", "raters_empty", "hm_iou_untiled",
               "dice_max_pairs")
#: metrics only some evaluations score (a rater-conditioned method's personalised scoring; the raters' own
#: diversity, which evaluations before 0.2.x did not write); a result has them where its evaluation wrote them
OPTIONAL_METRIC_KEYS = ("personalised_dice", "personalised_dice_hungarian", "personalised_dice_shuffled",
                        "rater_diversity")

#: an evaluation's ``initialize`` for a method with no weights to load (the bundles' own requires them)
def method_implemented(spec: MethodSpec) -> bool:
    """Whether ``spec``'s network class imports (P2SAM, ProSeg and UR-SAM are registered before they exist)."""
    try:
        spec.network_class
    except InputError:
        return False
    return True


def method_availability(spec: MethodSpec) -> str | None:
    """Why ``spec`` cannot run here, or ``None`` when it can.

    Args:
        spec: the method.

    Returns:
        ``None``, or the reason: its network class does not import (not implemented yet), or its bundle or one
        of the configs its stages and evaluation name is missing.
    """
    from ambisam.bundle import bundle_dir

    if not method_implemented(spec):
        return f"method '{spec.name}' is not implemented yet (no network class {spec.network})"
    folder = bundle_dir(spec.config_bundle) / "configs"
    configs = [c for stage in spec.stages for c in stage] + list(spec.eval_configs)
    needed = ["metadata.json", *(f"{c}.json" for c in configs)]
    missing = [n for n in dict.fromkeys(needed) if not (folder / n).is_file()]
    if not missing:
        return None
    if not folder.parent.is_dir():
        return f"bundle '{spec.config_bundle}' does not exist yet (no bundles/{spec.config_bundle})"
    return f"bundle '{spec.config_bundle}' lacks configs/{', configs/'.join(missing)}"


def method_kind(spec: MethodSpec) -> str:
    """How the benchmark runs ``spec``, as ``results.json`` states it: ``"training_free"`` (nothing trained),
    ``"bundle"`` (trained by its own bundle) or ``"trained"`` (trained through the harness bundle)."""
    if not spec.trainable:
        return "training_free"
    return "bundle" if spec.bundle else "trained"


def _config_item(bundle: str, configs: Sequence[str], id: str) -> Any:
    """The raw content of ``id`` in a bundle's merged, flattened configs (``None`` when absent)."""
    from monai.bundle import ConfigParser

    from ambisam.bundle import load_bundle_config

    parser = ConfigParser(load_bundle_config(bundle, list(configs)))
    return parser.get(id)


def _timed_cache(spec: MethodSpec, configs: Sequence[str], common: Mapping, cache_dir: str | None) -> dict:
    """The overrides that make the embedding cache of ``configs`` a :class:`~ambisam.benchmark.TimedEmbeddingCache`
    in ``cache_dir`` (one on-disk cache for all jobs, timed so that first-time encoding is reported apart), or
    ``{}`` when those configs (or ``common``) cache nothing, as a stage whose encoder trains (P2SAM's first)."""
    cache = common["embedding_cache"] if "embedding_cache" in common else _config_item(
        spec.config_bundle, configs, "embedding_cache")
    if cache is None:
        return {}
    return {"embedding_cache#_target_": "ambisam.benchmark.TimedEmbeddingCache", "embedding_cache#cache_dir": cache_dir}


def _train_stages(spec: MethodSpec, common: Mapping, job: Mapping, job_dir: Path) -> dict:
    """Train ``spec``'s stages in order, each from the previous stage's weights (``init_weights``), within one
    budget: each stage gets what the earlier ones left. A stage that caches embeddings caches them in the job's
    shared, timed cache (its first-time encoding is not budgeted); one that caches none encodes on its clock.

    Args:
        spec: the method.
        common: the job's overrides of every stage.
        job: the job (``budget_seconds``, ``cache_dir``).
        job_dir: the job's folder (the budget records go to ``train/``).

    Returns:
        The training record: the totals over the stages (``seconds``, ``encoding_seconds``, ``epochs``,
        ``iterations``, ``stopped_by_budget``), ``validation_curve``: every stage's validations in order, each
        with its ``stage`` and ``seconds`` counted from the start of the first stage, the last stage's
        ``stopped_early``, parameter and cache counts, and ``stages``, each stage's own
        :class:`~ambisam.benchmark.TrainingBudget` record with its configs.
    """
    from ambisam.bundle import run_bundle, stage_weights

    budget = job.get("budget_seconds")
    stages: list[dict] = []
    init = None
    for i, configs in enumerate(spec.stages):
        spent = sum(s.get("seconds") or 0.0 for s in stages)
        record_path = job_dir / "train" / ("budget.json" if len(spec.stages) == 1 else f"budget_stage{i + 1}.json")
        cache = _timed_cache(spec, configs, common, job.get("cache_dir"))
        # the base's TrainingBudget (clocked by the timed cache) takes what the earlier stages left
        minutes = None if budget is None else max(0.0, float(budget) - spent) / 60.0
        logger.info(f"{spec.name}: training stage {i + 1}/{len(spec.stages)} ({' + '.join(configs)})")
        workflow = run_bundle(spec.config_bundle, list(configs), **common, **cache, init_weights=init,
                              budget_minutes=minutes, training_record=str(record_path))
        if i + 1 < len(spec.stages):
            init = stage_weights(workflow)
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        stages.append({"stage": i + 1, "configs": list(configs), **record})
    last = stages[-1]
    return {
        **{k: v for k, v in last.items() if k not in ("stage", "configs")},
        "budget_seconds": budget,
        "seconds": sum(s.get("seconds") or 0.0 for s in stages),
        "encoding_seconds": sum(s.get("encoding_seconds") or 0.0 for s in stages),
        "epochs": sum(int(s.get("epochs") or 0) for s in stages),
        "iterations": sum(int(s.get("iterations") or 0) for s in stages),
        "stopped_by_budget": any(s.get("stopped_by_budget") for s in stages),
        "validation_curve": _joined_curve(stages),
        "stages": stages,
    }


def _joined_curve(stages: Sequence[Mapping]) -> list[dict]:
    """The stages' validation curves as one, each point with its ``stage``, a stage's seconds after the earlier
    stages' (training time of the method so far)."""
    joined, offset = [], 0.0
    for stage in stages:
        joined += [{**point, "stage": stage["stage"], "seconds": offset + float(point["seconds"])}
                   for point in stage.get("validation_curve") or ()]
        offset += float(stage.get("seconds") or 0.0)
    return joined


def run_job(job: Mapping) -> dict:
    """Train (when the method trains) and evaluate one method with one seed; write ``<job_dir>/result.json``.

    Args:
        job: the settings (see :func:`ambisam.benchmark.run_benchmark`): ``method``, ``seed``, ``job_dir``,
            ``datalist``, ``num_samples``, ``budget_seconds``, ``max_epochs``, ``backbone``, ``checkpoint``,
            ``modality``, ``window``, ``value_range``, ``num_raters``, ``prompt``, ``prompt_jitter``, ``train_prompt``,
            ``figure_cases``, ``cache_dir``, ``threads``.

    Returns:
        The result: ``status`` ``"ok"``, the metrics, timings, memory, parameter counts and the training record
        (per stage under ``training["stages"]``).

    Raises:
        InputError: an unknown method.
    """
    from ambisam.bundle import run_bundle

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    spec = get_method(job["method"])
    bundle = spec.config_bundle
    job_dir = Path(job["job_dir"])
    datalist = Path(job["datalist"])
    common: dict[str, Any] = {
        "method": spec.name,
        "datalist": str(datalist),
        "dataset_dir": str(datalist.parent),
        "seed": int(job["seed"]),
        "num_samples": int(job["num_samples"]),
        "backbone": job["backbone"],
        "backbone_checkpoint": job.get("checkpoint"),
        "modality": job["modality"],
        "ckpt_dir": str(job_dir / "models"),
        "output_dir": str(job_dir / "train"),
    }
    for key in ("window", "value_range"):  # the convention's own; else the bundle's default
        if job.get(key) is not None:
            common[key] = list(job[key])
    if job.get("num_raters") is not None:
        common["num_raters"] = int(job["num_raters"])
    for key in ("prompt", "prompt_jitter", "train_prompt"):  # older job files have none: the bundle's default
        if job.get(key) is not None:
            common[key] = job[key]
    common.update(spec.config_overrides())
    if job.get("max_epochs") is not None:
        common["max_epochs"] = int(job["max_epochs"])

    training: dict[str, Any] = {}
    train_seconds = 0.0
    if spec.trainable:
        started = time.perf_counter()
        training = _train_stages(spec, common, job, job_dir)
        train_seconds = time.perf_counter() - started

    eval_dir = job_dir / "evaluate"
    cache = _timed_cache(spec, spec.eval_configs, common, job.get("cache_dir"))
    handlers = list(_config_item(bundle, spec.eval_configs, "validate_handlers"))
    handlers.append({"_target_": "ambisam.benchmark.EvaluationRecorder", "save_dir": str(eval_dir),
                     "num_samples": "@num_samples", "figure_cases": int(job.get("figure_cases", 4)),
                     "clock": "@embedding_cache" if cache else None})
    handlers.append({"_target_": "ignite.handlers.ProgressBar", "desc": f"evaluating {spec.name} (test cases)"})
    # a training-free method has no weights to load or require (evaluate.json's named switch)
    evaluate = dict(common, **cache, eval_dir=str(eval_dir), validate_handlers=handlers,
                    training_free=not spec.trainable)
    if job.get("precision") is not None:  # the evaluation's only: training stays in its own default
        evaluate["precision"] = job["precision"]
    started = time.perf_counter()
    run_bundle(bundle, list(spec.eval_configs), **evaluate)
    eval_seconds = time.perf_counter() - started

    report = json.loads((eval_dir / "metrics.json").read_text())
    recorded = json.loads((eval_dir / "recorder.json").read_text())
    n = int(job["num_samples"])
    metrics = {}
    for key in METRIC_KEYS + tuple(k for k in OPTIONAL_METRIC_KEYS if k in report["overall"]):
        value = report["overall"].get(f"{key}{n}", report["overall"].get(key))
        metrics[key] = None if value is None or not np.isfinite(value) else float(value)
    result = {
        "method": spec.name,
        "seed": int(job["seed"]),
        "status": "ok",
        "kind": method_kind(spec),
        "bundle": bundle,
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
        "parameters_trained": int(training.get("parameters_trained") or 0) if spec.trainable else 0,
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


def job_main(job_file: str | os.PathLike) -> dict:
    """Entry point of a job's own process (``python -m ambisam.benchmark JOB.json``): run the job in the file.

    Args:
        job_file: the job's JSON (written by :func:`ambisam.benchmark.run_benchmark` beside its outputs).

    Returns:
        The job's result.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return run_job(json.loads(Path(job_file).read_text()))
