"""A synthetic CT-like multi-rater data set: one lung nodule-like lesion per case, outlined by K raters who
disagree the way LIDC-IDRI's radiologists do.

Each case is a lung-like volume in Hounsfield units (parenchyma about -850 HU with smooth texture and noise, a
few bright vessel-like tubes) holding one ellipsoidal lesion of about +40 HU. Rater ``r``'s mask is the set
where the lesion's signed distance (mm, positive outside) is below that rater's offset: a systematic bias (a
rater who draws larger or smaller) plus a smooth random field, so outlines differ by about 1-2 voxels. For
small lesions (in-plane radius below :data:`SMALL_RADIUS` voxels) each rater misses the lesion with
probability :data:`MISS_PROBABILITY`, and at least one rater always marks it.

With ``rater_styles`` the raters are four people who each draw the same way on every case (so that a method that
models rater ``r`` can be checked against rater ``r``): :data:`RATER_STYLES` ``generous`` (outline
:data:`STYLE_OFFSET_MM` +1.25 mm out), ``conservative`` (1.25 mm in), ``misses_faint`` (no bias, but never marks a
faint lesion) and ``typical`` (no bias), each with a small per-case jitter (SD 0.1 mm, at most 0.25 mm) and a weaker
smooth field than without styles (SD 0.25 mm). Offsets below the in-plane voxel size (0.8 mm) do not move
an outline at all, which is why the conservative offset is -1.25 mm rather than -1 mm (with -1 mm its outline was
sometimes the typical one). Every lesion that all three of generous, typical and conservative mark is then
larger for generous than for typical, and larger for typical than for conservative (checked on 450 cases). A
share :data:`FAINT_SHARE` of the lesions are then faint (ground-glass-like, about :data:`FAINT_HU` HU: 200 HU
above the parenchyma instead of about 900, still plainly visible in the lung window). No styled rater misses a
small lesion at random (the random misses of the unstyled set would blur the styles a method should learn): a
styled rater's empty mask is always ``misses_faint`` on a faint lesion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import optional_import
from scipy import ndimage

from ambisam.data.conventions import IntensityConvention
from ambisam.data.datalist import parse_split, split_by_patient, write_datalist
from ambisam.io import write_nifti
from ambisam.errors import InputError
from ambisam.io import run_record, write_json

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "synthesize",
    "synth_case",
    "SPACING",
    "SMALL_RADIUS",
    "MISS_PROBABILITY",
    "INTENSITY",
    "RATER_STYLES",
    "STYLE_OFFSET_MM",
    "FAINT_SHARE",
    "FAINT_HU",
    "synthesize_dataset",
    "ensure_dataset",
]

SPACING: tuple[float, float, float] = (0.8, 0.8, 2.0)
"""Voxel size in mm along i, j, k; the affine is ``diag(0.8, 0.8, 2.0, 1)`` (RAS)."""

RADIUS_RANGE: tuple[float, float] = (4.0, 14.0)
"""In-plane lesion radius in voxels, drawn log-uniformly (small nodules are the common ones)."""

SMALL_RADIUS: float = 6.0
"""Lesions with an in-plane radius (voxels) below this may be missed by raters."""

MISS_PROBABILITY: float = 0.4
"""Probability that a rater misses a small lesion."""

INTENSITY = IntensityConvention("ct", (-1000.0, 400.0))
"""The intensity convention written to the datalist: CT in HU, the lung window."""

RATER_STYLES: tuple[str, ...] = ("generous", "conservative", "misses_faint", "typical")
"""The raters of ``rater_styles``, in label channel order (the datalist's ``raters`` table); K must be 4."""

STYLE_OFFSET_MM: dict[str, float] = {"generous": 1.25, "conservative": -1.25, "misses_faint": 0.0, "typical": 0.0}
"""Each style's outline offset in mm (positive: the rater draws larger than the lesion)."""

FAINT_SHARE: float = 0.3
"""With ``rater_styles``: the probability that a case's lesion is faint (``misses_faint`` never marks it)."""

FAINT_HU: float = -650.0
"""With ``rater_styles``: the mean density of a faint lesion (solid ones are about +40 HU, the parenchyma -850)."""

_LESION_HU = 40.0  # mean density of a solid lesion
_BIAS_SD_MM, _BIAS_MAX_MM = 0.5, 1.2  # systematic per-rater offset of the outline
_FIELD_SD_MM, _FIELD_MAX_SD = 0.6, 3.0  # smooth per-rater outline perturbation (clipped at 3 SD)
_FIELD_SIGMA_MM = 3.0  # smoothness of that perturbation
_MAX_GROWTH_MM = _BIAS_MAX_MM + _FIELD_SD_MM * _FIELD_MAX_SD  # how far any rater's outline can grow
# with rater styles: per-case jitter of each style's offset (clipped) and a weaker smooth field, so that a style
# stays recognisable on every case; the largest growth, 1.25 + 0.25 + 0.25 * 3 mm, stays below _MAX_GROWTH_MM
_STYLE_JITTER_SD_MM, _STYLE_JITTER_MAX_MM = 0.1, 0.25
_STYLE_FIELD_SD_MM = 0.25


def _offset_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """A smooth random field with unit standard deviation, clipped at ``_FIELD_MAX_SD``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="reflect")
    field /= field.std() + 1e-12
    return np.clip(field, -_FIELD_MAX_SD, _FIELD_MAX_SD)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _check_styles(raters: int, rater_styles: bool) -> tuple[str, ...]:
    """The style of each rater (empty without ``rater_styles``); raises InputError unless ``raters`` is 4."""
    if not rater_styles:
        return ()
    if int(raters) != len(RATER_STYLES):
        raise InputError(
            None,
            f"rater_styles needs raters={len(RATER_STYLES)} (one rater per style: {', '.join(RATER_STYLES)}), "
            f"got raters={raters}",
        )
    return RATER_STYLES


def _outline_spread(style: str | None) -> tuple[float, float, float, float]:
    """A rater's outline offset in mm: ``(centre, jitter SD, jitter cap, smooth field SD)`` of a style, or
    (``None``, no styles) of the random systematic bias."""
    if style is None:
        return 0.0, _BIAS_SD_MM, _BIAS_MAX_MM, _FIELD_SD_MM
    return STYLE_OFFSET_MM[style], _STYLE_JITTER_SD_MM, _STYLE_JITTER_MAX_MM, _STYLE_FIELD_SD_MM


def synth_case(
    rng: np.random.Generator, shape: Sequence[int] = (96, 96, 24), raters: int = 4, rater_styles: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one synthetic case.

    Args:
        rng: the random generator (consumed deterministically).
        shape: the volume shape ``(H, W, D)``; slices along the last axis.
        raters: the number of raters K.
        rater_styles: rater ``r`` draws in the style :data:`RATER_STYLES` ``[r]`` (needs ``raters=4``), and the
            lesion is faint with probability :data:`FAINT_SHARE`. ``False``: the case is exactly as before the
            option existed.

    Returns:
        ``(image, masks, info)``: the image as ``int16`` Hounsfield units of ``shape``; the rater masks as
        ``uint8`` 0/1 of shape ``(K, H, W, D)``; and a JSON-serialisable dict describing the lesion (center
        and radii in voxels, whether it is small, which raters missed it, and with ``rater_styles`` whether it is
        ``faint``).

    Raises:
        InputError: ``shape`` cannot hold a lesion of the smallest radius away from the border, or
            ``rater_styles`` with ``raters`` other than 4.
    """
    styles = _check_styles(raters, rater_styles)
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(SPACING)
    margin = np.ceil(_MAX_GROWTH_MM / spacing) + 1  # voxels kept clear between any outline and the border
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")

    # lesion geometry: radii in voxels, physical proportions roughly spherical
    base = float(np.exp(rng.uniform(np.log(RADIUS_RANGE[0]), np.log(RADIUS_RANGE[1]))))
    radii = np.array(
        [
            base * rng.uniform(0.85, 1.15),
            base * rng.uniform(0.85, 1.15),
            max(1.2, base * spacing[0] * rng.uniform(0.7, 1.0) / spacing[2]),
        ]
    )
    room = (np.asarray(shape) - 1) / 2.0 - margin
    scale = min(1.0, float(np.min(room / radii)))
    if scale < 1.0:  # shrink to fit a small volume
        radii *= scale
        base *= scale
    if base < 2.0 or radii[2] < 1.0:
        raise InputError(None, f"synthetic shape {shape} is too small to hold a lesion away from the border")
    low, high = radii + margin, np.asarray(shape) - 1 - radii - margin
    center = rng.uniform(low, high)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0
    if not inside.any():  # sub-voxel ellipsoid: keep its nearest voxel
        inside[tuple(int(round(c)) for c in center)] = True
    sdist = ndimage.distance_transform_edt(~inside, sampling=spacing) - ndimage.distance_transform_edt(
        inside, sampling=spacing
    )

    # background: lung parenchyma with coarse and fine texture
    image = -850.0 + 35.0 * _offset_field(rng, shape, 6.0 / spacing) + 15.0 * _offset_field(rng, shape, 1.5 / spacing)
    # vessels: a few bright tubes with a 1 mm partial-volume ramp
    for _ in range(int(rng.integers(3, 7))):
        start = rng.uniform(0, np.asarray(shape) - 1)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        length_mm = rng.uniform(15.0, 40.0)
        steps = np.linspace(0.0, length_mm, int(length_mm / 0.4) + 1)
        points = start + steps[:, None] * direction / spacing
        points = np.round(points).astype(int)
        points = points[np.all((points >= 0) & (points < np.asarray(shape)), axis=1)]
        if len(points) == 0:
            continue
        centerline = np.ones(shape, dtype=bool)
        centerline[tuple(points.T)] = False
        distance = ndimage.distance_transform_edt(centerline, sampling=spacing)
        weight = np.clip(rng.uniform(0.8, 1.8) - distance + 0.5, 0.0, 1.0)
        image = image * (1 - weight) + rng.uniform(-150.0, 0.0) * weight
    # lesion: soft tissue (or, faint, ground-glass-like) with a 0.8 mm partial-volume ramp
    faint = bool(styles) and bool(rng.random() < FAINT_SHARE)  # no draw without styles
    weight = np.clip(0.5 - sdist / 0.8, 0.0, 1.0)
    lesion_hu = (FAINT_HU if faint else _LESION_HU) + 15.0 * _offset_field(rng, shape, 2.0 / spacing)
    image = image * (1 - weight) + lesion_hu * weight
    image += rng.normal(0.0, 12.0, size=shape)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)

    # raters
    small = base < SMALL_RADIUS
    blind = np.array([faint and style == "misses_faint" for style in styles] if styles else [False] * raters)
    # with styles only the style misses (a rater who drew at random would blur the style a method should learn)
    missed = (rng.random(raters) < MISS_PROBABILITY) if small and not styles else np.zeros(raters, dtype=bool)
    missed |= blind
    if missed.all():  # someone marks it: one of the raters who can see it
        free = np.flatnonzero(~blind)
        missed[int(free[int(rng.integers(len(free)))])] = False
    masks = np.zeros((raters,) + shape, dtype=np.uint8)
    for r in range(raters):
        centre, sd, cap, field_sd = _outline_spread(styles[r] if styles else None)
        bias = centre + float(np.clip(rng.normal(0.0, sd), -cap, cap))
        offset = bias + field_sd * _offset_field(rng, shape, _FIELD_SIGMA_MM / spacing)
        if missed[r]:
            continue
        mask = _largest_component(sdist < offset)
        if not mask.any():  # an outline shrunk to nothing on a tiny lesion: this rater still marked it
            mask = inside
        masks[r] = mask
    info = {
        "center": [round(float(c), 3) for c in center],
        "radii": [round(float(r), 3) for r in radii],
        "radius": round(base, 3),
        "small": bool(small),
        "missed_by": [int(r) for r in np.flatnonzero(missed)],
    }
    if styles:
        info["faint"] = faint
    return image, masks, info


