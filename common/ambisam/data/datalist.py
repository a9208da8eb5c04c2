"""The multi-rater datalist: reading it (with checks), writing it, splitting cases into its three lists by
patient, and limiting the training list to fewer patients.

A datalist is a JSON file with the lists ``training``, ``validation`` and ``test``. Each item is::

    {"id": "case000", "patient": "case000", "image": "imagesTr/case000.nii.gz",
     "label": ["labelsTr/case000_rater0.nii.gz", ..., "labelsTr/case000_rater3.nii.gz"],
     "box": [i_min, j_min, k_min, i_max, j_max, k_max]}            # optional

Paths are relative to the datalist's folder. ``label`` holds one binary mask file per rater; MONAI's
``LoadImaged(keys=["image", "label"], ensure_channel_first=True)`` stacks them as channels ``(K, H, W, D)``.
``box`` is a 3D box of inclusive voxel indices in the array as stored (slices along the last axis). A ``null``
label entry is a rater who did not read the case. The optional top-level blocks ``raters``, ``labels`` and
``intensity`` are read and checked by :mod:`ambisam.data.conventions`. See ``docs/datalist.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from ambisam.data.conventions import (
    IntensityConvention,
    check_class_map,
    check_intensity,
    check_raters,
    datalist_raters,
    read_datalist_file,
)
from ambisam.data.ids import case_id
from ambisam.errors import InputError
from ambisam.io import atomic_path

__all__ = [
    "SPLITS",
    "load_datalist",
    "write_datalist",
    "parse_split",
    "split_by_patient",
    "limit_training_items",
    "natural_key",
]

SPLITS: tuple[str, str, str] = ("training", "validation", "test")
"""The three lists of a datalist, in the order of a ``split`` argument's fractions."""

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def natural_key(text: str) -> list:
    """Sort key that orders digit runs by value, so ``"2"`` sorts before ``"10"`` and ``"case2"`` before
    ``"case10"``.

    Args:
        text: the string to sort.

    Returns:
        A list alternating text parts and integers, comparable between any two strings.
    """
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", str(text)))]


