"""The main job on the embedded default: no data or weights to fetch.

``python -m ambisam demo --out runs/demo`` is a small benchmark of the whole collection
(:func:`ambisam.benchmark.run_benchmark`): it writes the synthetic multi-rater CT data set, then trains every
method that has a bundle (:func:`collection_methods`, read from :data:`ambisam.registry.method_registry`, so a
bundle that lands later joins with no change to the command) within a short time budget each, from cached
LiteMedSAM embeddings, and scores them and the training-free SAM baselines on the test split with the same
prompts, seed and metrics. It prints the table and where the figures are; ``results.md``/``results.json``, the
figures (per test case, metrics, reliability, convergence) and ``run.json`` (settings, versions, seed, timings) are
written into the output folder, each method's weights under ``<method>/seed0/models``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ambisam.data.synth import ensure_dataset
from ambisam.io import run_record, write_json
from ambisam.registry import get_method, method_registry
from ambisam.sam import DEFAULT_BACKBONE, segment_with_box

__all__ = ["run_demo", "collection_methods", "segment_file", "BASELINE_EVAL_OVERRIDES"]

logger = logging.getLogger(__name__)

#: overrides that turn a bundle's evaluate.json into an evaluation of the deterministic baseline with the same
#: data, prompts, metrics and writers (no weights to load)
BASELINE_EVAL_OVERRIDES = {
    "network_def": get_method("baseline").network_def(),
    "training_free": True,
}


def collection_methods() -> list[str]:
    """The main job's methods: every registered method with a bundle (one not written yet is reported as
    unavailable), then the training-free baselines on the SAM backbone, in registry order."""
    bundled = [name for name, spec in method_registry.items() if spec.bundle is not None]
    free = [name for name, spec in method_registry.items() if spec.bundle is None and not spec.trainable]
    return bundled + free


def run_demo(
    out: str | os.PathLike = "runs/demo",
    cases: int = 8,
    budget: float = 0.75,
    num_samples: int = 16,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 12),
    methods: str | tuple[str, ...] | list[str] | None = None,
    max_epochs: int | None = None,
    precision: str | None = None,
) -> list[dict]:
    """Run the embedded-default job; see the module docstring.

    Args:
        out: output folder.
        cases: synthetic cases to generate (half train, a quarter validation, a quarter test).
        budget: training minutes per trained method (all its stages together).
        num_samples: N samples per slice.
        seed: data, training and sampling seed.
        shape: the synthetic volumes' shape (12 slices: about 3-5 marked slices per volume, so every trained method
            gets several epochs within the budget on a CPU).
        methods: the methods, comma-separated or a sequence (default: :func:`collection_methods`).
        max_epochs: every trained method's upper bound on epochs (default: the bundles' own).
        precision: the evaluation's precision, ``"fp32"``, ``"bf16"`` or ``"auto"`` (default: the bundles' own;
            :mod:`ambisam.sam.precision`).

    Returns:
        The benchmark's entries (``results.json``), one per method.

    Raises:
        InputError: an unknown method, before anything is written.
    """
    from ambisam.benchmark.run import parse_methods, run_benchmark

    names = collection_methods() if methods is None else parse_methods(methods)  # before anything is written
    out = Path(out).resolve()
    started = time.time()
    datalist = ensure_dataset(out / "data", cases=cases, seed=seed, shape=shape)
    entries = run_benchmark(data=datalist, methods=names, samples=num_samples, out=out, budget=budget, seeds=1,
                            max_epochs=max_epochs, isolate=False, figure_cases=2, precision=precision)
    write_json(out / "demo.json", run_record(job="demo", backbone=DEFAULT_BACKBONE, precision=precision, seed=seed, cases=cases,
                                              budget_minutes=budget, num_samples=num_samples,
                                              methods=[e["method"] for e in entries],
                                              seconds=time.time() - started))
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.md'}  figures: {out / 'figures'}  weights: {out}/<method>/seed0/models  "
          f"in {time.time() - started:.0f} s")
    return entries


def segment_file(
    image: str,
    box: str,
    out: str,
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    precision: str = "fp32",
) -> Path:
    """Segment one 2D image file from a box ``"x_min,y_min,x_max,y_max"`` and write the mask as PNG.

    Args:
        image: the image file.
        box: the box in pixels.
        out: the PNG to write.
        backbone: backbone registry name.
        checkpoint: its weights, where needed.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:mod:`ambisam.sam.precision`).

    Returns:
        The path written.

    Raises:
        InputError: unreadable image, a non-2D image, a malformed box or an unknown precision.
    """
    from monai.data import PILReader
    from monai.transforms import LoadImage
    from PIL import Image

    from ambisam.errors import InputError

    if not Path(image).is_file():
        raise InputError(image, "image file not found")
    try:  # PNG/JPEG in row-major order; NIfTI and the other formats through MONAI's own readers
        array = np.asarray(LoadImage(image_only=True, reader=PILReader(reverse_indexing=False))(image))
    except Exception as e:  # noqa: BLE001
        raise InputError(image, f"cannot be read as an image ({e})") from e
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].mean(-1)
    if array.ndim != 2:
        raise InputError(image, f"is not a 2D image (shape {array.shape}); segment takes one slice")
    if min(array.shape) < 2:
        raise InputError(image, f"image of {array.shape[0]}x{array.shape[1]} pixels is too small to segment")
    if not np.isfinite(array).all():
        raise InputError(image, f"has {int((~np.isfinite(array)).sum())} NaN or infinite intensities")
    try:
        coords = [float(v) for v in (box.split(",") if isinstance(box, str) else box)]
        assert len(coords) == 4
    except (ValueError, AssertionError) as e:
        raise InputError(None, f"box must be 'x_min,y_min,x_max,y_max', got {box!r}") from e
    try:
        mask = segment_with_box(array, coords, backbone=backbone, checkpoint=checkpoint, precision=precision)
    except ValueError as e:
        raise InputError(image, str(e)) from e
    from ambisam.io import atomic_path

    with atomic_path(out) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    return Path(out)