def _output_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a path; raises InputError where it exists and is not a folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "output path exists and is not a folder")
    return out_dir


def _generate_cases(
    cases: int, seed: int, draw: Callable[[np.random.Generator], tuple], progress: bool
) -> list[tuple]:
    """Draw every case before anything is written (drawing may raise): ``[(id, *draw(rng)), ...]`` with id
    ``case<nnn>`` and case ``n`` drawn from ``numpy.random.default_rng([seed, n])``."""
    generated = []
    numbers = range(cases)
    if progress and _has_tqdm:
        numbers = tqdm(numbers, desc="synth", unit="case")
    for n in numbers:
        generated.append((f"case{n:03d}", *draw(np.random.default_rng([seed, n]))))
    return generated


def _write_record(
    out_dir: Path, kind: str, parameters: Mapping[str, Any], by_split: Mapping[str, Sequence], **details: Any
) -> Path:
    """Write ``out_dir/synth.json``: the run's ``kind``, its folder, ``parameters``, the cases per list, then
    ``details`` (each in the order given) and the versions (:func:`~ambisam.io.run_record`)."""
    counts = {k: len(v) for k, v in by_split.items()}
    record = run_record(kind=kind, out=str(out_dir.absolute()), **parameters, counts=counts, **details)
    return write_json(out_dir / "synth.json", record)


