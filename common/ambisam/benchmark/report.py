"""The benchmark's report: ``results.json``, the Markdown table ``results.md`` and the PNG figures (per test
case every method's samples, a reliability diagram, metric bars with their spread over seeds, the trained
methods' validation curves).

Everything here reads the entries :func:`ambisam.benchmark.run_benchmark` builds (one per method, see
:func:`ambisam.benchmark.summarize_jobs`) and the per-case arrays its jobs saved; nothing is recomputed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ambisam.io import atomic_path, write_json

__all__ = [
    "TABLE_COLUMNS",
    "CURVE_METRIC",
    "results_markdown",
    "reliability_png",
    "metric_bars_png",
    "convergence_png",
    "case_pngs",
    "write_report",
]

#: the columns of ``results.md`` (``{n}`` is N)
TABLE_COLUMNS = (
    "method",
    "GED{n}",
    "diversity",
    "HM-IoU{n}",
    "D_max (per rater)",
    "D_mean",
    "soft Dice (fraction of samples)",
    "NCC (probability maps)",
    "NCC undefined raters",
    "ECE (fraction of samples)",
    "presence gap",
    "parameters trained",
    "train time",
    "ms per sample",
    "peak memory",
)

#: metric key -> (label, higher is better)
_METRICS = {
    "ged": ("GED{n} (lower is better)", False),
    "diversity": ("diversity{n} (sample spread)", None),
    "hm_iou": ("HM-IoU{n}", True),
    "dice_max": ("D_max{n} (per rater)", True),
    "dice_mean": ("D_mean{n}", True),
    "soft_dice": ("soft Dice", True),
    "ncc": ("NCC", True),
    "ece": ("ECE (lower is better)", False),
    "presence_gap": ("presence gap (lower is better)", False),
}

#: the validation curve's key metric (the base ``train.json``'s ``validate_key_metric``)
CURVE_METRIC = "val_ged"

#: the metric keys of the table's columns, in order (``TABLE_COLUMNS`` after ``method``)
_TABLE_METRICS = ("ged", "diversity", "hm_iou", "dice_max", "dice_mean", "soft_dice", "ncc", "ncc_undefined_raters",
                  "ece", "presence_gap")


def _value(entry: Mapping, key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if len(entry.get("seeds", [])) > 1 and not entry.get("deterministic"):
        spread = entry.get("std", {}).get(key)
        if spread is not None:
            text += f" ± {spread:.3f}"
    return text


def _count(p: int | None) -> str:
    if p is None:
        return "n/a"
    if p >= 1e6:
        return f"{p / 1e6:.2f} M"
    if p >= 1e3:
        return f"{p / 1e3:.1f} k"
    return str(p)


def _duration(seconds: float | None, kind: str) -> str:
    if kind == "training_free":
        return "none"
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _encoder(entries: Sequence[Mapping]) -> str:
    measured = [e["timings"].get("encoder_ms_per_slice") for e in entries if e["status"] == "ok"]
    measured = [m for m in measured if m]
    return f": {np.median(measured):.0f} ms per slice here" if measured else ""


def _load(load: Mapping | None) -> str:
    if not load or not load.get("start") or not load.get("end"):
        return ""
    return f"; load average (1 min) {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"


def _prompt(record: Mapping) -> str:
    """The prompt protocol in words: evaluation boxes, their jitter, and the training boxes when they differ."""
    from ambisam.data.transforms.boxes import PROMPT_PROTOCOLS

    prompt = record.get("prompt", "union")
    text = f"`{prompt}`: {PROMPT_PROTOCOLS.get(prompt, prompt)}"
    jitter = int(record.get("prompt_jitter") or 0)
    text += f" (jitter up to {jitter} px)" if jitter else " (no jitter)"
    train = record.get("train_prompt", prompt)
    return text + (f"; training boxes `{train}` (not the evaluation's protocol)" if train != prompt else
                   "; training boxes the same protocol")


def _rater_diversity(entries: Sequence[Mapping]) -> str:
    """The raters' own diversity on the test cases (the same for every method), as a sentence, or ``""``."""
    values = [e["rater_diversity"] for e in entries if e.get("status") == "ok" and e.get("rater_diversity") is not None]
    if not values:
        return ""
    return (f"The raters' own diversity on the test cases (E d(Y, Y') over their K masks, the same d): "
            f"{values[0]:.3f}; a method's sample diversity is read against it.")