def _header_grid(path: str) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The stored array shape and affine of a NIfTI file from its header alone, or ``None`` for other formats."""
    if not path.lower().endswith(_NIFTI_SUFFIXES):
        return None
    try:
        image = nib.load(path)
        return tuple(int(s) for s in image.shape), image.affine
    except Exception as e:  # nibabel raises several types for a damaged file
        raise InputError(path, f"not a readable NIfTI file ({e})") from e


def _check_rater_grids(image: str, files: Sequence[str | None]) -> tuple[int, ...] | None:
    """Each rater mask on its image's voxel grid (shape and affine, from the headers); returns the image's shape."""
    from ambisam.data.transforms.validation import affine_difference

    grid = _header_grid(image)
    if grid is None:
        return None
    shape, affine = grid
    for p in files:
        theirs = None if p is None else _header_grid(p)
        if theirs is None:
            continue
        if theirs[0][:3] != shape[:3]:
            raise InputError(p, f"rater mask shape {theirs[0]} differs from its image's {shape} ({image})")
        largest = affine_difference(theirs[1], affine)
        if largest is not None:
            raise InputError(p, f"rater mask's affine differs from its image's (largest difference {largest:.4g}) "
                                f"({image}): the mask lies on another voxel grid; resample it onto the image first.")
    return shape


def _check_box(box: Any, where: str, datalist: Path, shape: tuple[int, ...] | None) -> None:
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 6
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box)
    ):
        raise InputError(datalist, f"{where}: 'box' must be 6 integers [i_min, j_min, k_min, i_max, j_max, k_max]")
    lo, hi = box[:3], box[3:]
    if any(v < 0 for v in lo) or any(a > b for a, b in zip(lo, hi)):
        raise InputError(datalist, f"{where}: 'box' {list(box)} needs 0 <= min <= max on every axis")
    if lo[0] == hi[0] or lo[1] == hi[1]:
        raise InputError(datalist, f"{where}: 'box' {list(box)} has zero area in the slice plane (i_min == i_max or "
                         "j_min == j_max); a box prompt must span at least two voxels along i and j")
    if shape is not None:
        spatial = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        if any(b >= s for b, s in zip(hi, spatial)):
            raise InputError(datalist, f"{where}: 'box' {list(box)} reaches outside the image shape {spatial}")


def _case_rater_order(
    item: dict, where: str, datalist: Path, table: tuple[str, ...], declared: bool
) -> list[int] | None:
    """The global rater index of each of an item's ``label`` entries, or ``None`` to keep them as written.

    ``declared``: the datalist has a top-level ``raters`` table (else ``table`` holds positional names).
    """
    label = item["label"]
    if "raters" not in item:
        if declared and isinstance(label, list) and len(label) != len(table):
            raise InputError(
                datalist,
                f"{where} has {len(label)} 'label' entries but the datalist names {len(table)} raters {list(table)}: "
                "give one entry per rater (null for a rater who did not read the case) or the case's 'raters'",
            )
        return None
    names = item["raters"]
    if not isinstance(names, list) or not all(isinstance(r, str) for r in names):
        raise InputError(datalist, f"{where}: 'raters' must be a list of rater names, got {names!r}")
    labels = label if isinstance(label, list) else [label]
    if len(names) != len(labels):
        raise InputError(datalist, f"{where} names {len(names)} raters for {len(labels)} 'label' entries")
    unknown = [r for r in names if r not in table]
    if unknown:
        raise InputError(
            datalist, f"{where} ({item['image']}): unknown rater(s) {unknown}; the datalist's raters are {list(table)}"
        )
    if len(set(names)) != len(names):
        raise InputError(datalist, f"{where}: 'raters' {names} names a rater more than once")
    return [table.index(r) for r in names]


def _check_top_level(raw: dict, path: Path) -> tuple[tuple[str, ...], bool]:
    """Check the optional top-level blocks; return the rater table and whether the datalist declares it."""
    if "labels" in raw:
        check_class_map(raw["labels"], path)
    if "intensity" in raw:
        check_intensity(raw["intensity"], path)
    return datalist_raters(path, raw=raw), "raters" in raw


def load_datalist(
    path: str | os.PathLike, split: str, *, check_headers: bool = True, required: bool = False
) -> list[dict]:
    """Read one list of a multi-rater datalist, with absolute paths, after checking it.

    Paths are resolved against the datalist's folder by :func:`monai.data.load_decathlon_datalist` (which keeps
    ``label`` as a list, so ``LoadImaged`` stacks the raters as channels). Every other key (``id``,
    ``patient``, ``box``, ...) is returned exactly as written. An item without ``id`` gets
    :func:`~ambisam.data.case_id` of its image (the file name without its extension); one without ``patient``
    gets its ``id``. A ``label`` given as one string is returned as a list of one.

    Raters: a ``null`` label entry is a rater who did not read the case; it is returned as ``None`` (load the
    item with :class:`~ambisam.data.LoadRatersd`, which gives that rater a zero channel and ``rater_valid`` 0).
    Where the datalist names its raters (top-level ``raters``) or an item says whose its files are (its own
    ``raters``), ``label`` is returned in the datalist's rater order, one entry per rater, ``None`` where the
    item has no file for that rater, and the item's own ``raters`` key is dropped. Without either, ``label`` is
    returned as written.

    Args:
        path: the datalist JSON file.
        split: which list to read: ``"training"``, ``"validation"`` or ``"test"`` (any key of the JSON is
            accepted).
        check_headers: also read the NIfTI headers to check that every rater mask has the image's shape and
            affine and that a ``box`` lies inside the image (a few milliseconds per file; non-NIfTI files are
            skipped).
        required: an empty list is an error (training needs training and validation cases, evaluation test
            cases), not ``[]``.

    Returns:
        The items of that list: dicts with ``image`` (str), ``label`` (list of str, ``None`` for a rater who did
        not read the case), ``id``, ``patient`` and any other keys of the item. An empty list gives ``[]``.

    Raises:
        InputError: the datalist is missing or not valid JSON, has no list ``split`` (or, ``required``, an empty
            one), a malformed top-level ``raters``, ``labels`` or ``intensity`` block, an item is not a dict or
            lacks ``image`` or ``label`` or has no rater file at all or a malformed ``box``, an item's ``raters``
            names a rater the datalist does not have or does not match its ``label`` list, two items share an
            ``id``, an image or rater file does not exist, or (with ``check_headers``) a rater mask's shape or
            affine differs from its image's or a ``box`` lies outside it. The message names the offending file.
    """
    path = Path(path)
    raw = read_datalist_file(path)
    if split not in raw:
        present = [k for k in raw if isinstance(raw[k], list) and k != "raters"]
        raise InputError(path, f"has no list '{split}' (lists present: {present})")
    raw_items = raw[split]
    if not isinstance(raw_items, list):
        raise InputError(path, f"'{split}' must be a list of items, got {type(raw_items).__name__}")
    table, declared = _check_top_level(raw, path)
    if not raw_items:
        if required:
            raise InputError(path, f"the '{split}' list is empty: this run needs at least one {split} case")
        return []

    orders: list[list[int] | None] = []
    for n, item in enumerate(raw_items):
        where = f"{split}[{n}]"
        if not isinstance(item, dict):
            raise InputError(path, f"{where} must be an object with 'image' and 'label', got {item!r}")
        if not isinstance(item.get("image"), str) or not item["image"]:
            raise InputError(path, f"{where} has no 'image' path")
        if "label" not in item:
            raise InputError(path, f"{where} (image {item['image']}) has no 'label' list of rater masks")
        label = item["label"]
        if isinstance(label, str):
            label = [label]
        if not isinstance(label, list) or not label or not all(p is None or (isinstance(p, str) and p) for p in label):
            raise InputError(path, f"{where}: 'label' must be a non-empty list of rater mask paths (null: not read)")
        if all(p is None for p in label):
            raise InputError(path, f"{where} (image {item['image']}): every 'label' entry is null; no rater read it")
        orders.append(_case_rater_order(item, where, path, table, declared))

    # MONAI resolves 'image' and the 'label' list against the datalist folder; it modifies the items in place.
    # A list holding null it leaves as written; those entries are resolved here by the same rule.
    resolved = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=path.parent)

    items: list[dict] = []
    seen: dict[str, int] = {}
    for n, (orig, res, order) in enumerate(zip(raw_items, resolved, orders)):
        where = f"{split}[{n}]"
        item = copy.deepcopy(orig)  # every key other than image/label exactly as written
        item["image"] = str(res["image"])
        label = res["label"]
        files = [None if p is None else str(p) for p in ([label] if isinstance(label, str) else label)]
        if None in files:
            files = [None if p is None else os.path.normpath(path.parent / p) for p in files]
        if order is not None:
            item.pop("raters")
            placed: list[str | None] = [None] * len(table)
            for r, p in zip(order, files):
                placed[r] = p
            files = placed
        item["label"] = files
        item["id"] = case_id(item)
        item["patient"] = str(item["patient"]) if "patient" in item else item["id"]
        if item["id"] in seen:
            raise InputError(path, f"{where} repeats the id {item['id']!r} of {split}[{seen[item['id']]}]")
        seen[item["id"]] = n

        if not os.path.isfile(item["image"]):
            raise InputError(item["image"], f"image listed in {path} ({where}) does not exist")
        names = table if order is not None or declared else tuple(str(r) for r in range(len(files)))
        for name, p in zip(names, files):
            if p is not None and not os.path.isfile(p):
                raise InputError(p, f"rater {name} mask listed in {path} ({where}) does not exist")

        image_shape = _check_rater_grids(item["image"], files) if check_headers else None
        if "box" in item:
            _check_box(item["box"], where, path, image_shape)
        items.append(item)
    return items


def _relative(p: str | os.PathLike, out_dir: Path) -> str:
    return Path(os.path.relpath(Path(p).absolute(), out_dir.absolute())).as_posix()


def write_datalist(
    out_dir: str | os.PathLike,
    items_by_split: Mapping[str, Sequence[Mapping]],
    *,
    raters: Sequence[str] | None = None,
    labels: Mapping[str, int] | None = None,
    intensity: IntensityConvention | Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/datalist.json`` atomically, with paths relative to ``out_dir``.

    The optional top-level blocks come first (``raters``, ``labels``, ``intensity``, each only when given), then
    the three lists, always all three (empty where ``items_by_split`` has none). Item keys are written in the
    order ``id``, ``patient``, ``image``, ``label``, then any others (``box``, ``raters``, ...). A ``None`` label
    entry (a rater who did not read the case) is written as ``null``.

    Args:
        out_dir: the folder the datalist goes in (created if needed).
        items_by_split: ``{"training": [...], "validation": [...], "test": [...]}``; each item has ``image``
            and ``label`` (list of rater paths, ``None`` for not read), absolute or relative to the current
            directory.
        raters: the names of the raters, in label channel order (the ``raters`` block).
        labels: the class map ``{structure name: label value}`` of multi-label rater files (the ``labels`` block).
        intensity: the intensity convention, an :class:`~ambisam.data.IntensityConvention` or its block
            ``{"modality": ..., "window"/"range": ...}`` (the ``intensity`` block).

    Returns:
        The path of the written ``datalist.json``.

    Raises:
        ValueError: a key other than the three lists, or an item without ``image`` or ``label``.
        InputError: a malformed ``raters``, ``labels`` or ``intensity`` block (nothing is written).
    """
    out_dir = Path(out_dir)
    target = out_dir / "datalist.json"
    unknown = set(items_by_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown datalist lists {sorted(unknown)}; use {list(SPLITS)}")
    doc: dict[str, Any] = {}
    if raters is not None:
        doc["raters"] = list(check_raters(list(raters), target))
    if labels is not None:
        doc["labels"] = check_class_map(dict(labels), target)
    if intensity is not None:
        block = intensity.as_block() if isinstance(intensity, IntensityConvention) else intensity
        doc["intensity"] = check_intensity(block, target).as_block()
    for split in SPLITS:
        out_items = []
        for item in items_by_split.get(split, []):
            if "image" not in item or "label" not in item:
                raise ValueError(f"a {split} item needs 'image' and 'label': {dict(item)!r}")
            labels_ = [item["label"]] if isinstance(item["label"], (str, os.PathLike)) else list(item["label"])
            new: dict[str, Any] = {}
            if "id" in item:
                new["id"] = str(item["id"])
            if "patient" in item:
                new["patient"] = str(item["patient"])
            new["image"] = _relative(item["image"], out_dir)
            new["label"] = [None if p is None else _relative(p, out_dir) for p in labels_]
            for k, v in item.items():
                if k not in new:
                    new[k] = v
            out_items.append(new)
        doc[split] = out_items
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return target


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """Read train/validation/test fractions.

    Args:
        split: ``"0.6,0.2,0.2"`` or a sequence of three numbers (the CLI may pass either); each in [0, 1],
            summing to 1. ``"0,0,1"`` puts every case in ``test``.

    Returns:
        The three fractions as floats.

    Raises:
        InputError: not three non-negative numbers summing to 1.
    """
    parts: Sequence[Any] = split.split(",") if isinstance(split, str) else split
    try:
        values = tuple(float(v) for v in parts)
    except (TypeError, ValueError) as e:
        raise InputError(None, f"split {split!r}: expected three fractions train,val,test like 0.6,0.2,0.2") from e
    if len(values) != 3:
        raise InputError(None, f"split {split!r}: expected three fractions train,val,test, got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(None, f"split {split!r}: fractions must be non-negative numbers")
    if abs(sum(values) - 1.0) > 1e-6:
        raise InputError(None, f"split {split!r}: fractions must sum to 1, they sum to {sum(values):g}")
    return values  # type: ignore[return-value]


def _shuffled_patients(items: Sequence[Mapping], seed: int) -> tuple[list[str], list[str]]:
    """Each item's patient (``patient``, else ``id``), and the patients sorted naturally, then shuffled by
    ``numpy.random.default_rng(seed)``."""
    patient_of = [str(it.get("patient", it.get("id"))) for it in items]
    patients = sorted(set(patient_of), key=natural_key)
    order = np.random.default_rng(seed).permutation(len(patients))
    return patient_of, [patients[int(i)] for i in order]


def split_by_patient(
    items: Sequence[Mapping], fractions: str | Sequence[float], seed: int = 0
) -> dict[str, list[dict]]:
    """Assign whole patients to the training, validation and test lists, deterministically for a seed.

    Patients (sorted naturally, then shuffled by ``numpy.random.default_rng(seed)``) are cut into three runs
    whose sizes are the fractions of the number of patients, rounded by largest remainder. All items of one
    patient land in one list, so no patient's slices leak between lists.

    Args:
        items: dicts with a ``patient`` key (``id`` is used where ``patient`` is absent).
        fractions: train, validation, test fractions (see :func:`parse_split`).
        seed: the shuffling seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with the items (copied as dicts) in their
        input order.

    Raises:
        InputError: bad fractions.
    """
    values = parse_split(fractions)
    patient_of, patients = _shuffled_patients(items, seed)
    n = len(patients)
    exact = [f * n for f in values]
    counts = [int(math.floor(x)) for x in exact]
    by_remainder = sorted(range(3), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[: n - sum(counts)]:
        counts[s] += 1
    split_of: dict[str, str] = {}
    start = 0
    for name, count in zip(SPLITS, counts):
        for patient in patients[start : start + count]:
            split_of[patient] = name
        start += count
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for it, patient in zip(items, patient_of):
        out[split_of[patient]].append(dict(it))
    return out


def limit_training_items(items: Sequence[Mapping], limit: int | float | None, seed: int = 0) -> list[dict]:
    """A smaller training set of whole patients, chosen deterministically for a seed (a limited-data run: P2SAM's
    paper trains on 500 LIDC slices, 5.5% of its training set, and each LIDC item is one slice).

    Patients (sorted naturally, then shuffled by ``numpy.random.default_rng(seed)``, as :func:`split_by_patient`)
    are taken in that order until the count is reached; of the last patient taken only as many items as the count
    needs are kept (its first ones in input order), so at most one patient is cut.

    Args:
        items: dicts with a ``patient`` key (``id`` is used where ``patient`` is absent).
        limit: ``None`` (every item), a count (an ``int`` from 1 to ``len(items)``) or a fraction of the items (a
            ``float`` in ``(0, 1]``: ``round(limit * len(items))`` items, at least 1).
        seed: the shuffling seed.

    Returns:
        The chosen items, copied as dicts, in their input order.

    Raises:
        InputError: a limit that is not ``None``, a count from 1 to ``len(items)`` or a fraction in ``(0, 1]``.
    """
    count = _training_item_count(limit, len(items))
    patient_of, patients = _shuffled_patients(items, seed)
    items_of = Counter(patient_of)
    quota: dict[str, int] = {}
    for patient in patients:
        if count == 0:
            break
        quota[patient] = min(items_of[patient], count)
        count -= quota[patient]
    out: list[dict] = []
    for it, patient in zip(items, patient_of):
        if quota.get(patient, 0) > 0:
            quota[patient] -= 1
            out.append(dict(it))
    return out


def _training_item_count(limit: int | float | None, available: int) -> int:
    """How many of ``available`` items ``limit`` (see :func:`limit_training_items`) asks for."""
    if limit is None:
        return available
    if isinstance(limit, (bool, np.bool_)) or not isinstance(limit, (int, float, np.integer, np.floating)):
        raise InputError(None, f"training limit {limit!r}: expected a count of items (int) or a fraction (float)")
    if isinstance(limit, (int, np.integer)):
        if limit < 1:
            raise InputError(None, f"training limit {limit}: a count of items must be at least 1")
        count = int(limit)
    else:
        if not 0 < limit <= 1:
            raise InputError(None, f"training limit {limit}: a fraction of the items must be in (0, 1]; "
                                   "give a count of items as an int")
        count = max(1, round(float(limit) * available))
    if count > available:
        raise InputError(None, f"training limit {limit}: asks for {count} items, and there are only {available}")
    return count
