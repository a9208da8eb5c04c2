"""``python -m ambisam bench precision``: how far a lower precision's masks are from float32's, and how much
faster it runs, on real and synthetic slices.

For each slice (the LIDC sample's cases, read in place from its folder, and a few synthetic cases' most
prompted slices) the default box baseline segments it with the box around the raters' union, once in float32
and once in the given precision (:mod:`ambisam.sam.precision`), and the two masks (logits above 0 at the
image's size) are compared by Dice. The encoder and one decoder call (one box) are timed in both precisions in
the same process, in turn, best of ``repeats`` (:func:`ambisam.bench.time_against_fp32`), so a shared machine slows
both alike and the ratio stays fair.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ambisam.bench import time_against_fp32
from ambisam.sam import DEFAULT_BACKBONE, build_backbone, check_precision, resolve_precision

__all__ = ["precision_slices", "bench_precision", "format_precision", "print_precision", "mask_dice"]

#: the window synthetic Hounsfield units are scaled by (the base configs' default CT window)
_WINDOW = (-1000.0, 400.0)


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _union_box(union: np.ndarray) -> torch.Tensor | None:
    ys, xs = np.nonzero(union)
    if len(ys) == 0:
        return None
    return torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)


def precision_slices(
    lidc: str | Path | None = None, synthetic: int = 3, seed: int = 0, cases: Sequence[str] | None = None
) -> Iterator[tuple]:
    """The slices measured: ``(name, image (1, 1, H, W) in [0, 1], box (1, 4))``.

    Args:
        lidc: the LIDC sample folder (``training/<id>/image_*.jpg``, ``label{0..3}_.jpg`` thresholded at 127), or
            ``None``; cases where no rater drew anything are left out (no box).
        synthetic: synthetic cases (:func:`ambisam.data.synth.synth_case`), each's slice with the largest
            raters' union, windowed to ``[-1000, 400]`` HU.
        seed: the synthetic cases' seed.
        cases: the LIDC case ids (folder names) to measure, in this order; ``None``: every case.

    Yields:
        One tuple per slice.
    """
    if lidc is not None:
        from PIL import Image

        root = Path(lidc) / "training"
        folders = sorted(root.iterdir(), key=lambda p: (len(p.name), p.name))
        for case in folders if cases is None else [root / str(c) for c in cases]:
            image_file = next(iter(sorted(case.glob("image_*.jpg"))), None)
            if image_file is None:
                continue
            labels = [np.asarray(Image.open(f).convert("L")) > 127 for f in sorted(case.glob("label*_.jpg"))]
            box = _union_box(np.any(labels, axis=0)) if labels else None
            if box is None:
                continue
            image = np.asarray(Image.open(image_file).convert("L"), dtype=np.float32) / 255.0
            yield f"lidc/{case.name}", torch.from_numpy(image)[None, None], box
    from ambisam.data.synth import synth_case

    rng = np.random.default_rng(seed)
    for i in range(synthetic):
        image, masks, _ = synth_case(rng)
        union = masks.any(axis=0)  # (H, W, D)
        k = int(union.sum(axis=(0, 1)).argmax())
        box = _union_box(union[..., k])
        if box is None:
            continue
        scaled = np.clip((image[..., k].astype(np.float32) - _WINDOW[0]) / (_WINDOW[1] - _WINDOW[0]), 0, 1)
        yield f"synthetic/{i}", torch.from_numpy(scaled)[None, None], box


@torch.no_grad()
def bench_precision(
    precision: str = "bf16",
    lidc: str | Path | None = None,
    synthetic: int = 3,
    repeats: int = 2,
    timed_slices: int = 1,
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    cases: Sequence[str] | None = None,
) -> dict:
    """Per-slice Dice of ``precision``'s box-baseline masks against float32's, and both precisions' timings.

    Args:
        precision: ``"bf16"`` or ``"auto"`` (what it resolves to on the CPU is recorded).
        lidc: the LIDC sample folder, or ``None`` for synthetic slices only.
        synthetic: synthetic slices (see :func:`precision_slices`).
        repeats: timed rounds per timed slice (best kept).
        timed_slices: the first so many slices are also timed.
        backbone: backbone registry name.
        checkpoint: its weights, where needed.
        threads: torch threads (default: torch's own setting).
        progress: print each slice's Dice as it is measured.
        cases: the LIDC case ids to measure (see :func:`precision_slices`).

    Returns:
        The figures: ``slices`` (name, Dice), ``dice_mean``, ``dice_min``, the encoder and decoder ms in both
        precisions and their ratios (float32 over ``precision``: above 1 is a speed-up).

    Raises:
        InputError: an unknown ``precision``.
    """
    precision = check_precision(precision)
    if threads:
        torch.set_num_threads(int(threads))
    bb = build_backbone(backbone, checkpoint)
    low = resolve_precision(precision, "cpu")
    slices, timings = [], []

    def run(image, box, setting):
        bb.precision = setting
        return bb(image, box)[0, 0] > 0

    for j, (name, image, box) in enumerate(precision_slices(lidc, synthetic, cases=cases)):
        dice = mask_dice(run(image, box, "fp32"), run(image, box, precision))
        slices.append({"slice": name, "dice": dice})
        if progress:
            print(f"{name}: Dice {dice:.4f}", flush=True)
        if j < timed_slices:
            timings.append(_time_both(bb, image, box, precision, repeats))
    bb.precision = "fp32"
    dices = [s["dice"] for s in slices]
    best = {k: min(t[k] for t in timings) for k in timings[0]} if timings else {}
    return {
        "precision": precision,
        "compute_dtype": low,
        "backbone": bb.name,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "slices": slices,
        "dice_mean": float(np.mean(dices)) if dices else None,
        "dice_min": float(np.min(dices)) if dices else None,
        **best,
        "encoder_speedup": best["encoder_ms_fp32"] / best["encoder_ms_low"] if best else None,
        "decoder_speedup": best["decoder_ms_fp32"] / best["decoder_ms_low"] if best else None,
    }


def _time_both(bb, image: torch.Tensor, box: torch.Tensor, precision: str, repeats: int) -> dict:
    """Encoder and one-box decoder ms in float32 and in ``precision``, interleaved in one process."""
    boxes = bb.boxes_to_input(box, tuple(image.shape[-2:]))
    bb.precision = "fp32"
    embedding = bb.encode(image)
    bb.precision = precision
    t = time_against_fp32(
        bb, repeats, encoder=lambda: bb.encode(image), decoder=lambda: bb.decode_boxes(embedding, boxes)
    )
    return {
        "encoder_ms_fp32": 1000 * t["encoder"][0],
        "encoder_ms_low": 1000 * t["encoder"][1],
        "decoder_ms_fp32": 1000 * t["decoder"][0],
        "decoder_ms_low": 1000 * t["decoder"][1],
    }


def format_precision(r: dict) -> str:
    """The figures as the lines the command prints."""
    lines = [
        f"precision: {r['precision']} (computes in {r['compute_dtype']} on this CPU, {r['machine']}), "
        f"backbone: {r['backbone']}, threads: {r['threads']}",
        f"Dice against fp32 over {len(r['slices'])} slices: mean {r['dice_mean']:.4f}, min {r['dice_min']:.4f} "
        "(target: mean >= 0.98, min >= 0.95)",
    ]
    if r.get("encoder_speedup") is not None:
        lines.append(
            f"encoder ms: fp32 {r['encoder_ms_fp32']:.0f}, {r['precision']} {r['encoder_ms_low']:.0f} "
            f"({r['encoder_speedup']:.2f}x); decoder ms (one box): fp32 {r['decoder_ms_fp32']:.1f}, "
            f"{r['precision']} {r['decoder_ms_low']:.1f} ({r['decoder_speedup']:.2f}x)"
        )
    lines += [f"  {s['slice']}: {s['dice']:.4f}" for s in r["slices"]]
    return "\n".join(lines)


def print_precision(as_json: bool = False, **kwargs) -> dict:
    """Run :func:`bench_precision` and print its figures (JSON with ``as_json``)."""
    result = bench_precision(**kwargs)
    print(json.dumps(result, indent=2) if as_json else format_precision(result))
    return result