def results_markdown(entries: Sequence[Mapping], record: Mapping) -> str:
    """The Markdown report: settings, the table, what could not run, and the conventions.

    Args:
        entries: ``results.json``'s entries.
        record: the run record (settings, machine, versions).

    Returns:
        The Markdown text.
    """
    n = record["num_samples"]
    ok = [e for e in entries if e["status"] == "ok"]
    budget = record.get("budget_minutes")
    lines = [
        "# Benchmark results",
        "",
        f"- data: `{record['datalist']}` ({record['counts']['training']} training, "
        f"{record['counts']['validation']} validation, {record['counts']['test']} test cases); "
        f"modality {record['modality']}" + (f", window {record['window']}" if record.get("window") else "")
        + (f", value range {record['value_range']}" if record.get("value_range") else "")
        + (f" ({record['intensity']['source']})" if record.get("intensity") else ""),
        f"- N = {n} samples per prompted slice; prompt: {_prompt(record)}, the same for every method",
        f"- seeds: {record['seeds']} (mean ± std over seeds; deterministic methods run once); training budget: "
        + (f"{budget:g} min per method and seed" if budget else "none (the bundles' max_epochs)")
        + (f", max_epochs {record['max_epochs']}" if record.get("max_epochs") else ""),
        f"- backbone: {record['backbone']}; machine: {record['machine']}, {record['cpu_count']} CPU cores, "
        f"{record['threads']} torch threads, device {record['device']}; "
        f"ambisam {record['versions']['ambisam']}, MONAI {record['versions']['monai']}, "
        f"torch {record['versions']['torch']}" + _load(record.get("load_average")),
        "",
    ]
    header = [c.format(n=n) for c in TABLE_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for e in ok:
        row = [e["method"]] + [_value(e, k) for k in _TABLE_METRICS]
        row += [
            _count(e.get("parameters_trained")),
            _duration(e["timings"].get("train_budgeted_seconds"), e["kind"]),
            "n/a" if e["timings"].get("ms_per_sample") is None else f"{e['timings']['ms_per_sample']:.1f}",
            f"{e['memory']['peak_rss_mb'] / 1024:.2f} GiB",
        ]
        lines.append("| " + " | ".join(row) + " |")
    rater_diversity = _rater_diversity(ok)
    if rater_diversity:
        lines += ["", rater_diversity]
    if _curves(ok, CURVE_METRIC):
        lines += ["", f"Convergence: `figures/convergence.png`, each trained method's GED{n} on the validation "
                  "split against its training time (one line per seed; the test split above is not in it)."]
    others = [e for e in entries if e["status"] != "ok"]
    if others:
        lines += ["", "Not in the table:", ""]
        lines += [f"- `{e['method']}`: {e['status']}: {e['reason']}" for e in others]
    lines += [
        "",
        "Methods:",
        "",
        *[f"- `{e['method']}`: {e['description']}" for e in entries],
        "",
        "Conventions: GED and diversity use d = 1 - IoU with all N^2 / K^2 pairs (two empty masks: distance 0); "
        "HM-IoU matches samples and tiled raters (Hungarian); D_max is the mean over raters of the best Dice among "
        "the samples; D_mean the mean Dice over all N x K pairs; soft Dice is QUBIQ's (thresholds 0.1 ... 0.9) with "
        "confidence = fraction of samples (results.json: soft_dice; soft_dice_prob takes the mean sigmoid "
        "probability); NCC is PHiSeg's S_NCC on the samples' probability maps (n/a where every per-rater value is "
        "undefined; 'NCC undefined raters' counts the (case, rater) pairs whose maps were constant); ECE pools "
        "all test pixels into 10 bins (confidence = fraction of samples, target = fraction of raters; results.json: "
        "ece, and ece_prob with the mean sigmoid probability); 'presence gap' is the mean over test cases of "
        "|fraction of empty samples - fraction of empty raters| (a mask is empty when it marks nothing in the case; "
        "results.json: samples_empty, raters_empty). Metrics are "
        "means over test cases (whole volumes). 'train time' is the time the training budget counts: the trainer's "
        "run with validation after each epoch, without data loading and without the one-time encoding of "
        "slices into the embedding cache that every SAM method shares (results.json: train_seconds is the wall "
        "time, train_encoding_seconds the encoding). 'ms per sample' is the sampling inferer's time on the test "
        "set divided by (prompted slices x N), on cached image embeddings (the SAM encoder, once per slice"
        + _encoder(entries) + ", is left out; the U-Net's whole forward pass is in); 'peak memory' is the peak "
        "resident memory of the job's process (training and evaluation).",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def reliability_png(path: str | os.PathLike, entries: Sequence[Mapping]) -> Path:
    """The reliability diagram: per method, the mean raters' fraction against the mean confidence of each
    confidence bin (pooled over test pixels and seeds), and the share of pixels per bin.

    Args:
        path: the PNG.
        entries: ``results.json``'s entries with ``reliability_bins`` ``(3, n_bins)``: counts, summed
            confidence, summed target.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for e in entries:
        counts, conf, target = np.asarray(e["reliability_bins"], dtype=float)
        used = counts > 0
        if not used.any():
            continue
        edges = np.linspace(0, 1, counts.size + 1)
        label = f"{e['method']} (ECE {e['ece']:.3f})" if e.get("ece") is not None else e["method"]
        ax.plot(conf[used] / counts[used], target[used] / counts[used], marker="o", markersize=3, label=label)
        hist.stairs(counts / counts.sum(), edges, label=e["method"])
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (fraction of samples)", ylabel="fraction of raters",
           title="reliability (test pixels pooled)")
    ax.legend(fontsize=7)
    hist.set(yscale="log", xlim=(0, 1), xlabel="confidence bin", ylabel="share of pixels", title="pixels per bin")
    fig.tight_layout()
    return _save(fig, path)


def metric_bars_png(path: str | os.PathLike, entries: Sequence[Mapping], num_samples: int) -> Path:
    """One bar chart per metric, one bar per method, error bars = standard deviation over seeds.

    Args:
        path: the PNG.
        entries: ``results.json``'s entries (``status`` ``"ok"``).
        num_samples: N, for the labels.

    Returns:
        The written path.
    """
    plt = _pyplot()
    names = [e["method"] for e in entries]
    rows = -(-len(_METRICS) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(3.2 * 4, 3.2 * rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, (label, _better)) in zip(axes.ravel(), _METRICS.items()):
        means = [np.nan if e.get(key) is None else e[key] for e in entries]
        spread = [0.0 if e.get("std", {}).get(key) is None else e["std"][key] for e in entries]
        x = np.arange(len(names))
        ax.bar(x, np.nan_to_num(means), yerr=spread, capsize=3,
               color=[colours[i % len(colours)] for i in range(len(names))])
        for i, m in enumerate(means):
            if np.isnan(m):
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(label.format(n=num_samples), fontsize=9)
    for ax in axes.ravel()[len(_METRICS) :]:
        ax.axis("off")
    fig.suptitle("mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _curves(entries: Sequence[Mapping], key: str) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """``(method, seed, seconds, values)`` per trained method and seed whose training recorded ``key`` in its
    validation curve."""
    curves = []
    for e in entries:
        for seed, training in zip(e.get("seeds") or (), e.get("training") or ()):
            points = [p for p in (training or {}).get("validation_curve") or () if p.get(key) is not None]
            if points:
                curves.append((e["method"], seed, np.array([p["seconds"] for p in points], dtype=float),
                               np.array([p[key] for p in points], dtype=float)))
    return curves


def convergence_png(
    path: str | os.PathLike, entries: Sequence[Mapping], num_samples: int, key: str = CURVE_METRIC
) -> Path | None:
    """The validation curves: the key metric on the validation split against the training seconds the budget
    counts, one line per trained method and seed (a later stage's validations after the earlier stages' time).

    Args:
        path: the PNG.
        entries: ``results.json``'s entries (``status`` ``"ok"``), ``training`` holding each seed's record with
            its ``validation_curve``.
        num_samples: N, for the label.
        key: the curve's metric (default the validation GED).

    Returns:
        The written path, or ``None`` when no entry has a curve.
    """
    curves = _curves(entries, key)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(method for method, *_ in curves))
    for method, seed, seconds, values in curves:
        ax.plot(seconds, values, marker="o", markersize=3, label=f"{method} (seed {seed})",
                color=colours[methods.index(method) % len(colours)])
    ax.set(xlabel="training seconds (budgeted: without first-time encoding)", ylabel=f"{key} (lower is better)",
           title=f"GED{num_samples} on the validation split against training time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def case_pngs(out: str | os.PathLike, entries: Sequence[Mapping], num_samples: int, max_samples: int = 8) -> list[Path]:
    """Per test case kept by the jobs: one overview (:func:`ambisam.figures.overview_png`) with a row per method
    (image, raters, samples, mean, uncertainty on the slice where the raters' union is largest), first seed.

    Args:
        out: the benchmark folder (jobs under ``<out>/<method>/seed<s>``).
        entries: ``results.json``'s entries (``status`` ``"ok"``).
        num_samples: N, for the title.
        max_samples: samples drawn per row.

    Returns:
        The written paths (``<out>/figures/case_<id>.png``).
    """
    from ambisam.figures import overview_png

    out = Path(out)
    by_case: dict[str, list[dict]] = {}
    for e in entries:
        folder = out / e["method"] / f"seed{e['seeds'][0]}" / "evaluate" / "cases"
        for file in sorted(folder.glob("*.npz")):
            with np.load(file) as arrays:
                row = {k: arrays[k] for k in ("image", "raters", "samples", "mean", "uncertainty")}
                row["label"] = f"{e['method']}"
                row["slice"] = int(arrays["slice"])
            by_case.setdefault(file.stem, []).append(row)
    written = []
    for case, rows in by_case.items():
        title = f"{case}, slice {rows[0]['slice']}: every method's samples (N={num_samples}, {max_samples} shown)"
        written.append(overview_png(out / "figures" / f"case_{case}.png", rows, max_samples=max_samples, title=title))
    return written


def write_report(out: str | os.PathLike, entries: Sequence[Mapping], record: Mapping) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the figures into ``out``.

    Args:
        out: the benchmark folder.
        entries: one entry per method (any status).
        record: the run record (settings, machine, versions).

    Returns:
        The written paths by name.
    """
    out = Path(out)
    ok = [e for e in entries if e["status"] == "ok"]
    paths = {"results.json": write_json(out / "results.json", list(entries))}
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(entries, record))
    paths["results.md"] = out / "results.md"
    if ok:
        paths["reliability"] = reliability_png(out / "figures" / "reliability.png", ok)
        paths["metrics"] = metric_bars_png(out / "figures" / "metrics.png", ok, record["num_samples"])
        convergence = convergence_png(out / "figures" / "convergence.png", ok, record["num_samples"])
        if convergence is not None:
            paths["convergence"] = convergence
        for p in case_pngs(out, ok, record["num_samples"]):
            paths[p.name] = p
    return paths
