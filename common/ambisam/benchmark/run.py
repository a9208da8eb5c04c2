"""The benchmark run: every method and the field's baselines with the same data, split, prompts and metrics.

``python -m ambisam benchmark --data DATALIST --methods psam,seqsam,baseline,... --samples 16 --out DIR`` runs,
for each method and seed, one *job* (:mod:`ambisam.benchmark.jobs`; in a fresh Python process by default, so
that its peak memory is its own):

1. **train** on the ``training`` split, stage by stage (the method's ``stages`` in :mod:`ambisam.registry`, each
   from the previous stage's weights through ``init_weights``), within ``--budget`` minutes for all the stages
   together: each stage runs its bundle's own configs (through :func:`ambisam.bundle.run_bundle`) with the
   benchmark's data, seed, N, intensity convention and folders as overrides and
   :class:`~ambisam.benchmark.TrainingBudget` added to its handlers, given what the earlier stages left (it
   ends training at an epoch end when the next epoch would not fit, or mid-epoch when one epoch alone overruns,
   and validates the last epoch if the bundle's ``val_interval`` skipped it, so that the saved best weights have
   seen it). A method without a bundle (``prob_unet``) trains through the *harness* bundle's configs
   (:data:`ambisam.registry.HARNESS_BUNDLE`) with its network, loss and overrides swapped in, so it sees the
   same slices, boxes and epochs. Training-free methods skip this step.
2. **evaluate** on the ``test`` split through the same bundle's ``evaluate.json`` merged over the method's
   ``eval_configs``: every method gets the same volumes, the same boxes (the raters' union per slice, no
   jitter by default; ``--prompt``/``--prompt_jitter`` name another protocol of
   :data:`ambisam.data.PROMPT_PROTOCOLS`, and training uses the same one unless ``--train_prompt`` says
   otherwise), the same seed and the same metric handlers, and writes ``metrics.json``.
   :class:`~ambisam.benchmark.EvaluationRecorder` is added to the evaluator's handlers: it times the sampling
   inferer, pools the calibration statistics for the reliability diagram and keeps the slices the figures show.

Every job shares one on-disk embedding cache (``DIR/embeddings``: the frozen encoder's embeddings depend on the
slice only), wrapped as :class:`~ambisam.benchmark.TimedEmbeddingCache`: the time spent encoding a slice for the
first time is a one-time cost of the shared encoder, so it is reported apart and counts neither against a
training budget nor in a method's ms per sample.

The intensity convention (modality, CT window, value range) is the datalist's own
(:func:`ambisam.data.datalist_intensity`) unless ``--modality`` / ``--window`` say otherwise; every job gets the
same, and ``results.json`` and ``run.json`` record it with its source.

The parent process then writes ``DIR/results.json`` (one object per method, mean and standard deviation
over seeds), ``DIR/results.md`` (the table) and the figures (:mod:`ambisam.benchmark.report`), and
``DIR/run.json`` (what was run: settings, versions, time). A method that is not implemented yet (no network
class, or no bundle) is listed as ``unavailable``, and so is a multi-organ method (UR-SAM), with where its own
table comes from; a job that fails is listed as ``failed`` with its error, and
the other methods still run. Running the same command on the same ``DIR`` again reuses every job already
completed with the same settings (``--rerun`` to redo them).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import

from ambisam.benchmark.jobs import METRIC_KEYS, OPTIONAL_METRIC_KEYS, method_availability, method_kind, run_job
from ambisam.data.transforms._utils import _check_jitter
from ambisam.data.transforms.boxes import check_prompt
from ambisam.errors import InputError
from ambisam.io import run_record, write_json
from ambisam.registry import DEFAULT_METHODS, get_method, method_registry
from ambisam.sam.precision import check_precision

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["MODALITIES", "intensity_convention", "parse_methods", "run_benchmark", "summarize_jobs"]

logger = logging.getLogger(__name__)

#: the intensity conventions the bundles know
MODALITIES = ("ct", "mri", "none")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from ``"a,b"`` or a sequence, stripped and without repeats.

    Raises:
        InputError: none given, or a name not in :data:`ambisam.registry.method_registry`.
    """
    names = methods.split(",") if isinstance(methods, str) else [str(m) for m in methods]
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    unknown = [n for n in names if n not in method_registry]
    if not names or unknown:
        raise InputError(None, f"unknown method(s) {unknown or names}; choose from {', '.join(method_registry)}")
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