def synthesize(
    out_dir: str | os.PathLike,
    cases: int = 8,
    raters: int = 4,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 24),
    split: str | Sequence[float] = (0.5, 0.25, 0.25),
    rater_styles: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic multi-rater CT data set and its datalist.

    Writes ``imagesTr/<id>.nii.gz`` (``int16`` HU), ``labelsTr/<id>_rater<r>.nii.gz`` (``uint8`` 0/1, ``r``
    from 0), ``datalist.json`` (patient = id, split by :func:`~ambisam.data.datalist.split_by_patient`) and
    ``synth.json`` (the parameters, each case's lesion and the versions). The datalist's ``intensity`` block is
    :data:`INTENSITY` (CT, window ``[-1000, 400]``). Affine ``diag(0.8, 0.8, 2.0)``.
    Case ``n`` (id ``case<nnn>``) is drawn from ``numpy.random.default_rng([seed, n])``, so the arrays are the
    same for the same seed, and a case does not change when ``cases`` grows. With ``rater_styles`` the datalist
    names its raters (a ``raters`` table: :data:`RATER_STYLES`) and ``synth.json`` records the styles, their
    offsets and the faint lesions; without it the files are exactly those of before the option existed.

    Args:
        out_dir: the output folder (created).
        cases: the number of cases.
        raters: the number of raters K.
        seed: the random seed.
        shape: the volume shape ``(H, W, D)``.
        split: train, validation, test fractions.
        rater_styles: raters who draw consistently across cases (see :func:`synth_case`; needs ``raters=4``).
        progress: show a progress bar (tqdm, where installed) over the cases.

    Returns:
        The path of ``datalist.json``.

    Raises:
        InputError: a bad argument (checked before anything is written).
    """
    if int(cases) < 1 or int(raters) < 1:
        raise InputError(None, f"synth needs cases >= 1 and raters >= 1, got cases={cases}, raters={raters}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise InputError(None, f"synth shape must be three positive sizes (H, W, D), got {shape}")
    styles = _check_styles(raters, rater_styles)
    fractions = parse_split(split)
    out_dir = _output_folder(out_dir)
    shape = tuple(int(s) for s in shape)
    cases, raters, seed = int(cases), int(raters), int(seed)
    generated = _generate_cases(cases, seed, lambda rng: synth_case(rng, shape, raters, bool(styles)), progress)

    affine = np.diag([*SPACING, 1.0])
    items, lesions = [], {}
    for case_id, image, masks, info in generated:
        image_path = write_nifti(out_dir / "imagesTr" / f"{case_id}.nii.gz", image, affine)
        label_paths = [
            write_nifti(out_dir / "labelsTr" / f"{case_id}_rater{r}.nii.gz", masks[r], affine) for r in range(raters)
        ]
        items.append({"id": case_id, "patient": case_id, "image": image_path, "label": label_paths})
        lesions[case_id] = info
    by_split = split_by_patient(items, fractions, seed)
    datalist = write_datalist(out_dir, by_split, raters=styles or None, intensity=INTENSITY)
    style_record = {}
    if styles:  # only then: the record of a data set without styles stays as it was
        style_record = dict(
            rater_styles=list(styles),
            style_offsets_mm=[STYLE_OFFSET_MM[style] for style in styles],
            style_jitter_mm={"sd": _STYLE_JITTER_SD_MM, "max": _STYLE_JITTER_MAX_MM},
            style_field_sd_mm=_STYLE_FIELD_SD_MM,
            faint_share=FAINT_SHARE,
            faint_hu=FAINT_HU,
            faint_cases=sorted(case_id for case_id, info in lesions.items() if info["faint"]),
        )
    parameters = dict(cases=cases, raters=raters, seed=seed, shape=list(shape), spacing=list(SPACING),
                      split=list(fractions))
    _write_record(out_dir, "synth", parameters, by_split, radius_range=list(RADIUS_RANGE), small_radius=SMALL_RADIUS,
                  miss_probability=MISS_PROBABILITY, lesions=lesions, **style_record)
    return datalist


def synthesize_dataset(
    out_dir: str | os.PathLike, organs: bool | str | Sequence[str] | None = None, **options: Any
) -> Path:
    """Write the synthetic lesion data set (:func:`synthesize`) or, with ``organs``, the multi-organ one
    (:func:`~ambisam.data.synth_organs.synthesize_organs`): the one switch of ``ambisam synth`` and
    :func:`ensure_dataset`.

    Args:
        out_dir: the output folder (created).
        organs: ``None`` or ``False``: the lesion data set; ``True``: the organ data set with all 13 organs; organ
            names (a list or a comma-separated string): the organ data set labelling those.
        options: the other arguments of the function chosen (``cases``, ``seed``, ``shape``, ``split``,
            ``progress``; ``raters`` and ``rater_styles`` for lesions, ``spacing`` for organs); ``None`` leaves an
            argument at that function's default (lesions: 8 cases of ``(96, 96, 24)``, 4 raters; organs: 6 cases
            of ``(96, 96, 32)``, spacing ``(1.6, 1.6, 5.0)``).

    Returns:
        The path of ``datalist.json``.

    Raises:
        InputError: a bad argument, checked before anything is written: among them ``organs`` with more than one
            rater or with ``rater_styles``, and ``spacing`` without ``organs``.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if not _organ_mode(organs, options):
        return synthesize(out_dir, **options)
    from ambisam.data.synth_organs import synthesize_organs

    for lesion_only in ("raters", "rater_styles"):  # one rater and no styles: checked above
        options.pop(lesion_only, None)
    return synthesize_organs(out_dir, organs=organs, **options)


