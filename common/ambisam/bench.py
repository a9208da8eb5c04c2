"""Benchmarks: commands that print figures (speed and memory targets live here, never in timed tests).

``python -m ambisam bench training`` measures the speed-up of a training step from cached image embeddings
over the same step re-encoding its images (the frozen-encoder methods train this way): the trainer's own step
(``MultiRaterTrainer._iteration``), built from one of the method's training stages (``--stage``, the first by
default) through its bundle's configs on a tiny generated data set. In a stage whose encoder trains (P2SAM's
first) there is no cache: every step encodes, and only that step is timed.

``python -m ambisam bench sampling`` measures, for one method on the default backbone and this machine:
encoder ms per slice, decoder ms per sample, their FLOPs and achieved FLOP/s against this machine's matmul peak
measured in the same process (the roofline), the speed-up over re-encoding the slice for every sample (what the
seeds' code does), the ratio time(16 samples)/time(1 sample) for one slice (encoder
included: the whole point of encoding once is that this stays near 1 + 16 x decoder/encoder), and the
slicewise inferer's volume throughput. The network is the one the method infers with: a bundle method's is built
from the configs of its evaluation (P2SAM's: stage 2), a harness method's from its spec. ``--method all`` (or a
comma-separated list) measures every method of :mod:`ambisam.registry` whose network class exists and prints one
Markdown table, with the training speed-up of the trainable ones (per stage for a method with several) beside
their sampling figures.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from monai.utils import optional_import

from ambisam.allocator import allocator_settings, keep_freed_memory
from ambisam.errors import InputError
from ambisam.inferers import SlicewiseSamplingInferer
from ambisam.networks import Conditions
from ambisam.registry import MethodSpec, get_method, method_registry
from ambisam.sam import DEFAULT_BACKBONE, build_backbone, check_precision, set_precision

FlopCounterMode, _has_flop_counter = optional_import("torch.utils.flop_counter", name="FlopCounterMode")

__all__ = [
    "bench_sampling",
    "time_against_fp32",
    "count_flops",
    "matmul_peak",
    "format_sampling",
    "print_sampling",
    "bench_training",
    "format_training",
    "print_training",
    "bench_methods",
    "format_methods",
    "print_methods",
]


def _best_of(repeats: int, *fns: Callable[[], object]) -> tuple[float, ...]:
    """Smallest wall time of each callable over ``repeats`` rounds, in seconds (after one warm-up call of each).

    Every callable is timed in each round, in turn: a CPU whose speed drifts (a shared machine's does, within
    minutes) then slows them alike, and the ratios of the results stay fair.
    """
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return tuple(min(t) for t in times)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``, as torch's ``FlopCounterMode`` counts them (matrix products, convolutions and
    attention: the work a roofline compares with the machine's matmul peak; element-wise operations are not
    counted)."""
    if not _has_flop_counter:
        raise RuntimeError("torch.utils.flop_counter is not available in this torch")
    counter = FlopCounterMode(display=False)
    # inference mode, not only no_grad: the counter's module tracker hooks the autograd graph of any input that
    # requires grad (a module fed a parameter), which fails under no_grad
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """This machine's measured matrix-product rate in FLOP/s: the best of ``repeats`` ``size x size`` products in
    ``dtype`` (``2 size^3`` FLOPs each), with torch's current thread count. The roofline's ceiling: a network
    made of large matrix products cannot run faster than this."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    (t,) = _best_of(repeats, lambda: a @ b)
    return 2 * size**3 / t


def _ellipse_slice(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - size / 2) / (size / 6)) ** 2 + ((xx - size / 2) / (size / 5)) ** 2 < 1
    image = np.clip(0.2 + 0.5 * mask + np.random.default_rng(0).normal(0, 0.05, mask.shape), 0, 1)
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    return torch.from_numpy(image).float()[None, None], box


def _inference_configs(spec: MethodSpec) -> tuple[str, ...] | None:
    """The bundle configs that define the network a method with its own bundle infers with: those its evaluation
    merges ``evaluate.json`` over (P2SAM's ``train`` + ``train_stage2``: stage 2; MCL's ``train`` + ``train_mcl``);
    ``None`` for a harness method (its network is its spec's)."""
    return None if spec.bundle is None else spec.eval_configs[:-1]


def _inference_network(spec: MethodSpec, backbone: str, checkpoint: str | None) -> torch.nn.Module:
    """The network the method infers with, on the named backbone, untrained: a bundle method's ``network_def``
    from its :func:`_inference_configs`; a harness method's built from its spec (a network that brings its own
    backbone, the Probabilistic U-Net's image grid, as it is)."""
    configs = _inference_configs(spec)
    if configs is not None:
        from ambisam.bundle import bundle_workflow

        workflow = bundle_workflow(
            spec.config_bundle, configs, "train" if spec.trainable else "infer",
            **spec.config_overrides(), backbone=backbone, backbone_checkpoint=checkpoint,
        )
        return workflow.parser.get_parsed_content("network_def")
    if "backbone" in inspect.signature(spec.network_class).parameters:
        return spec.build(backbone=build_backbone(backbone, checkpoint))
    return spec.build()


@torch.no_grad()
def bench_sampling(
    method: str = "baseline",
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    num_samples: int = 16,
    repeats: int = 3,
    volume_slices: int = 64,
    threads: int | None = None,
    precision: str = "fp32",
    structures: int | None = None,
) -> dict:
    """Time encoding, sampling and a volume for one method.

    The network is the one the method infers with (see :func:`_inference_network`); each call gets the box and
    the image (:class:`~ambisam.networks.Conditions`), so that methods that read the image run and prompt-free
    ones ignore the box.

    Args:
        method: a name in :data:`ambisam.registry.method_registry` whose network class (and bundle) exist.
        backbone: backbone registry name.
        checkpoint: backbone weights, where the backbone needs them.
        num_samples: ``N`` for the ratio and the volume.
        repeats: timed rounds (the best is kept; encoder, samples and ratio are timed in turn in each round).
        volume_slices: prompted slices of the volume throughput test (default 64: a 256 x 256 x 64 volume, every
            slice prompted).
        threads: torch threads (default: torch's own setting).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:mod:`ambisam.sam.precision`): every figure is measured
            in it; when it computes in a lower dtype than float32, the encoder and the per-sample decoder are also
            timed in float32, in turn with it in the same rounds, for the speed-ups ``*_speedup_vs_fp32``.
        structures: structures prompted on every slice of the volume (organs, each its own box), all decoded from
            the slice's one embedding; ``None``: 13 (FLARE22's organs) for a multi-organ method (UR-SAM), else 1.
            The re-encoding comparison then encodes the slice once per structure and sample (per organ and box).

    Returns:
        A dict of the figures (also what ``--json`` prints), with the ``network`` class measured and, for a
        bundle method, the ``configs`` it was built from.

    Raises:
        InputError: an unknown method or precision, or a method not implemented yet.
    """
    if threads:
        torch.set_num_threads(int(threads))
    precision = check_precision(precision)
    spec = _implemented(method)
    net = set_precision(_inference_network(spec, backbone, checkpoint).eval(), precision)
    bb = net.backbone
    dtype = bb.compute_dtype() if hasattr(bb, "compute_dtype") else torch.float32
    image, box = _ellipse_slice(bb.image_size)
    size = tuple(image.shape[-2:])
    prompt = Conditions(boxes=bb.boxes_to_input(box, size), images=image)
    embedding = bb.encode(image)

    t_encode, t_sample_1, t_sample_n, t_1, t_n = _best_of(
        repeats,
        lambda: bb.encode(image),
        lambda: net.sample_logits(embedding, prompt, 1),
        lambda: net.sample_logits(embedding, prompt, num_samples),
        lambda: net.sample_logits(bb.encode(image), prompt, 1),
        lambda: net.sample_logits(bb.encode(image), prompt, num_samples),
    )

    volume = image[..., None].repeat(1, 1, 1, 1, volume_slices)
    volume = volume + 0.01 * torch.arange(volume_slices).view(1, 1, 1, 1, -1)  # distinct slices
    structures = int(structures or (13 if spec.multi_organ else 1))
    shifts = torch.arange(structures, dtype=torch.float32).view(-1, 1, 1) % 5  # each structure a box of its own
    boxes = (box.view(1, 1, 4) + shifts).clamp(max=bb.image_size - 1).repeat(1, volume_slices, 1)[None]
    inferer = SlicewiseSamplingInferer(num_samples=num_samples)
    (t_volume,) = _best_of(max(1, repeats - 2), lambda: inferer(volume, net, box=boxes))

    # the roofline: FLOPs of the encoder and of one sample's decoding, at what rate they ran, against this
    # machine's matmul peak in the same process and dtype
    encoder_flops = count_flops(lambda: bb.encode(image))
    sample_flops = count_flops(lambda: net.sample_logits(embedding, prompt, num_samples)) / num_samples
    peak = matmul_peak(dtype)
    speedups = _speedups_vs_fp32(net, image, embedding, prompt, num_samples, repeats) if dtype != torch.float32 else {}

    configs = _inference_configs(spec)
    seconds_per_slice = t_volume / volume_slices
    return {
        "method": method,
        "network": type(net).__name__,
        "configs": None if configs is None else list(configs),
        "backbone": getattr(bb, "name", backbone),
        "num_samples": num_samples,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "allocator": allocator_settings(),
        "encoder_ms_per_slice": 1000 * t_encode,
        "decoder_ms_one_sample": 1000 * t_sample_1,
        "decoder_ms_per_sample": 1000 * t_sample_n / num_samples,
        "time_1_s": t_1,
        f"time_{num_samples}_s": t_n,
        "ratio": t_n / t_1,
        "ratio_limit": 1 + num_samples * (t_sample_n / num_samples) / t_encode,
        "volume_slices": volume_slices,
        "volume_structures": structures,
        "volume_slices_per_s": volume_slices / t_volume,
        # what a user of the seeds' code pays: the slice encoded again for each of the N samples (and structures)
        "reencode_slices_per_s": 1 / (structures * num_samples * (t_encode + t_sample_1)),
        "speedup_over_reencoding": structures * num_samples * (t_encode + t_sample_1) / seconds_per_slice,
        "encoder_gflop": encoder_flops / 1e9,
        "decoder_gflop_per_sample": sample_flops / 1e9,
        "encoder_gflops": encoder_flops / t_encode / 1e9,
        "decoder_gflops": sample_flops / (t_sample_n / num_samples) / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "encoder_of_peak": encoder_flops / t_encode / peak,
        "decoder_of_peak": sample_flops / (t_sample_n / num_samples) / peak,
        "precision": precision,
        "compute_dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"),  # as run records say
        **speedups,
    }


