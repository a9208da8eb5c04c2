"""``python -m ambisam bench scale``: training throughput and peak memory against the size of the data set.

For every trainable bundle (the registry's trainable methods with a bundle, each at its last training stage:
P2SAM's stage 2, the one that trains from cached embeddings) and each data set size (500, 2,000 and 8,000 slices
by default), one fresh process (:func:`ambisam.bench._in_fresh_process`) builds the method's train workflow from
its bundle's configs at their default settings (``batch_size``, ``train_slice_batch_size``,
``embedding_cache_ram_mb``, ``embedding_cache_dtype``, ``dataset_cache_ram_mb``) on a generated data set of that
many training slices, and runs the trainer's own step (``MultiRaterTrainer._iteration``) on batches drawn by the
bundle's real data loader (its datalist, ``BoundedCacheDataset`` and slice pipeline): ``warmup`` steps, then
``steps`` timed ones. It reports steps (and slices) per second and the process's peak resident memory
(``getrusage``'s ``ru_maxrss``: set-up included), and per method the ratios of the largest size's figures to the
smallest's against the targets: peak RSS flat within 10 % and under 3 GiB, throughput flat (within 10 %).

**The embeddings are synthetic.** Encoding 8,000 slices with LiteMedSAM takes over an hour on two CPU cores, so
the encoder is replaced, for the cache's misses only, by random embeddings of its shape and dtype: each slice's
embedding is made the first time the training loop asks for it and goes through the real
:class:`~ambisam.sam.EmbeddingCache` (its key, RAM bound, storage dtype and on-disk records, written by its own
write path under the run's ``output_dir/embeddings``); later lookups are served from its RAM or read back from
disk, as in a real run's later epochs. Before the first step the cache's RAM is filled to its bound
(``embedding_cache_ram_mb``) with synthetic entries (:func:`fill_cache_ram`), the state a long run on a data set
larger than the bound reaches, so that every size is measured with the cache at its bound rather than at however
far a few dozen steps filled it. The training loop, data pipeline and datalist are the real ones.

With ``default_data`` each method is also measured on the embedded default data set
(:func:`ambisam.data.ensure_dataset`'s defaults: 8 volumes of 96 x 96 x 24, 4 raters), the data its bundle trains
on when given none; ``slice_batch_size`` overrides ``train_slice_batch_size`` (``"none"``: whole batches, the
step before slice batches existed) to compare.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import optional_import

from ambisam.bench_cache import _peak_rss_mib
from ambisam.registry import method_registry

__all__ = ["SCALE_SIZES", "trainable_bundles", "scale_data", "scale_run", "bench_scale", "format_scale",
           "print_scale"]

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

#: the data set sizes of ``bench scale``, in training slices
SCALE_SIZES = (500, 2000, 8000)
#: the targets ``bench scale`` reports against
RSS_FLATNESS_TARGET = 1.10
RSS_LIMIT_MIB = 3 * 1024
THROUGHPUT_FLATNESS_TARGET = 0.90
_DEFAULT = "default"  # the size label of the embedded default data set
_SHAPE = (64, 64, 32)  # the generated volumes: 32 slices each, resized to the backbone's input like any data


def trainable_bundles() -> list[str]:
    """The registry's methods that train with a bundle of their own and can run here (pSAM, SeqSAM, P2SAM,
    ProSeg; SeqSAM's MCL baseline shares SeqSAM's bundle and data path and is left out)."""
    from ambisam.benchmark import method_availability

    return [name for name, spec in method_registry.items()
            if spec.trainable and spec.bundle is not None and spec.bundle == name
            and method_availability(spec) is None]


def scale_data(folder: str | Path, sizes: Sequence[int], seed: int = 0) -> dict[int, Path]:
    """Generated training data of each size, sharing one synthetic data set: its first volumes are the smaller
    sizes' (a case of :func:`~ambisam.data.synthesize` does not change when ``cases`` grows).

    Volumes are 64 x 64 x 32 with 4 raters, all in the ``training`` split; a size of ``n`` slices gets
    ``ceil(n / 32)`` volumes. A folder that already holds enough volumes is reused.

    Args:
        folder: where the data set is written (and read again on a later call).
        sizes: the sizes in training slices.
        seed: the synthetic data's seed.

    Returns:
        ``{size: datalist path}``, one datalist per size (``datalist_<size>.json`` in ``folder``).

    Raises:
        InputError: a size below 1.
    """
    from ambisam.data import synthesize
    from ambisam.errors import InputError

    if not sizes or min(sizes) < 1:
        raise InputError(None, f"bench scale sizes must be positive slice counts, got {list(sizes)}")
    folder = Path(folder)
    depth = _SHAPE[2]
    cases = math.ceil(max(sizes) / depth)
    record = folder / "synth.json"
    have = json.loads(record.read_text()) if record.is_file() else {}
    if have.get("cases", 0) < cases or have.get("shape") != list(_SHAPE) or have.get("seed") != seed:
        synthesize(folder, cases=cases, shape=_SHAPE, split=(1.0, 0.0, 0.0), seed=seed, progress=True)
    datalist = json.loads((folder / "datalist.json").read_text())
    out = {}
    for size in sizes:
        training = datalist["training"][: math.ceil(size / depth)]
        subset = dict(datalist, training=training, validation=training[:1])  # training needs a validation case
        path = folder / f"datalist_{size}.json"
        path.write_text(json.dumps(subset, indent=1))
        out[size] = path
    return out


def _synthetic_encoder(backbone: torch.nn.Module) -> None:
    """Make ``backbone.encode`` return random embeddings of its shape and dtype (this process only)."""
    shape = (int(backbone.embedding_dim), *map(int, backbone.embedding_size))
    dtype = next((p.dtype for p in backbone.image_encoder.parameters() if p.is_floating_point()), torch.float32)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape[0], *shape, dtype=dtype)

    backbone.encode = encode


def fill_cache_ram(cache: Any) -> int:
    """Fill an embedding cache's RAM to its bound with synthetic entries (distinct random images through its own
    lookup and write path, its backbone's encoder already synthetic), as a long run on a data set larger than
    the bound leaves it; nothing is written to disk. The entries are never asked for again and are dropped first
    (least recently used) as the run's own slices come in.

    Args:
        cache: an :class:`~ambisam.sam.EmbeddingCache` with a byte or count bound (none: nothing is done).

    Returns:
        The entries pushed in.
    """
    capacity = cache.capacity
    if capacity is None:
        return 0
    folder, cache.cache_dir = cache.cache_dir, None
    try:
        start = torch.finfo(torch.float32).max / 2  # images no training slice has (theirs lie in [0, 1])
        for first in range(0, capacity, cache.batch_size):
            n = min(cache.batch_size, capacity - first)
            images = (start - torch.arange(first, first + n, dtype=torch.float32)).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
            cache(images)
    finally:
        cache.cache_dir = folder
    cache.hits = cache.misses = 0
    return capacity


def scale_run(
    method: str,
    datalist: str,
    size: int | str,
    steps: int = 30,
    warmup: int = 3,
    backbone: str = "litemedsam",
    threads: int | None = None,
    slice_batch_size: int | str | None = None,
    seed: int = 0,
    embedding_cache_ram_mb: float | None = None,
) -> dict[str, Any]:
    """One (method, data set) measurement in this process: see the module docstring.

    Args:
        method: a trainable bundle method.
        datalist: its datalist.
        size: the size label reported (slices asked for, or ``"default"``).
        steps: timed steps.
        warmup: steps run before the clock starts.
        backbone: backbone registry name.
        threads: torch threads.
        slice_batch_size: ``train_slice_batch_size`` override; ``None`` keeps the config's, ``"none"`` trains
            whole batches.
        seed: ``monai.utils.set_determinism``'s seed.
        embedding_cache_ram_mb: override the config's cache RAM bound (``None``: keep it).

    Returns:
        The figures: ``method``, ``stage``, ``slices`` (the size label), ``volumes``, ``training_slices``,
        ``steps``, ``steps_per_s``, ``slices_per_s``, ``slices_per_step``, ``peak_rss_mib``,
        ``setup_peak_rss_mib`` (after building the workflow, before the first step), the settings and
        ``cache`` (the embedding cache's statistics).
    """
    from monai.utils import set_determinism

    from ambisam.bench import _implemented
    from ambisam.bundle import bundle_workflow

    if threads:
        torch.set_num_threads(int(threads))
    set_determinism(seed=seed)
    spec = _implemented(method)
    configs = spec.stages[-1]
    override: dict[str, Any] = {}
    if slice_batch_size is not None:
        none = isinstance(slice_batch_size, str) and slice_batch_size.lower() in ("none", "null")
        override["train_slice_batch_size"] = None if none else int(slice_batch_size)
    if embedding_cache_ram_mb is not None:
        override["embedding_cache_ram_mb"] = float(embedding_cache_ram_mb)
    with tempfile.TemporaryDirectory(prefix="scale-run-") as tmp:
        workflow = bundle_workflow(
            spec.config_bundle, configs, "train", **spec.config_overrides(),
            datalist=str(datalist), dataset_dir=str(Path(datalist).parent), backbone=backbone,
            output_dir=str(Path(tmp) / "train"), ckpt_dir=str(Path(tmp) / "models"), init_weights=None, **override,
        )
        parser = workflow.parser
        trainer = parser.get_parsed_content("train#trainer")
        _synthetic_encoder(trainer.method.backbone)
        filled = 0 if trainer.embedding_cache is None else fill_cache_ram(trainer.embedding_cache)
        settings = {k: parser.get_parsed_content(k) for k in (
            "batch_size", "train_slice_batch_size", "embedding_cache_ram_mb", "embedding_cache_dtype",
            "dataset_cache_ram_mb")}
        setup = _peak_rss_mib()

        def batches():
            while True:
                yield from trainer.data_loader

        stream = batches()
        slices = 0
        for i in range(warmup + steps):
            if i == warmup:
                start, slices = time.perf_counter(), 0
            batch = next(stream)
            slices += int(batch["image"].shape[0])
            trainer._iteration(trainer, batch)
        seconds = time.perf_counter() - start
        cache = trainer.embedding_cache
        stats = None if cache is None else {"hits": cache.hits, "misses": cache.misses,
                                            "memory_mib": cache.memory_bytes / 2**20}
    from ambisam.data import load_datalist

    items = load_datalist(datalist, "training", check_headers=False)
    training_slices = sum(_depth(item["image"]) for item in items)
    return {
        "method": method, "stage": len(spec.stages), "configs": list(configs), "slices": size,
        "volumes": len(items), "training_slices": training_slices, "steps": steps, "warmup": warmup,
        "seconds": seconds, "steps_per_s": steps / seconds, "slices_per_s": slices / seconds,
        "slices_per_step": slices / steps, "peak_rss_mib": _peak_rss_mib(), "setup_peak_rss_mib": setup,
        "threads": torch.get_num_threads(), "embeddings": "synthetic", "cache_prefilled": filled, "cache": stats,
        **settings,
    }


def _depth(path: str) -> int:
    """Slices of a volume file (its header's last axis)."""
    import nibabel as nib

    return int(nib.load(str(path)).shape[-1])


def bench_scale(
    methods: str | Sequence[str] = "all",
    sizes: Sequence[int] = SCALE_SIZES,
    steps: int = 30,
    warmup: int = 3,
    data_dir: str | None = None,
    default_data: bool = True,
    backbone: str = "litemedsam",
    threads: int | None = None,
    slice_batch_size: int | str | None = None,
    seed: int = 0,
    isolate: bool = True,
    embedding_cache_ram_mb: float | None = None,
) -> dict[str, Any]:
    """:func:`scale_run` for every method and size, each in a fresh process, and the flatness of the figures.

    Args:
        methods: ``"all"`` (:func:`trainable_bundles`), a comma-separated string or a list of names.
        sizes: data set sizes in training slices.
        steps: timed steps per measurement.
        warmup: untimed steps before them.
        data_dir: where the generated data go (kept, and reused by a later call); ``None``: a temporary folder,
            removed at the end.
        default_data: also measure each method on the embedded default data set (:func:`ensure_dataset`).
        backbone: backbone registry name.
        threads: torch threads.
        slice_batch_size: as :func:`scale_run`.
        seed: data and determinism seed.
        isolate: each measurement in a fresh process (what the figures mean: peak RSS only grows within one);
            ``False`` runs them here, one after another (for tests).
        embedding_cache_ram_mb: as :func:`scale_run`.

    Returns:
        ``{"runs": [scale_run's figures, ...], "methods": [per method: method, rss_ratio, throughput_ratio,
        max_peak_rss_mib and whether each target is met], "sizes", "targets", "embeddings": "synthetic", ...}``.

    Raises:
        InputError: an unknown, unavailable or training-free method, or a bad size.
    """
    from ambisam.bench import _implemented, _in_fresh_process
    from ambisam.data import ensure_dataset
    from ambisam.errors import InputError

    if isinstance(methods, str):
        names = trainable_bundles() if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = [m.strip() for m in methods if m and m.strip()]
    for name in names:
        if not _implemented(name).trainable:
            raise InputError(None, f"method '{name}' is training-free: nothing to measure")
    sizes = sorted({int(s) for s in sizes})
    with tempfile.TemporaryDirectory(prefix="scale-data-") as tmp:
        folder = Path(data_dir) if data_dir else Path(tmp)
        datalists: dict[Any, Path] = dict(scale_data(folder / "scale", sizes, seed=seed))
        if default_data:
            datalists[_DEFAULT] = ensure_dataset(folder / "default", seed=seed)
        jobs = [(name, size) for name in names for size in datalists]
        progress = tqdm(jobs, desc="bench scale", unit="run") if _has_tqdm else jobs
        runs = []
        for name, size in progress:
            run = _in_fresh_process if isolate else (lambda fn, **kw: fn(**kw))
            runs.append(run(scale_run, method=name, datalist=str(datalists[size]), size=size,
                                          steps=steps, warmup=warmup, backbone=backbone, threads=threads,
                                          slice_batch_size=slice_batch_size, seed=seed,
                                          embedding_cache_ram_mb=embedding_cache_ram_mb))
    summary = []
    for name in names:
        rows = [r for r in runs if r["method"] == name]
        scaled = [r for r in rows if r["slices"] != _DEFAULT]
        small, large = scaled[0], scaled[-1]
        rss_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        rate_ratio = large["steps_per_s"] / small["steps_per_s"]
        peak = max(r["peak_rss_mib"] for r in rows)
        summary.append({
            "method": name, "rss_ratio": rss_ratio, "throughput_ratio": rate_ratio, "max_peak_rss_mib": peak,
            "rss_flat": rss_ratio <= RSS_FLATNESS_TARGET, "rss_under_limit": peak < RSS_LIMIT_MIB,
            "throughput_flat": rate_ratio >= THROUGHPUT_FLATNESS_TARGET,
        })
    return {
        "runs": runs, "methods": summary, "sizes": sizes, "steps": steps, "warmup": warmup,
        "embeddings": "synthetic", "backbone": backbone, "isolated": bool(isolate),
        "targets": {"rss_ratio_max": RSS_FLATNESS_TARGET, "peak_rss_mib_max": RSS_LIMIT_MIB,
                    "throughput_ratio_min": THROUGHPUT_FLATNESS_TARGET},
    }


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def format_scale(result: dict[str, Any]) -> str:
    """:func:`bench_scale`'s figures as a Markdown table (one row per method and size, the ratios of the
    largest size to the smallest on its last row) and the settings under it."""
    rows = ["| method | slices | volumes | steps/s | slices/s | peak RSS MiB | flatness (largest / smallest) |",
            "|---|---:|---:|---:|---:|---:|---|"]
    by_method = {s["method"]: s for s in result["methods"]}
    for r in result["runs"]:
        s = by_method[r["method"]]
        scaled = [x for x in result["runs"] if x["method"] == r["method"] and x["slices"] != _DEFAULT]
        cell = ""
        if r is scaled[-1]:
            cell = (f"RSS x{s['rss_ratio']:.3f} (flat: {_mark(s['rss_flat'])}), steps/s x{s['throughput_ratio']:.2f} "
                    f"(flat: {_mark(s['throughput_flat'])}); max {s['max_peak_rss_mib']:.0f} MiB "
                    f"(< 3 GiB: {_mark(s['rss_under_limit'])})")
        label = f"{r['training_slices']}" if r["slices"] != _DEFAULT else f"default ({r['training_slices']})"
        rows.append(f"| {r['method']} | {label} | {r['volumes']} | {r['steps_per_s']:.3f} | {r['slices_per_s']:.2f} "
                    f"| {r['peak_rss_mib']:.0f} | {cell} |")
    first = result["runs"][0]
    rows += ["", (
        f"Each row: one fresh process, the bundle's default settings (train_slice_batch_size "
        f"{first['train_slice_batch_size']}, embedding_cache_ram_mb {first['embedding_cache_ram_mb']}, "
        f"{first['embedding_cache_dtype']}, dataset_cache_ram_mb {first['dataset_cache_ram_mb']}), "
        f"{result['warmup']} warm-up + {result['steps']} timed steps of the trainer's own iteration on batches "
        f"from the bundle's data loader, {first['threads']} threads, backbone {result['backbone']}. "
        "Embeddings are SYNTHETIC: random, made on a slice's first lookup in place of the encoder and stored "
        "through the real EmbeddingCache (RAM bound, dtype, disk records), its RAM filled to the bound with "
        "synthetic entries before the first step; the loop, datalist and pipeline are the real ones. Peak RSS is the process's ru_maxrss. Targets: peak RSS flat within 10 % and under 3 GiB, "
        "throughput flat within 10 %; 'default' is the embedded default data set (not in the ratios)."
    )]
    return "\n".join(rows)


def print_scale(as_json: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`bench_scale` and print its table (or JSON)."""
    result = bench_scale(**kwargs)
    print(json.dumps(result, indent=2) if as_json else format_scale(result))
    return result