def _check_item(item: dict) -> None:
    """Every file of one datalist item reads as NIfTI, the image's intensities are finite, its masks 0/1."""
    import nibabel as nib
    import numpy as np

    labels = item.get("label") or []
    labels = [labels] if isinstance(labels, str) else labels
    for kind, path in [("image", item["image"]), *(("label", p) for p in labels)]:
        if not Path(path).is_file():
            raise InputError(path, f"{kind} file not found")
        try:
            array = np.asarray(nib.load(str(path)).dataobj)
        except Exception as e:  # noqa: BLE001 - any failure to read is the user's file
            raise InputError(path, f"cannot be read as a NIfTI {kind} ({type(e).__name__}: {e})") from None
        if kind == "image" and not np.isfinite(array).all():
            raise InputError(path, f"has {int((~np.isfinite(array)).sum())} NaN or infinite intensities")
        if kind == "label" and not np.isin(np.unique(array), (0, 1)).all():
            found = ", ".join(f"{v:g}" for v in np.unique(array)[:5])
            raise InputError(path, f"mask values must be 0/1, found {found}")


def _check_data(datalist: Path, needs_training: bool) -> dict[str, int]:
    from ambisam.data import load_datalist

    counts = {}
    for split in ("training", "validation", "test"):
        items = load_datalist(datalist, split)
        counts[split] = len(items)
        for item in items:
            _check_item(item)
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
    spec = get_method(name)
    failed = [j for j in jobs if j.get("status") != "ok"]
    if failed:
        return {"method": name, "status": "failed", "kind": method_kind(spec), "description": spec.description,
                "reason": "; ".join(f"seed {j['seed']}: {j.get('reason')}" for j in failed)}
    entry: dict[str, Any] = {"method": name, "status": "ok", "kind": method_kind(spec), "description": spec.description}
    std = {}
    for key in METRIC_KEYS + tuple(k for k in OPTIONAL_METRIC_KEYS if all(k in j["metrics"] for j in jobs)):
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
        training=[j["training"] for j in jobs] if spec.trainable else [],
        reliability_bins=np.sum([j["reliability_bins"] for j in jobs], axis=0).tolist(),
        per_seed=[{"seed": j["seed"], **j["metrics"]} for j in jobs],
    )
    return entry


def intensity_convention(
    datalist: str | os.PathLike, modality: str | None = None, window: Sequence[float] | None = None
) -> dict:
    """The intensity convention every job gets: the datalist's own (its ``"intensity"`` block, read by
    :func:`ambisam.data.datalist_intensity`), unless ``modality`` or ``window`` say otherwise.

    Args:
        datalist: the datalist file.
        modality: ``ct``, ``mri`` or ``none`` from the command line; ``None``: the datalist's.
        window: the CT window ``(low, high)`` from the command line; ``None``: the datalist's when its modality
            is the one used, else the bundles' default.

    Returns:
        ``{"modality", "window", "value_range", "source"}``: ``window`` set for ``ct`` only, ``value_range`` for
        ``none`` only (``None``: the bundles' default), ``source`` ``"datalist"`` or ``"default"`` (the
        datalist states none) as :func:`~ambisam.data.datalist_intensity` says, or ``"command line"``.

    Raises:
        InputError: a ``window`` for a modality other than ``ct``.
    """
    from ambisam.data import datalist_intensity

    stated = datalist_intensity(datalist)
    own = {
        "modality": stated.modality,
        "window": None if stated.window is None else [float(v) for v in stated.window],
        "value_range": None if stated.value_range is None else [float(v) for v in stated.value_range],
        "source": stated.source,
    }
    convention = dict(own)
    if modality is not None and str(modality).lower() != own["modality"]:
        convention = {"modality": str(modality).lower(), "window": None, "value_range": None}
    if modality is not None or window is not None:
        convention["source"] = "command line"
    if window is not None:
        if convention["modality"] != "ct":
            raise InputError(None, f"a window applies to modality ct only, not {convention['modality']!r}")
        convention["window"] = [float(v) for v in window]
    return convention