def _organ_mode(organs: bool | str | Sequence[str] | None, options: Mapping[str, Any]) -> bool:
    """Whether ``organs`` asks for the organ data set; raises InputError where ``options`` do not fit the one asked
    for (an unknown organ, more than one rater or rater styles with organs, a spacing without them)."""
    if organs is None or organs is False:
        if options.get("spacing") is not None:
            raise InputError(None, f"spacing applies to the organ data set (organs) only; the lesion data set's is "
                                   f"{SPACING}")
        return False
    from ambisam.data.synth_organs import organ_names

    organ_names(organs)
    raters, rater_styles = options.get("raters"), options.get("rater_styles", False)
    if rater_styles or raters not in (None, 1):
        raise InputError(None, "the organ data set has one rater (a label map per case): drop raters and "
                               f"rater_styles, got raters={raters}, rater_styles={rater_styles}")
    return True


def ensure_dataset(
    dataset_dir: str | os.PathLike,
    cases: int | None = None,
    raters: int | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    rater_styles: bool = False,
    organs: bool | str | Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """The datalist of ``dataset_dir``, writing the synthetic data set there first when the folder is new.

    This is how bundles run on the embedded default with no data to fetch: a missing or empty folder gets the
    synthetic data set; a folder with a ``datalist.json`` is used as it is; anything else is an error (it never
    writes synthetic data into a folder of yours). Bundle configs call it as
    ``ambisam.data.ensure_dataset(@dataset_dir, **@synthetic)``, ``synthetic`` holding these options:
    ``{"rater_styles": true}`` for the lesion set with rater styles, ``{"organs": true}`` (or a list of organ names)
    for the multi-organ set of :mod:`ambisam.data.synth_organs`.

    Args:
        dataset_dir: the data set folder.
        cases, raters, seed, shape, rater_styles, organs, spacing: as :func:`synthesize_dataset` (``None``: the
            generator's default; without ``organs``, 8 cases, 4 raters, ``(96, 96, 24)`` as before; ``spacing``
            with ``organs`` only), used only when the data set is generated.

    Returns:
        The path of ``dataset_dir/datalist.json``.

    Raises:
        InputError: the folder exists, is not empty and has no ``datalist.json``; with ``organs``, an unknown organ
            name, more than one rater or ``rater_styles`` (checked even where the data set exists).
    """
    options = dict(cases=cases, raters=raters, seed=seed, shape=shape, rater_styles=rater_styles, spacing=spacing)
    if organs is not None and organs is not False:  # a config naming an organ that does not exist is an error
        _organ_mode(organs, options)
    dataset_dir = Path(dataset_dir)
    datalist = dataset_dir / "datalist.json"
    if datalist.is_file():  # a data set is used as it is, whatever the options would have generated
        return datalist
    if dataset_dir.exists() and (not dataset_dir.is_dir() or any(dataset_dir.iterdir())):
        raise InputError(dataset_dir, "has no datalist.json (see docs/datalist.md, or `python -m ambisam convert`)")
    return synthesize_dataset(dataset_dir, organs, **options)
