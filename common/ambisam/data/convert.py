"""Converters from public multi-rater data layouts to NIfTI files and a multi-rater datalist.

Formats:

- ``lidc-folder``: ``<src>/training/<id>/image_<n>.jpg`` with ``label<r>_.jpg`` per rater (8-bit JPEG; masks
  thresholded at 127), as in the LIDC-IDRI sample of the CIMD repository. ``src`` may also be the folder of
  case folders itself. Patient = the case id.
- ``lidc-pickle``: the Probabilistic U-Net LIDC-IDRI pickle (``data_lidc.pickle``): a dict keyed by slice name,
  each value ``{"image": (128, 128) float, "masks": [4 x (128, 128)], "series_uid": str}``. Patient = the
  ``series_uid``, so the split never separates slices of one series. Only convert pickles you trust: reading a
  pickle can run code.
- ``qubiq``: the QUBIQ challenge layout ``<dataset>/Training/<case>/image.nii.gz`` with
  ``task<TT>_seg<SS>.nii.gz`` per label task ``TT`` and rater ``SS``. ``src`` is the data set folder (holding
  ``Training``) or a folder of case folders (e.g. ``Validation``). Patient = the case id.

A grouping (``groups=``: a JSON map ``{case id: patient}`` or a CSV column, see :func:`read_groups`) replaces the
format's patient for every format, so that :func:`~ambisam.data.datalist.split_by_patient` keeps a group whole
(e.g. the neighbouring slices of one LIDC nodule). Without one, a folder format splits by case and says so in one
logged warning.

Every case becomes ``imagesTr/<id>.nii.gz`` and ``labelsTr/<id>_rater<r>.nii.gz`` (``r`` from 0). 2D cases are
one-slice volumes ``(H, W, 1)`` with rows = i and columns = j as the source stores them; a multi-channel 2D
image (QUBIQ brain-tumor, ``(H, W, C)``) is written ``(H, W, 1, C)``, which ``LoadImaged`` with
``ensure_channel_first=True`` reads as ``(C, H, W, 1)``. The whole source is checked before anything is
written. The datalist gets the ``intensity`` block that fits the format (see :func:`_intensity_of`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from ambisam.data.conventions import IntensityConvention, check_intensity
from ambisam.data.datalist import natural_key, parse_split, split_by_patient, write_datalist
from ambisam.io import write_nifti
from ambisam.data.ids import case_id
from ambisam.errors import InputError
from ambisam.io import run_record, write_json

__all__ = ["convert", "read_groups", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("lidc-folder", "lidc-pickle", "qubiq")
"""The source layouts :func:`convert` reads."""

JPEG_THRESHOLD = 127
"""A JPEG mask pixel is foreground when its grey value is above this."""


@dataclass
class _Case:
    """One source case: ``load()`` returns ``(image, masks, affine)`` with the arrays as they will be written,
    or raises :class:`InputError`. ``where`` is the file or folder to name in messages about the case."""

    id: str
    patient: str
    where: Path
    load: Callable[[], tuple[np.ndarray, list[np.ndarray], np.ndarray]]


def _safe_id(text: str) -> str:
    """A file-name-safe id: characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``.

    Ids from a folder or file name are first derived with :func:`~ambisam.data.case_id` (the rule every part of
    ambisam uses); this only makes the result usable as a file name (a pickle's slice keys may hold anything).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).strip(".")
    return safe or "case"


def _binarize(mask: np.ndarray) -> np.ndarray:
    """0/1 ``uint8`` from a 0/1 mask (threshold 0.5) or an 8-bit 0/255 mask (threshold 127)."""
    mask = np.asarray(mask)
    threshold = 0.5 if mask.size == 0 or float(mask.max()) <= 1.0 else JPEG_THRESHOLD
    return (mask > threshold).astype(np.uint8)


def _case_folders(src: Path, training: str) -> Path:
    """The folder holding the case folders: ``src/<training>`` when it exists, else ``src``."""
    if not src.exists():
        raise InputError(src, "source folder not found")
    if not src.is_dir():
        raise InputError(src, "source must be a folder")
    nested = src / training
    return nested if nested.is_dir() else src


# ---------------------------------------------------------------------------------------------- lidc-folder


def _read_jpeg(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            grey = im if im.mode == "L" else im.convert("L")
            return np.array(grey, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise InputError(path, f"unreadable image ({e})") from e


def _lidc_folder_cases(src: Path, task: Any) -> list[_Case]:
    root = _case_folders(src, "training")
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )
    if not folders:
        raise InputError(root, "no case folders found (expected training/<id>/image_<n>.jpg and label<r>_.jpg)")
    cases = []
    for folder in folders:
        images = sorted(folder.glob("image_*.jpg"))
        if len(images) != 1:
            raise InputError(folder, f"expected one image_<n>.jpg in the case folder, found {len(images)}")
        raters = {}
        for p in folder.glob("label*.jpg"):
            m = re.fullmatch(r"label(\d+)_?\.jpg", p.name)
            if m:
                raters[int(m.group(1))] = p
        if not raters:
            raise InputError(folder, "no rater masks label<r>_.jpg in the case folder")
        label_paths = [raters[r] for r in sorted(raters)]

        def load(image_path: Path = images[0], label_paths: list[Path] = label_paths) -> tuple:
            image = _read_jpeg(image_path)
            masks = []
            for p in label_paths:
                mask = _read_jpeg(p)
                if mask.shape != image.shape:
                    raise InputError(p, f"mask shape {mask.shape} differs from image {image_path.name} {image.shape}")
                masks.append((mask > JPEG_THRESHOLD).astype(np.uint8)[..., None])
            return image.astype(np.float32)[..., None], masks, np.eye(4)

        cases.append(_Case(id=_safe_id(case_id(folder)), patient=folder.name, where=folder, load=load))
    return cases


# ---------------------------------------------------------------------------------------------- lidc-pickle


def _lidc_pickle_cases(src: Path, task: Any) -> list[_Case]:
    if not src.is_file():
        raise InputError(src, "pickle file not found")
    try:
        with open(src, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the user's own data file; documented as trusted input
    except Exception as e:  # unpickling raises anything
        raise InputError(src, f"not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not data:
        raise InputError(src, "no cases found: expected a non-empty dict {slice name: {image, masks, series_uid}}")
    cases = []
    for key in sorted(data, key=lambda k: natural_key(str(k))):
        value = data[key]
        if not isinstance(value, dict) or any(k not in value for k in ("image", "masks", "series_uid")):
            raise InputError(src, f"entry {key!r} needs the keys 'image', 'masks' and 'series_uid'")

        def load(key: Any = key, value: dict = value) -> tuple:
            image = np.asarray(value["image"])
            if image.ndim != 2:
                raise InputError(src, f"entry {key!r}: image must be 2D, got shape {image.shape}")
            try:
                raw_masks = list(value["masks"])
            except TypeError as e:
                raise InputError(src, f"entry {key!r}: 'masks' must be a list of 2D arrays") from e
            masks = []
            for r, mask in enumerate(raw_masks):
                mask = np.asarray(mask)
                if mask.shape != image.shape:
                    raise InputError(
                        src, f"entry {key!r}: mask {r} shape {mask.shape} differs from image {image.shape}"
                    )
                masks.append(_binarize(mask)[..., None])
            if not masks:
                raise InputError(src, f"entry {key!r} has no masks")
            return image.astype(np.float32)[..., None], masks, np.eye(4)

        cases.append(_Case(id=_safe_id(str(key)), patient=str(value["series_uid"]), where=src, load=load))
    return cases


# ---------------------------------------------------------------------------------------------------- qubiq

_QUBIQ_LABEL = re.compile(r"task(\d+)_seg(\d+)\.nii(\.gz)?")


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _qubiq_arrays(image_path: Path, label_paths: list[Path]) -> tuple:
    try:
        nii = nib.load(str(image_path))
        image = np.asarray(nii.dataobj, dtype=np.float32)
    except Exception as e:
        raise InputError(image_path, f"not a readable NIfTI image ({e})") from e
    if not np.isfinite(image).all():
        raise InputError(image_path, f"has {int((~np.isfinite(image)).sum())} NaN or infinite intensities")
    masks = []
    spatial: tuple[int, ...] | None = None
    for p in label_paths:
        try:
            mask = np.asarray(nib.load(str(p)).dataobj)
        except Exception as e:
            raise InputError(p, f"not a readable NIfTI mask ({e})") from e
        shape = _squeeze_trailing(mask.shape)
        if len(shape) not in (2, 3):
            raise InputError(p, f"mask must be 2D or 3D, got shape {mask.shape}")
        if spatial is None:
            spatial = shape
        elif shape != spatial:
            raise InputError(p, f"mask shape {mask.shape} differs from the case's other masks {spatial}")
        values = np.unique(mask)
        if not (np.isin(values, (0, 1)).all() or np.isin(values, (0, 255)).all()):
            shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise InputError(p, f"mask values must be 0/1 (or 0/255 for an 8-bit mask), found {shown}")
        mask = _binarize(mask.reshape(shape))
        masks.append(mask[..., None] if len(shape) == 2 else mask)
    assert spatial is not None
    # image: the masks' spatial shape, optionally followed by channels
    rest = tuple(image.shape[len(spatial) :])  # channels, if any
    if tuple(image.shape[: len(spatial)]) != spatial or sum(s != 1 for s in rest) > 1:
        raise InputError(label_paths[0], f"mask shape {spatial} does not match image {image_path.name} {image.shape}")
    channels = int(np.prod(rest, dtype=int))
    image = image.reshape(spatial + ((channels,) if channels > 1 else ()))
    if len(spatial) == 2:
        image = image[:, :, None] if channels == 1 else image[:, :, None, :]
    return image, masks, nii.affine


def _qubiq_cases(src: Path, task: Any) -> list[_Case]:
    root = _case_folders(src, "Training")
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )
    folders = [p for p in folders if any(p.glob("image.nii*"))]
    if not folders:
        raise InputError(root, "no case folders found (expected <case>/image.nii.gz and task<TT>_seg<SS>.nii.gz)")
    found: dict[int, dict[str, dict[int, Path]]] = {}
    for folder in folders:
        for p in folder.iterdir():
            m = _QUBIQ_LABEL.fullmatch(p.name)
            if m:
                found.setdefault(int(m.group(1)), {}).setdefault(folder.name, {})[int(m.group(2))] = p
    if not found:
        raise InputError(root, "no rater masks task<TT>_seg<SS>.nii.gz found in the case folders")
    if task is None:
        if len(found) > 1:
            names = ", ".join(f"task{t:02d}" for t in sorted(found))
            raise InputError(root, f"holds several label tasks ({names}): convert one at a time with task=<number>")
        task_no = next(iter(found))
    else:
        try:
            task_no = int(str(task).lower().removeprefix("task"))
        except ValueError as e:
            raise InputError(None, f"task {task!r}: expected a number like 2 or 'task02'") from e
        if task_no not in found:
            names = ", ".join(f"task{t:02d}" for t in sorted(found))
            raise InputError(root, f"has no label task task{task_no:02d} (found: {names})")
    cases = []
    for folder in folders:
        image_path = sorted(folder.glob("image.nii*"))[0]
        raters = found[task_no].get(folder.name, {})
        if not raters:
            raise InputError(folder, f"no rater masks task{task_no:02d}_seg<SS>.nii.gz in the case folder")
        label_paths = [raters[s] for s in sorted(raters)]

        def load(image_path: Path = image_path, label_paths: list[Path] = label_paths) -> tuple:
            return _qubiq_arrays(image_path, label_paths)

        cases.append(_Case(id=_safe_id(case_id(folder)), patient=folder.name, where=folder, load=load))
    return cases


QUBIQ_CT_SETS: tuple[str, ...] = ("kidney", "pancreas", "pancreatic-lesion")
"""QUBIQ data sets that are CT; the others (brain-growth, brain-tumor, prostate) are MRI."""

QUBIQ_CT_WINDOW: tuple[float, float] = (-160.0, 240.0)
"""The abdominal soft-tissue window written for QUBIQ CT stored in HU."""


def _intensity_of(format: str, src: Path, low: float, high: float) -> IntensityConvention:
    """The intensity convention of a converted data set, from its format and the images' value range.

    ``lidc-folder``: 8-bit JPEG grey values, ``none`` in ``[0, 255]``. ``lidc-pickle``: ``none`` in ``[0, 1]`` or
    ``[0, 255]`` where every image lies in that range, else ``none`` (per-image min-max). ``qubiq``: a CT data set
    (:data:`QUBIQ_CT_SETS`, recognised by the folder name) whose values reach below -200 (HU) gets ``ct`` with
    :data:`QUBIQ_CT_WINDOW`; every other QUBIQ set ``mri`` (per-image percentiles, which suits any scale).
    """
    if format == "lidc-folder":
        return IntensityConvention("none", None, (0.0, 255.0))
    if format == "lidc-pickle":
        for top in (1.0, 255.0):
            if low >= 0.0 and high <= top:
                return IntensityConvention("none", None, (0.0, top))
        return IntensityConvention("none")
    names = {p.name.lower() for p in [src.absolute(), *src.absolute().parents][:3]}
    if names & set(QUBIQ_CT_SETS) and low < -200.0:
        return IntensityConvention("ct", QUBIQ_CT_WINDOW)
    return IntensityConvention("mri")


def read_groups(path: str | os.PathLike, column: str | None = None) -> dict[str, str]:
    """A grouping of cases into patients, from a JSON map or a CSV column.

    Args:
        path: a ``.json`` file holding ``{case id: patient}``, or a ``.csv`` file with a header row whose case ids
            are in the column ``id`` (else ``case``, else the first column).
        column: the CSV column holding the patient (required for a CSV; not allowed for JSON).

    Returns:
        ``{case id: patient}``, both as strings.

    Raises:
        InputError: the file is missing or unreadable, is not a JSON object of strings/numbers, or the CSV lacks
            ``column``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "grouping file not found")
    if path.suffix.lower() == ".csv":
        if not column:
            raise InputError(path, "a CSV grouping needs the column holding the patient (groups_column=NAME)")
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(path, f"unreadable CSV ({e})") from e
        header = list(rows[0]) if rows else []
        if column not in header:
            raise InputError(path, f"has no column {column!r} (columns: {', '.join(header) or 'none'})")
        key = next((k for k in ("id", "case") if k in header), header[0])
        return {str(row[key]).strip(): str(row[column]).strip() for row in rows}
    if column:
        raise InputError(path, f"groups_column={column!r} applies to a CSV grouping only")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not readable JSON ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
        raise InputError(path, "expected a JSON object {case id: patient}")
    return {str(k): str(v) for k, v in data.items()}


def _apply_groups(cases: list[_Case], groups: Mapping[str, str], where: Path | None) -> None:
    """Set each case's patient from ``groups``.

    Raises:
        InputError: the grouping names none of the cases, or misses some (naming ``where``).
    """
    ids = [c.id for c in cases]
    if not set(ids) & set(groups):
        raise InputError(where, f"the grouping names no case of the source (cases: {', '.join(ids[:5])}, ...)")
    missing = [i for i in ids if i not in groups]
    if missing:
        raise InputError(where, f"the grouping has no patient for {len(missing)} case(s): {', '.join(missing[:10])}")
    for case in cases:
        case.patient = groups[case.id]


_READERS: dict[str, Callable[[Path, Any], list[_Case]]] = {
    "lidc-folder": _lidc_folder_cases,
    "lidc-pickle": _lidc_pickle_cases,
    "qubiq": _qubiq_cases,
}


def convert(
    format: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str | Sequence[float] = "0.6,0.2,0.2",
    seed: int = 0,
    *,
    task: int | str | None = None,
    intensity: IntensityConvention | dict | None = None,
    groups: str | os.PathLike | Mapping[str, str] | None = None,
    groups_column: str | None = None,
) -> Path:
    """Convert a public multi-rater data set to NIfTI files plus ``out/datalist.json`` and ``out/convert.json``.

    Every case is read and checked first (readable files, one rater count for all cases, masks the image's
    shape); only then are files written, so a bad source leaves ``out`` untouched. Images keep their
    intensities as ``float32`` (JPEG: 0..255; pickle: as stored); masks are ``uint8`` 0/1. Cases are split
    into training/validation/test by patient with :func:`~ambisam.data.datalist.split_by_patient`.

    Args:
        format: ``"lidc-folder"``, ``"lidc-pickle"`` or ``"qubiq"`` (see the module docstring).
        src: the source folder (``lidc-folder``, ``qubiq``) or pickle file (``lidc-pickle``).
        out: the output folder (created).
        split: train, validation, test fractions, ``"0.6,0.2,0.2"`` or three numbers; ``"0,0,1"`` puts every
            case in ``test``.
        seed: the split seed.
        task: ``qubiq`` only: which label task (``2`` or ``"task02"``) when the data set has several (e.g.
            brain-tumor, prostate); may be left out when it has one.
        intensity: the datalist's ``intensity`` block (an :class:`~ambisam.data.IntensityConvention` or
            ``{"modality": ..., "window"/"range": ...}``) where the default for the format does not fit; by default
            ``lidc-folder`` writes ``none`` in ``[0, 255]``, ``lidc-pickle`` ``none`` in ``[0, 1]`` or ``[0, 255]``
            where the images lie in it, and ``qubiq`` ``mri``, or ``ct`` with the window ``[-160, 240]`` for its CT
            sets stored in HU (see ``docs/datalist.md``).
        groups: which cases belong to one patient, so the split keeps them together: a ``.json`` file
            ``{case id: patient}``, a ``.csv`` file with ``groups_column`` (see :func:`read_groups`), or such a
            mapping. Every case must be in it. ``None``: the format's own patient (the case id for the folder
            formats, which logs a warning that the split is by case).
        groups_column: the CSV column holding the patient.

    Returns:
        The path of ``out/datalist.json``.

    Raises:
        InputError: unknown format, bad split, a malformed ``intensity``, missing source, no cases found, an
            unreadable file, a rater
            count that differs between cases, or a mask whose shape differs from its image's. The message names
            the offending file; nothing has been written. Also: an unreadable grouping, or one that names none of
            the cases or misses some (naming the grouping file).
    """
    if format not in _READERS:
        raise InputError(None, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fractions = parse_split(split)
    if intensity is not None:
        block = intensity.as_block() if isinstance(intensity, IntensityConvention) else intensity
        intensity = check_intensity(block, None)
    if task is not None and format != "qubiq":
        raise InputError(None, f"task= applies to the qubiq format only, not {format!r}")
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    cases = _READERS[format](src, task)
    groups_file = None
    if groups is not None:
        if isinstance(groups, Mapping):
            mapping = {str(k): str(v) for k, v in groups.items()}
        else:
            groups_file = Path(groups)
            mapping = read_groups(groups_file, groups_column)
        _apply_groups(cases, mapping, groups_file)
    elif format != "lidc-pickle":
        logger.warning(
            "convert %s: no grouping given, so every case is its own patient and the split is by case; neighbouring "
            "slices of one patient can then land in training and test, which makes every figure optimistic "
            "(pass groups=FILE)", format)

    # check everything before writing anything
    ids: dict[str, Path] = {}
    raters: int | None = None
    first: _Case | None = None
    low, high = math.inf, -math.inf
    for case in cases:
        if case.id in ids:
            raise InputError(case.where, f"case id {case.id!r} repeats that of {ids[case.id]}")
        ids[case.id] = case.where
        image, masks, _ = case.load()
        if image.size:
            low, high = min(low, float(np.min(image))), max(high, float(np.max(image)))
        if raters is None:
            raters, first = len(masks), case
        elif len(masks) != raters:
            reference = first.where if first else "the first case"
            raise InputError(case.where, f"has {len(masks)} rater masks but {reference} has {raters}")
        del image, masks

    items = []
    for case in cases:
        image, masks, affine = case.load()
        image_path = write_nifti(out / "imagesTr" / f"{case.id}.nii.gz", image, affine)
        label_paths = [
            write_nifti(out / "labelsTr" / f"{case.id}_rater{r}.nii.gz", mask, affine) for r, mask in enumerate(masks)
        ]
        items.append({"id": case.id, "patient": case.patient, "image": image_path, "label": label_paths})
    by_split = split_by_patient(items, fractions, seed)
    if intensity is None:
        intensity = _intensity_of(format, src, low, high)
    datalist = write_datalist(out, by_split, intensity=intensity)
    write_json(
        out / "convert.json",
        run_record(
            kind="convert",
            format=format,
            src=str(src.absolute()),
            out=str(out.absolute()),
            task=None if task is None else str(task),
            split=list(fractions),
            seed=int(seed),
            groups=None if groups is None else (str(groups_file.absolute()) if groups_file else "mapping"),
            groups_column=groups_column,
            cases=len(items),
            patients=len({it["patient"] for it in items}),
            raters=raters,
            intensity=intensity.as_block(),
            counts={k: len(v) for k, v in by_split.items()},
        ),
    )
    return datalist
