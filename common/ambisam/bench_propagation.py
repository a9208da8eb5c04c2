"""``python -m ambisam bench propagation``: Dice of a box-prompted method given a tight 3D box, with the same 2D box
on every slice of the box against box propagation (:mod:`ambisam.inferers.propagation`), per structure.

For each case of a datalist's split and each structure (the class map's structures for a multi-label datalist,
:func:`~ambisam.data.datalist_class_map`; its one foreground otherwise), the tight 3D box of the raters' union is
built from the label, as a box file would hold it, and the method samples the volume twice from it: once with the
box's 2D extent on every slice of its range (what a box file gives without propagation) and once with
propagation. Each mask (the mean of the N samples above 0.5) is scored by Dice against the raters' union, over the
volume and on the box's first and last slices (where a 3D box is loosest). Each mode encodes its own slices (no
embedding cache is shared), and its inferer calls are timed; the slices each mode encoded are counted. The figures
are printed and written as JSON with what the run did (:func:`ambisam.io.run_record`: the settings, the seed, the
versions, the command).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from ambisam.bench import _implemented, _inference_network
from ambisam.bench_precision import mask_dice
from ambisam.errors import InputError
from ambisam.inferers import SlicewiseSamplingInferer, split_sampling_output
from ambisam.sam import DEFAULT_BACKBONE

__all__ = ["PROPAGATION_MODES", "tight_box3d", "bench_propagation", "format_propagation", "print_propagation"]

#: the two ways a 3D box prompts its slices, in the order they are run and printed
PROPAGATION_MODES = ("same_box", "propagated")
#: the structure name of a datalist without a class map
FOREGROUND = "foreground"


def tight_box3d(mask: torch.Tensor) -> list[int] | None:
    """The tight 3D box of a volume mask, as a box file holds it.

    Args:
        mask: ``(H, W, D)``; nonzero voxels are foreground.

    Returns:
        ``[i_min, j_min, k_min, i_max, j_max, k_max]`` (inclusive voxel indices), or ``None`` for an empty mask.
    """
    nonzero = torch.nonzero(torch.as_tensor(mask) != 0)
    if nonzero.numel() == 0:
        return None
    return nonzero.amin(dim=0).tolist() + nonzero.amax(dim=0).tolist()


@contextlib.contextmanager
def _counting_encodes(backbone) -> Iterator[list[int]]:
    """Count the slices ``backbone.encode`` encodes within the block (the count is the list's one entry)."""
    count = [0]
    own = backbone.__dict__.get("encode")  # an encode set on the instance (else the class's method)
    encode = backbone.encode

    def counted(images: torch.Tensor) -> torch.Tensor:
        count[0] += int(images.shape[0])
        return encode(images)

    backbone.encode = counted
    try:
        yield count
    finally:
        if own is None:
            del backbone.encode
        else:
            backbone.encode = own


def _plain(x) -> torch.Tensor:
    """A MetaTensor's (or any array's) values as a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))


def _network(method: str, backbone: str, checkpoint: str | None) -> torch.nn.Module:
    """A training-free method's network (untrained weights of a trained one would measure nothing).

    Raises:
        InputError: an unknown or unavailable method, or a trainable one.
    """
    spec = _implemented(method)
    if spec.trainable:
        raise InputError(None, f"bench propagation runs training-free methods (e.g. baseline); '{method}' needs "
                               "trained weights")
    return _inference_network(spec, backbone, checkpoint).eval()


def _case_structures(case: dict, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, H, W, D)`` each structure's raters' union and ``(1, S, D, 4)`` the per-slice boxes of its tight 3D
    box (``-1`` rows everywhere for a structure the case does not hold)."""
    from ambisam.data import slice_boxes_from_box3d

    label = _plain(case["label"]) != 0
    s = len(names)
    unions = label.reshape(s, label.shape[0] // s, *label.shape[1:]).any(dim=1)
    depth = unions.shape[-1]
    rows = []
    for union in unions:
        box = tight_box3d(union)
        rows.append(-torch.ones(depth, 4) if box is None else slice_boxes_from_box3d(box, depth))
    return unions, torch.stack(rows)[None]


@torch.no_grad()
def bench_propagation(
    dataset_dir: str | Path = "data/synthetic",
    split: str | Sequence[str] = "test",
    num_samples: int = 4,
    margin: int = 3,
    start: str | int = "centre",
    method: str = "baseline",
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    structures: Sequence[str] | None = None,
    network: torch.nn.Module | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Dice per structure of the same 2D box on every slice of a tight 3D box against box propagation.

    Args:
        dataset_dir: a data set folder with ``datalist.json`` (a new or empty one gets the synthetic default,
            :func:`~ambisam.data.ensure_dataset`); a multi-label datalist's class map names its structures.
        split: the datalist split measured, or several (a list or comma-separated: ``"training,validation,test"``
            measures every case of a small data set).
        num_samples: ``N`` samples per slice.
        margin: the propagation margin in pixels.
        start: where propagation starts: ``"centre"`` or a slice index.
        method: a training-free method of :data:`ambisam.registry.method_registry` (ignored with ``network``).
        backbone: backbone registry name.
        checkpoint: its weights, where needed.
        threads: torch threads (default: torch's own setting).
        seed: the run's seed (each case's draws are seeded from it and the case id, :class:`~ambisam.data.CaseSeedd`).
        structures: with a class map, the structures to measure, in order (default: all).
        network: a method network to measure instead of ``method``'s (e.g. a stand-in in tests).
        out: write the figures as JSON there, with the run's record (:func:`ambisam.io.run_record`); ``None``: not.
        progress: print each case's Dice as it is measured.

    Returns:
        ``cases`` (per case and structure: its 3D box and, per mode of :data:`PROPAGATION_MODES`, ``dice`` and
        ``end_dice`` (the mean of the box's first and last slices)), ``structures`` (per structure: ``cases`` and the
        per-mode means), ``mean`` (per mode: the mean over structures of ``dice`` and ``end_dice``), ``seconds`` and
        ``slices_encoded`` per mode, and the settings.

    Raises:
        InputError: a bad data set or split, an unknown, unavailable or trainable method, or no structure in the
            split's labels.
    """
    from ambisam.data import (
        CaseSeedd,
        datalist_class_map,
        datalist_intensity,
        ensure_dataset,
        load_datalist,
        volume_transforms,
    )

    if threads:
        torch.set_num_threads(int(threads))
    net = network.eval() if network is not None else _network(method, backbone, checkpoint)
    datalist = ensure_dataset(dataset_dir)
    class_map = datalist_class_map(datalist)
    intensity = datalist_intensity(datalist)
    splits = [p.strip() for p in split.split(",")] if isinstance(split, str) else [str(p) for p in split]
    items = [item for name in splits for item in load_datalist(datalist, name, required=True)]
    transform = Compose([
        volume_transforms(modality=intensity.modality, window=intensity.window or (-1000, 400),
                          value_range=intensity.value_range, class_map=class_map, structures=structures),
        CaseSeedd(seed=seed),
    ])
    inferers = {
        "same_box": SlicewiseSamplingInferer(num_samples=num_samples),
        "propagated": SlicewiseSamplingInferer(num_samples=num_samples, box_propagation=True,
                                               propagation_margin=margin, propagation_start=start),
    }
    net.backbone.encode(torch.zeros(1, 1, 8, 8))  # warm-up: the first call in a process pays for its pages
    seconds = dict.fromkeys(PROPAGATION_MODES, 0.0)
    encoded = dict.fromkeys(PROPAGATION_MODES, 0)
    cases = []
    for item in items:
        case = transform(item)
        names = list(case.get("structures") or [FOREGROUND])
        unions, boxes = _case_structures(case, names)
        volume = _plain(case["image"])[None].float()
        preds = {}
        for mode, inferer in inferers.items():  # in turn per case: a shared machine's drift slows both alike
            with _counting_encodes(net.backbone) as count:
                begin = time.perf_counter()
                output = inferer(volume, net, box=boxes, case_seed=case["case_seed"].reshape(1))
                seconds[mode] += time.perf_counter() - begin
            encoded[mode] += count[0]
            preds[mode] = split_sampling_output(output[0], num_samples=num_samples)["pred"] > 0
        for t, name in enumerate(names):
            box = tight_box3d(unions[t])
            if box is None:
                continue  # the case does not hold this structure
            row = {"id": case.get("id", item.get("id")), "structure": name, "box": box}
            for mode in PROPAGATION_MODES:
                pred, truth = preds[mode][t], unions[t]
                ends = [mask_dice(pred[..., k], truth[..., k]) for k in (box[2], box[5])]
                row[mode] = {"dice": mask_dice(pred, truth), "end_dice": float(np.mean(ends))}
            cases.append(row)
            if progress:
                print(f"{row['id']} {name}: " + ", ".join(f"{m} Dice {row[m]['dice']:.3f}" for m in PROPAGATION_MODES),
                      flush=True)
    if not cases:
        raise InputError(datalist, f"no structure is marked in the labels of the split(s) {', '.join(splits)}")
    result = {
        "dataset": str(datalist),
        "split": ",".join(splits),
        "method": None if network is not None else method,
        "network": type(net).__name__,
        "backbone": getattr(net.backbone, "name", backbone),
        "num_samples": int(num_samples),
        "margin": int(margin),
        "start": start,
        "seed": int(seed),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),  # the 1, 5 and 15 minutes before the end: the timings' context
        "cases": cases,
        **_summary(cases),
        "seconds": seconds,
        "slices_encoded": encoded,
    }
    if out is not None:
        from ambisam.io import run_record, write_json

        result["record"] = str(write_json(out, run_record(job="bench propagation", **result)))
    return result


def _summary(cases: list[dict]) -> dict:
    """Per structure (in first-seen order) and over structures, the mean ``dice`` and ``end_dice`` of each mode."""
    structures: dict[str, dict] = {}
    for name in dict.fromkeys(row["structure"] for row in cases):
        rows = [row for row in cases if row["structure"] == name]
        structures[name] = {"cases": len(rows)}
        for mode in PROPAGATION_MODES:
            structures[name][mode] = {k: float(np.mean([r[mode][k] for r in rows])) for k in ("dice", "end_dice")}
    mean = {mode: {k: float(np.mean([s[mode][k] for s in structures.values()])) for k in ("dice", "end_dice")}
            for mode in PROPAGATION_MODES}
    return {"structures": structures, "mean": mean}


def format_propagation(r: dict) -> str:
    """The figures as the Markdown table and lines the command prints."""
    lines = [
        "| structure | cases | Dice, same box | Dice, propagated | end-slice Dice, same box "
        "| end-slice Dice, propagated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [(name, s["cases"], s) for name, s in r["structures"].items()]
    rows.append(("mean", sum(s["cases"] for s in r["structures"].values()), r["mean"]))
    for name, count, s in rows:
        lines.append(f"| {name} | {count} | {s['same_box']['dice']:.3f} | {s['propagated']['dice']:.3f} "
                     f"| {s['same_box']['end_dice']:.3f} | {s['propagated']['end_dice']:.3f} |")
    t, n = r["seconds"], r["slices_encoded"]
    lines += [
        "",
        f"seconds: same box {t['same_box']:.1f} s ({n['same_box']} slices encoded), propagated {t['propagated']:.1f} s "
        f"({n['propagated']} slices encoded)",
        f"{r['method'] or r['network']} on {r['backbone']}, N={r['num_samples']}, margin {r['margin']} px, start "
        f"{r['start']}, seed {r['seed']}, {r['threads']} threads ({r['machine']}, load "
        f"{'/'.join(f'{v:.1f}' for v in r['load_average'])}); data {r['dataset']}, split "
        f"{r['split']}; Dice against the raters' union, end slices: the tight 3D box's first and last",
    ]
    if r.get("record"):
        lines.append(f"record: {r['record']}")
    return "\n".join(lines)


def print_propagation(as_json: bool = False, **kwargs) -> dict:
    """Run :func:`bench_propagation` and print its figures (JSON with ``as_json``)."""
    result = bench_propagation(progress=not as_json, **kwargs)
    print(json.dumps(result, indent=2) if as_json else format_propagation(result))
    return result