def run_benchmark(
    data: str | os.PathLike = "data/synthetic",
    methods: str | Sequence[str] = DEFAULT_METHODS,
    samples: int = 16,
    out: str | os.PathLike = "runs/benchmark",
    budget: float | None = 3.0,
    seeds: int = 1,
    max_epochs: int | None = None,
    backbone: str = "litemedsam",
    checkpoint: str | None = None,
    modality: str | None = None,
    window: str | Sequence[float] | None = None,
    num_raters: int | None = None,
    figure_cases: int = 4,
    threads: int | None = None,
    isolate: bool = True,
    rerun: bool = False,
    prompt: str = "union",
    prompt_jitter: int = 0,
    train_prompt: str | None = None,
    precision: str | None = None,
) -> list[dict]:
    """Train (or reuse), evaluate and compare methods; see the module docstring.

    Args:
        data: a datalist JSON file, or a folder holding ``datalist.json`` (a new or empty folder gets the
            synthetic default data set, as the bundles do).
        methods: names in :data:`ambisam.registry.method_registry`, comma-separated or a sequence.
        samples: N, the samples per prompted slice.
        out: the output folder.
        budget: training minutes per method and seed (``None``: no limit, the bundle's ``max_epochs``).
        seeds: seeds ``0 .. seeds - 1``; deterministic methods run once.
        max_epochs: overrides every trained method's ``max_epochs`` (default: the bundle's own; 50 for
            ``prob_unet``).
        backbone: SAM backbone registry name.
        checkpoint: backbone weights, where the backbone needs them.
        modality: ``ct``, ``mri`` or ``none`` (intensity scaling, as the bundles'); ``None``: the datalist's
            own convention (see :func:`intensity_convention`).
        window: the CT window ``"low,high"`` (``ct`` only); ``None``: the datalist's, else the bundles' default.
        num_raters: raters per case (default: the bundle's own, 4).
        figure_cases: test cases drawn in the per-case figures.
        threads: torch threads per job.
        isolate: one process per job (peak memory per job); ``False`` runs in this process.
        rerun: redo jobs whose result with the same settings is already in ``out``.
        prompt: the evaluation's box-prompt protocol (:data:`ambisam.data.PROMPT_PROTOCOLS`).
        prompt_jitter: jitter of the evaluation boxes, in pixels.
        train_prompt: the training boxes' protocol; ``None``: the same as ``prompt`` (a method is scored on the
            prompts it learned from).
        precision: the evaluation's precision (``"fp32"``, ``"bf16"``, ``"auto"``: :mod:`ambisam.sam.precision`);
            ``None``: the bundles' default. Training runs in its own default (float32).

    Returns:
        The entries written to ``results.json``.

    Raises:
        InputError: bad arguments or data, before anything is written.
    """
    from ambisam.benchmark.report import write_report

    names = parse_methods(methods)
    if int(samples) < 1 or int(seeds) < 1 or int(figure_cases) < 0:
        raise InputError(None, f"samples and seeds must be >= 1, figure_cases >= 0; got {samples}, {seeds}, {figure_cases}")
    if budget is not None and not float(budget) > 0:
        raise InputError(None, f"budget must be a positive number of minutes, got {budget}")
    if max_epochs is not None and int(max_epochs) < 1:
        raise InputError(None, f"max_epochs must be >= 1, got {max_epochs}")
    if modality is not None and str(modality).lower() not in MODALITIES:
        raise InputError(None, f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    window = None if window is None else _parse_window(window)
    precision = None if precision is None else check_precision(precision)
    train_prompt = prompt if train_prompt is None else train_prompt
    try:  # the transforms' own checks, so the benchmark accepts exactly what the bundles do
        for value in (prompt, train_prompt):
            check_prompt(value)
        prompt_jitter = _check_jitter(prompt_jitter)
    except ValueError as e:
        raise InputError(None, f"prompt / prompt_jitter: {e}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    unavailable = {n: method_availability(get_method(n)) for n in names}
    for n in names:
        if unavailable[n] is None and get_method(n).multi_organ:
            unavailable[n] = (f"'{n}' is a multi-organ method with its own table (Dice per organ and strategy): run "
                              f"bundles/{get_method(n).config_bundle}/configs/evaluate.json on a class-mapped "
                              "datalist; the benchmark's multi-rater scoring does not run it")
    runnable = [n for n in names if unavailable[n] is None]
    datalist = _resolve_datalist(data)
    counts = _check_data(datalist, any(get_method(n).trainable for n in runnable))
    intensity = intensity_convention(datalist, modality, window)

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
        "modality": intensity["modality"],
        "window": intensity["window"],
        "value_range": intensity["value_range"],
        "num_raters": None if num_raters is None else int(num_raters),
        "prompt": prompt,
        "prompt_jitter": int(prompt_jitter),
        "train_prompt": train_prompt,
    }
    if precision is not None:  # absent otherwise, so earlier results with the same settings are still reused
        settings["precision"] = precision
    jobs = []
    for name in runnable:
        for seed in range(1 if get_method(name).deterministic else int(seeds)):
            job_dir = (out / name / f"seed{seed}").resolve()
            jobs.append({
                **settings,
                "method": name,
                "seed": seed,
                "job_dir": str(job_dir),
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
            spec = get_method(name)
            entries.append({"method": name, "status": "unavailable", "kind": method_kind(spec),
                            "description": spec.description, "reason": unavailable[name]})
        else:
            entries.append(summarize_jobs(name, results[name]))
        entries[-1]["intensity"] = intensity
    seconds = time.time() - started
    record = run_record(
        job="benchmark",
        methods=names,
        seeds=int(seeds),
        figure_cases=int(figure_cases),
        threads=threads or torch.get_num_threads(),
        isolate=bool(isolate),
        counts=counts,
        intensity=intensity,
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
