"""The main job on the embedded default: no data or weights to fetch.

``python -m ambisam demo --out runs/demo`` writes a synthetic multi-rater CT data set, then through the
``psam`` bundle's own configs (through :func:`ambisam.bundle.run_bundle`, as ``python -m monai.bundle run``
would run them): trains pSAM briefly from
cached LiteMedSAM embeddings, evaluates it and the deterministic box-prompted baseline on the test split with
the same prompts, runs pSAM's inference (NIfTI outputs per case), and writes ``overview.png`` (image, raters,
8 samples, mean, uncertainty per test case), ``comparison.json`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ambisam.bundle import run_bundle
from ambisam.data.synth import ensure_dataset
from ambisam.figures import lesion_slice, overview_png
from ambisam.io import run_record, write_json
from ambisam.registry import get_method
from ambisam.sam import DEFAULT_BACKBONE, segment_with_box

__all__ = ["run_demo", "segment_file", "BASELINE_EVAL_OVERRIDES"]

logger = logging.getLogger(__name__)

#: overrides that turn a bundle's evaluate.json into an evaluation of the deterministic baseline with the same
#: data, prompts, metrics and writers (no weights to load)
BASELINE_EVAL_OVERRIDES = {
    "network_def": get_method("baseline").network_def(),
    "training_free": True,
}


def run_demo(
    out: str | os.PathLike = "runs/demo",
    cases: int = 8,
    max_epochs: int = 6,
    num_samples: int = 16,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 24),
) -> dict:
    """Run the embedded-default job; see the module docstring.

    Args:
        out: output folder.
        cases: synthetic cases to generate (half train, a quarter validation, a quarter test).
        max_epochs: pSAM training epochs.
        num_samples: N samples per slice for evaluation and inference.
        seed: data, training and sampling seed.
        shape: the synthetic volumes' shape.

    Returns:
        GED, HM-IoU and D_max of pSAM and of the baseline on the test split.
    """
    out = Path(out).resolve()
    started = time.time()
    datalist = ensure_dataset(out / "data", cases=cases, seed=seed, shape=shape)
    common = {"dataset_dir": str(datalist.parent), "seed": seed, "num_samples": num_samples}
    psam = out / "psam"
    train = dict(common, ckpt_dir=str(psam / "models"), output_dir=str(psam / "train"), max_epochs=max_epochs,
                 val_interval=max(1, max_epochs // 2))
    run_bundle("psam", ["train"], **train)
    run_bundle("psam", ["train", "evaluate"], **train, eval_dir=str(psam / "evaluate"))
    run_bundle("psam", ["train", "evaluate"], **train, eval_dir=str(out / "baseline" / "evaluate"),
               **BASELINE_EVAL_OVERRIDES)
    run_bundle("psam", ["inference"], **common, ckpt_path=str(psam / "models" / "model.pt"),
               output_dir=str(psam / "inference"))

    reports = {m: json.loads((out / m / "evaluate" / "metrics.json").read_text()) for m in ("psam", "baseline")}
    keys = [f"ged{num_samples}", f"diversity{num_samples}", f"hm_iou{num_samples}", f"dice_max{num_samples}"]
    comparison = {m: {k: r["overall"][k] for k in keys} for m, r in reports.items()}
    write_json(out / "comparison.json", {"num_samples": num_samples, "split": "test", "methods": comparison})
    _overview(out, datalist, psam / "inference", num_samples)
    write_json(out / "run.json", run_record(job="demo", bundle="psam", backbone=DEFAULT_BACKBONE, seed=seed,
                                            cases=cases, max_epochs=max_epochs, num_samples=num_samples,
                                            seconds=time.time() - started))
    for m, values in comparison.items():
        print(f"{m:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"outputs: {psam / 'inference'}  overview: {out / 'overview.png'}  comparison: {out / 'comparison.json'}")
    return comparison


def _overview(out: Path, datalist: Path, inference_dir: Path, num_samples: int) -> Path:
    """The PNG: per test case, the slice where the raters' union is largest."""
    rows = []
    for item in json.loads(datalist.read_text())["test"]:
        image = np.asarray(nib.load(datalist.parent / item["image"]).dataobj, dtype=np.float32)
        raters = np.stack([np.asarray(nib.load(datalist.parent / p).dataobj) for p in item["label"]]) > 0
        k = lesion_slice(raters)
        load = lambda suffix: np.asarray(nib.load(inference_dir / f"{item['id']}_{suffix}.nii.gz").dataobj)  # noqa: E731
        rows.append({
            "image": np.clip((image[..., k] + 1000) / 1400, 0, 1),  # the lung window the bundle uses
            "raters": raters[..., k],
            "samples": np.moveaxis(load("samples")[..., k, :], -1, 0),
            "mean": load("mean")[..., k],
            "uncertainty": load("uncertainty")[..., k],
            "label": f"{item['id']} z={k}",
        })
    return overview_png(out / "overview.png", rows, max_samples=8, title=f"pSAM on synthetic test cases (N={num_samples}, 8 shown)")


def segment_file(image: str, box: str, out: str, backbone: str = DEFAULT_BACKBONE, checkpoint: str | None = None) -> Path:
    """Segment one 2D image file from a box ``"x_min,y_min,x_max,y_max"`` and write the mask as PNG.

    Raises:
        InputError: unreadable image, a non-2D image or a malformed box.
    """
    from monai.transforms import LoadImage
    from PIL import Image

    from ambisam.errors import InputError

    try:
        array = np.asarray(LoadImage(image_only=True, reverse_indexing=False)(image))
    except Exception as e:  # noqa: BLE001
        raise InputError(image, f"cannot be read as an image ({e})") from e
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].mean(-1)
    if array.ndim != 2:
        raise InputError(image, f"is not a 2D image (shape {array.shape})")
    try:
        coords = [float(v) for v in (box.split(",") if isinstance(box, str) else box)]
        assert len(coords) == 4
    except (ValueError, AssertionError) as e:
        raise InputError(None, f"box must be 'x_min,y_min,x_max,y_max', got {box!r}") from e
    try:
        mask = segment_with_box(array, coords, backbone=backbone, checkpoint=checkpoint)
    except ValueError as e:
        raise InputError(image, str(e)) from e
    from ambisam.io import atomic_path

    with atomic_path(out) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    return Path(out)