def time_against_fp32(backbone, repeats: int, **fns: Callable[[], object]) -> dict[str, tuple[float, float]]:
    """Each callable timed in float32 and in the backbone's own precision (:attr:`SamBackbone.precision`), all
    in turn in the same rounds (:func:`_best_of`), so that a shared machine slows both alike.

    Args:
        backbone: the backbone whose precision is switched (restored afterwards).
        repeats: timed rounds (the best is kept).
        fns: name -> callable to time.

    Returns:
        name -> ``(float32 seconds, own precision's seconds)``.
    """
    own = backbone.precision

    def under(setting: str, fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            backbone.precision = setting
            fn()

        return call

    calls = [under(setting, fn) for fn in fns.values() for setting in ("fp32", own)]
    try:
        times = _best_of(repeats, *calls)
    finally:
        backbone.precision = own
    return {name: (times[2 * i], times[2 * i + 1]) for i, name in enumerate(fns)}


def _speedups_vs_fp32(net, image, embedding, prompt, num_samples: int, repeats: int) -> dict:
    """The encoder's and the per-sample decoder's speed-up of the backbone's precision over float32."""
    bb = net.backbone
    t = time_against_fp32(
        bb, repeats, encoder=lambda: bb.encode(image), decoder=lambda: net.sample_logits(embedding, prompt, num_samples)
    )
    return {
        "encoder_ms_per_slice_fp32": 1000 * t["encoder"][0],
        "decoder_ms_per_sample_fp32": 1000 * t["decoder"][0] / num_samples,
        "encoder_speedup_vs_fp32": t["encoder"][0] / t["encoder"][1],
        "decoder_speedup_vs_fp32": t["decoder"][0] / t["decoder"][1],
    }


def format_sampling(r: dict) -> str:
    """The benchmark's figures as the lines it prints."""
    n = r["num_samples"]
    return "\n".join(
        [
            f"method: {r['method']}  network: {r['network']}"
            + (f" ({' + '.join(r['configs'])})" if r.get("configs") else "")
            + f"  backbone: {r['backbone']}  threads: {r['threads']}  device: {r['device']}"
            + f"  allocator: {'keeps freed memory' if r.get('allocator') else 'as the C library sets it'}",
            f"encoder ms per slice: {r['encoder_ms_per_slice']:.1f}",
            f"decoder ms per sample: {r['decoder_ms_per_sample']:.1f} (one sample alone: {r['decoder_ms_one_sample']:.1f})",
            f"ratio time({n})/time(1): {r['ratio']:.2f} (target <= 2.0; limit 1 + {n} x decoder/encoder = {r['ratio_limit']:.2f})",
            f"volume throughput: {r['volume_slices_per_s']:.2f} slices/s ({r['volume_slices']} prompted slices, N={n}"
            + (f", {r['volume_structures']} structures per slice" if r.get("volume_structures", 1) > 1 else "")
            + "); "
            f"re-encoding each sample's slice: {r['reencode_slices_per_s']:.3f} slices/s, "
            f"{r['speedup_over_reencoding']:.1f}x slower (target >= 8x)",
            f"roofline (matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s, {r.get('compute_dtype', 'fp32')}, "
            f"{r['threads']} threads): "
            f"encoder {r['encoder_gflop']:.1f} GFLOP at {r['encoder_gflops']:.0f} GFLOP/s ({r['encoder_of_peak']:.0%} of peak); "
            f"decoder {r['decoder_gflop_per_sample']:.2f} GFLOP per sample at {r['decoder_gflops']:.0f} GFLOP/s "
            f"({r['decoder_of_peak']:.0%})",
        ]
        + _precision_lines(r)
    )


def _precision_lines(r: dict) -> list[str]:
    """The precision line of :func:`format_sampling` (none for a float32 run of the default precision)."""
    if r.get("precision", "fp32") == "fp32":
        return []
    line = f"precision: {r['precision']} (computes in {r['compute_dtype']})"
    if "encoder_speedup_vs_fp32" in r:
        line += (
            f"; against fp32 in the same run: encoder {r['encoder_ms_per_slice_fp32']:.1f} ms "
            f"({r['encoder_speedup_vs_fp32']:.2f}x), decoder per sample {r['decoder_ms_per_sample_fp32']:.1f} ms "
            f"({r['decoder_speedup_vs_fp32']:.2f}x)"
        )
    else:
        line += ": fp32 on this machine (no native bf16), nothing to compare"
    return [line]


def print_sampling(as_json: bool = False, **kwargs) -> dict:
    result = bench_sampling(**kwargs)
    print(json.dumps(result, indent=2) if as_json else format_sampling(result))
    return result


def _tiny_training_data(folder: Path) -> Path:
    """The datalist of a tiny generated data set (4 cases of 64 x 64 x 10) to draw one training batch from."""
    from ambisam.data import synthesize

    return synthesize(folder, cases=4, shape=(64, 64, 10), seed=0)


def _stage_configs(spec: MethodSpec, stage: int) -> tuple[str, ...]:
    """The configs of ``spec``'s training stage ``stage`` (1-based).

    Raises:
        InputError: a training-free method, or a stage it does not have.
    """
    if not spec.trainable:
        raise InputError(None, f"method '{spec.name}' is training-free: it has no training step to time")
    n = len(spec.stages)
    if not 1 <= int(stage) <= n:
        stages = "stage 1 only" if n == 1 else f"stages 1 to {n}"
        raise InputError(None, f"method '{spec.name}' has training {stages}, got stage {stage}")
    return spec.stages[int(stage) - 1]


def bench_training(
    method: str = "psam",
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    batch_size: int = 4,
    repeats: int = 3,
    threads: int | None = None,
    stage: int = 1,
) -> dict:
    """Time the trainer's own step from cached embeddings against the same step re-encoding its images.

    The method's train workflow is built from the configs of its training stage ``stage`` (its bundle's, or the
    harness bundle's with its network swapped in) on a tiny generated data set, from untrained weights (a later
    stage's ``init_weights`` is dropped: the weights do not change a step's time); the parsed
    ``train#trainer``'s iteration (``trainer._iteration(trainer, batch)``) is timed on one batch with its
    embedding cache warm, and with the cache taken away (``trainer.embedding_cache = None``: the frozen encoder
    runs every step). In a stage without a cache (its encoder trains, ``capabilities.encoder == "trainable"``,
    or the stage caches nothing) every step encodes: only that step is timed, and ``step_ms_cached`` and
    ``speedup`` are ``None``.

    Args:
        method: a trainable name in :data:`ambisam.registry.method_registry`.
        backbone: backbone registry name.
        checkpoint: backbone weights, where needed.
        batch_size: the config's ``batch_size`` (loader items per step; ``batch_size`` in the figures is the
            slices the step trains on).
        repeats: timed repetitions (the best is kept).
        threads: torch threads.
        stage: the training stage, 1-based (``spec.stages[stage - 1]``).

    Returns:
        The figures, with ``stage``, ``encoder`` (``"frozen"`` or ``"trainable"``) and ``speedup`` = encoding
        step time / cached step time (``None`` without a cache).

    Raises:
        InputError: an unknown, unavailable or training-free method, or a stage it does not have.
    """
    from ambisam.bundle import bundle_workflow

    if threads:
        torch.set_num_threads(int(threads))
    spec = _implemented(method)
    configs = _stage_configs(spec, stage)
    with tempfile.TemporaryDirectory(prefix="ambisam-bench-") as tmp:
        datalist = _tiny_training_data(Path(tmp) / "data")
        workflow = bundle_workflow(
            spec.config_bundle, configs, "train",
            **spec.config_overrides(),
            datalist=str(datalist), dataset_dir=str(datalist.parent), backbone=backbone,
            backbone_checkpoint=checkpoint, batch_size=int(batch_size), output_dir=str(Path(tmp) / "train"),
            ckpt_dir=str(Path(tmp) / "models"), init_weights=None,
        )
        trainer = workflow.parser.get_parsed_content("train#trainer")
        batch = next(iter(trainer.data_loader))
        cache = trainer.embedding_cache
        encoder = trainer.method.capabilities.encoder
        cached = cache is not None and encoder != "trainable"

        def step(embedding_cache) -> None:
            trainer.embedding_cache = embedding_cache
            trainer._iteration(trainer, batch)

        try:
            if cached:
                t_cached, t_encode = _best_of(repeats, lambda: step(cache), lambda: step(None))
            else:
                t_cached, (t_encode,) = None, _best_of(repeats, lambda: step(cache))
        finally:
            trainer.embedding_cache = cache
        slices = int(batch["image"].shape[0])
    return {
        "method": method,
        "bundle": spec.config_bundle,
        "stage": int(stage),
        "configs": list(configs),
        "backbone": getattr(trainer.method.backbone, "name", backbone),
        "encoder": encoder,
        "batch_size": slices,
        "threads": torch.get_num_threads(),
        "step_ms_cached": None if t_cached is None else 1000 * t_cached,
        "step_ms_encoding": 1000 * t_encode,
        "speedup": None if t_cached is None else t_encode / t_cached,
        "cache": None if cache is None else cache.log_stats(),
    }


def _uncached_step(r: dict) -> str:
    """Why a stage's steps all encode (``r``: :func:`bench_training`'s figures without a speed-up)."""
    if r["encoder"] == "trainable":
        return "the encoder trains in this stage: every step encodes; no cache"
    return "this stage caches no embeddings: every step encodes"


def format_training(r: dict) -> str:
    """The training benchmark's figures as the lines it prints."""
    head = (f"method: {r['method']}  stage: {r['stage']} ({' + '.join(r['configs'])})  backbone: {r['backbone']}  "
            f"batch: {r['batch_size']} slices  threads: {r['threads']}")
    if r["speedup"] is None:
        return "\n".join([head, f"training step: {r['step_ms_encoding']:.0f} ms ({_uncached_step(r)})"])
    return "\n".join(
        [
            head,
            f"training step from cached embeddings: {r['step_ms_cached']:.0f} ms",
            f"training step re-encoding the images: {r['step_ms_encoding']:.0f} ms",
            f"speed-up from cached embeddings: {r['speedup']:.1f}x (target >= 10x)",
        ]
    )


def print_training(as_json: bool = False, **kwargs) -> dict:
    result = bench_training(**kwargs)
    print(json.dumps(result, indent=2) if as_json else format_training(result))
    return result


def _implemented(method: str) -> MethodSpec:
    """The spec of a method that can run here: its network class and its bundle's configs exist.

    Raises:
        InputError: an unknown method, or one that cannot run yet (the reason: no network class, no bundle).
    """
    from ambisam.benchmark import method_availability

    spec = get_method(method)
    reason = method_availability(spec)
    if reason is not None:
        raise InputError(None, reason)
    return spec


def _method_names(methods: str | Sequence[str]) -> list[str]:
    from ambisam.benchmark import method_availability

    if isinstance(methods, str):
        if methods.strip() == "all":
            return [name for name, spec in method_registry.items() if method_availability(spec) is None]
        methods = methods.split(",")
    names = [m.strip() for m in methods if m and m.strip()]
    if not names:
        raise InputError(None, f"no method named; choose from {', '.join(method_registry)} or 'all'")
    for name in names:
        _implemented(name)
    return names


def _in_fresh_process(fn: Callable[..., dict], **kwargs) -> dict:
    """``fn(**kwargs)`` in a new Python process (``fn`` a module-level function), and its result.

    Each measurement of :func:`bench_methods` starts from the state a single ``bench sampling --method NAME``
    starts from. Within one process the encoder's time depends on what ran before it: glibc's allocator returns
    large freed blocks to the system or keeps them, depending on the sizes freed so far, and LiteMedSAM's encoder
    spends about half its time faulting fresh pages in (here: 950 ms per slice in a fresh process, 500 ms after
    another method's training step in the same one), which moved one method's ratio from 1.8 to 2.6.
    """
    with multiprocessing.get_context("spawn").Pool(1, initializer=keep_freed_memory) as pool:
        return pool.apply(fn, (), kwargs)


def bench_methods(
    methods: str | Sequence[str] = "all",
    training: bool = True,
    batch_size: int = 4,
    **kwargs,
) -> list[dict]:
    """:func:`bench_sampling` for several methods, and :func:`bench_training` for each training stage of the
    trainable ones, each in a fresh process (see :func:`_in_fresh_process`), so that every row is measured as if
    alone.

    Args:
        methods: ``"all"`` (every registered method whose network class exists), a comma-separated string or a
            list of names.
        training: also measure the cached-embedding training speed-up of the trainable methods.
        batch_size: slices per training step.
        kwargs: passed to :func:`bench_sampling` (``backbone``, ``checkpoint``, ``num_samples``, ``repeats``,
            ``volume_slices``, ``threads``); ``backbone``, ``checkpoint``, ``repeats`` and ``threads`` also to
            :func:`bench_training`.

    Returns:
        One dict per method: the sampling figures, ``trainable`` and, for a trainable method measured with
        ``training``, ``training_stages`` (per stage: ``stage``, ``encoder``, ``speedup``, ``step_ms_cached``,
        ``step_ms_encoding``) and, for a method of one stage, that stage's ``training_speedup``,
        ``step_ms_cached`` and ``step_ms_encoding``.

    Raises:
        InputError: an unknown method name, or one not implemented yet.
    """
    names = _method_names(methods)
    shared = {k: kwargs[k] for k in ("backbone", "checkpoint", "repeats", "threads") if k in kwargs}
    results = []
    for name in names:
        result = _in_fresh_process(bench_sampling, method=name, **{"structures": 1, **kwargs})  # one row per method
        result["trainable"] = get_method(name).trainable
        if training and result["trainable"]:
            stages = []
            for stage in range(1, len(get_method(name).stages) + 1):
                t = _in_fresh_process(bench_training, method=name, stage=stage, batch_size=batch_size, **shared)
                stages.append({k: t[k] for k in ("stage", "encoder", "speedup", "step_ms_cached", "step_ms_encoding")})
            result.update(training_stages=stages, training_batch_size=batch_size)
            if len(stages) == 1:
                result.update(training_speedup=stages[0]["speedup"], step_ms_cached=stages[0]["step_ms_cached"],
                              step_ms_encoding=stages[0]["step_ms_encoding"])
        results.append(result)
    return results


def _training_cell(r: dict) -> str:
    """The table's training column for one method: the speed-up from cached embeddings, or the step time of a
    stage without a cache; per stage (``stage 1: encoder trains, 2900 ms/step; stage 2: 14.2x``) for a method
    of several."""
    if not r.get("trainable"):
        return "training-free"
    stages = r.get("training_stages")
    if not stages:
        return "not measured"
    cells = [
        f"{t['speedup']:.1f}x" if t["speedup"] is not None else
        f"{'encoder trains' if t['encoder'] == 'trainable' else 'no cache'}, {t['step_ms_encoding']:.0f} ms/step"
        for t in stages
    ]
    if len(cells) == 1:
        return cells[0]
    return "; ".join(f"stage {t['stage']}: {cell}" for t, cell in zip(stages, cells))


def format_methods(results: Sequence[dict]) -> str:
    """A Markdown table of :func:`bench_methods`' figures, one row per method, and the settings under it."""
    n = results[0]["num_samples"]
    rows = [
        f"| method | encoder ms / slice | ms per sample (N={n}) | one sample alone, ms | ratio time({n})/time(1) "
        "| ratio limit | volume slices/s | x over re-encoding per sample | encoder / decoder % of matmul peak "
        "| training speed-up from cached embeddings |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['method']} | {r['encoder_ms_per_slice']:.0f} | {r['decoder_ms_per_sample']:.1f} "
            f"| {r['decoder_ms_one_sample']:.1f} | {r['ratio']:.2f} | {r['ratio_limit']:.2f} "
            f"| {r['volume_slices_per_s']:.2f} | {r['speedup_over_reencoding']:.1f} "
            f"| {r['encoder_of_peak']:.0%} / {r['decoder_of_peak']:.0%} | {_training_cell(r)} |"
        )
    first = results[0]
    rows.append("")
    rows.append(
        f"backbone {first['backbone']}, {first['threads']} threads, {first['device']} ({first['machine']}); ratio "
        f"target <= 2.0, ratio limit = 1 + {n} x decoder/encoder (what encoding once can reach at best); "
        f"volume: {first['volume_slices']} prompted slices; x over re-encoding: the seeds' cost per slice "
        f"(N x (encoder + one sample)) over the inferer's (target >= 8x); % of peak: achieved FLOP/s (torch's "
        f"FlopCounterMode) over this run's fp32 {first['matmul_peak_gflops']:.0f} GFLOP/s 2048^2 matmul"
        + (f"; training step: {next((r['training_batch_size'] for r in results if 'training_batch_size' in r), '')} "
           "slices" if any("training_batch_size" in r for r in results) else "")
    )
    return "\n".join(rows)


def print_methods(as_json: bool = False, **kwargs) -> list[dict]:
    results = bench_methods(**kwargs)
    print(json.dumps(results, indent=2) if as_json else format_methods(results))
    return results
