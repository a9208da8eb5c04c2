"""The main job on the embedded default: no data or weights to fetch.

``python -m ambisam demo --out runs/demo``: writes a synthetic multi-rater CT data set (if absent), runs the
sampling inferer with the deterministic box-prompted baseline (LiteMedSAM, shipped weights) on its test cases
with boxes from the raters' union, and writes per case the NIfTI outputs, then ``metrics.json`` (GED, HM-IoU,
D_max per case and overall), ``overview.png`` and ``run.json`` (config, versions, seed, timings).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ambisam.data.datalist import load_datalist
from ambisam.data.pipelines import volume_transforms
from ambisam.data.synth import synthesize
from ambisam.data.transforms import BoxesFromLabeld
from ambisam.figures import lesion_slice, overview_png
from ambisam.inferers import SlicewiseSamplingInferer, split_sampling_output
from ambisam.io import run_record, write_json
from ambisam.metrics import dice_max, ged, hm_iou, sample_diversity
from ambisam.networks import BoxPromptedSam
from ambisam.outputs import write_case_outputs
from ambisam.sam import DEFAULT_BACKBONE, segment_with_box

__all__ = ["run_demo", "segment_file", "case_metrics"]

logger = logging.getLogger(__name__)


def case_metrics(samples: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """GED, sample diversity, HM-IoU and D_max (per rater) of one case; N is ``len(samples)``.

    Args:
        samples: ``(N, ...)`` binary.
        raters: ``(K, ...)`` binary.
    """
    return {
        "ged": ged(samples, raters),
        "diversity": sample_diversity(samples),
        "hm_iou": hm_iou(samples, raters),
        "dice_max": dice_max(samples, raters),
    }


def run_demo(out: str | os.PathLike = "runs/demo", cases: int = 6, num_samples: int = 8, seed: int = 0) -> dict:
    """Run the embedded-default job; see the module docstring.

    Args:
        out: output folder (``data/``, ``outputs/``, ``metrics.json``, ``overview.png``, ``run.json``).
        cases: synthetic cases to generate.
        num_samples: N samples per slice.
        seed: the data and sampling seed.

    Returns:
        The overall metrics.
    """
    torch.manual_seed(seed)
    out = Path(out)
    started = time.time()
    datalist = out / "data" / "datalist.json"
    if not datalist.is_file():
        synthesize(out / "data", cases=cases, raters=4, seed=seed)
    items = load_datalist(datalist, "test")
    preprocess = volume_transforms(modality="ct")
    boxes = BoxesFromLabeld(label_key="label", box_key="box", jitter=0)
    net = BoxPromptedSam(DEFAULT_BACKBONE).eval()
    inferer = SlicewiseSamplingInferer(num_samples=num_samples)
    per_case, rows = {}, []
    for item in tqdm(items, desc="demo cases", unit="case"):
        data = boxes(preprocess(item))
        image, raters = data["image"], data["label"]
        t0 = time.time()
        output = inferer(image[None], net, box=data["box"][None])[0]
        seconds = time.time() - t0
        maps = split_sampling_output(output)
        write_case_outputs(
            out / "outputs", item["id"], maps, image.affine,
            record={"method": "baseline", "backbone": DEFAULT_BACKBONE, "seed": seed, "seconds": seconds,
                    "image": item["image"]},
        )
        samples, rater_np = maps["samples"].numpy() > 0.5, raters.numpy() > 0.5
        per_case[item["id"]] = dict(case_metrics(samples, rater_np), seconds=seconds)
        k = lesion_slice(rater_np)
        rows.append({
            "image": image[0, ..., k].numpy(), "raters": rater_np[..., k], "samples": samples[..., k],
            "mean": maps["mean"][0, ..., k].numpy(), "uncertainty": maps["uncertainty"][0, ..., k].numpy(),
            "label": f"{item['id']} z={k}",
        })
    overall = {m: float(np.mean([c[m] for c in per_case.values()])) for m in ("ged", "diversity", "hm_iou", "dice_max")}
    write_json(out / "metrics.json", {"num_samples": num_samples, "overall": overall, "cases": per_case})
    overview_png(out / "overview.png", rows, title=f"deterministic baseline (LiteMedSAM), N={num_samples}")
    write_json(out / "run.json", run_record(job="demo", method="baseline", backbone=DEFAULT_BACKBONE, seed=seed,
                                            cases=cases, num_samples=num_samples, seconds=time.time() - started))
    print(f"GED{num_samples} {overall['ged']:.3f}  HM-IoU{num_samples} {overall['hm_iou']:.3f}  "
          f"D_max {overall['dice_max']:.3f}  over {len(per_case)} test cases")
    print(f"outputs: {out / 'outputs'}  overview: {out / 'overview.png'}  metrics: {out / 'metrics.json'}")
    return overall


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
