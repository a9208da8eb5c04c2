"""A synthetic multi-organ abdominal CT data set: FLARE22's 13 organs, one label map per case (one rater).

Each case is a contrast-enhanced (portal-venous-like) abdominal CT volume in Hounsfield units with the same
anatomy on every case, varied in size and position, for methods that segment many structures of one image
(UR-SAM's intensity rectification needs organs whose contrasts are those of real CT).

**Label map** (:data:`FLARE22_LABELS`, FLARE22's values): liver 1, kidney_right 2, spleen 3, pancreas 4, aorta 5,
inferior_vena_cava 6, adrenal_gland_right 7, adrenal_gland_left 8, gallbladder 9, esophagus 10, stomach 11,
duodenum 12, kidney_left 13; background 0. A subset of organs keeps these values (the datalist's ``labels`` block
lists the ones written, in this order); the image always holds all 13 organs, the others are left unlabelled.

**Axes.** Voxel ``(i, j, k)`` as stored, affine ``diag(spacing)`` (RAS) with the origin of :func:`organ_affine`:
``i`` runs from the patient's left to the patient's right (so the liver lies at high ``i``, the spleen at low
``i``), ``j`` from posterior to anterior (the spine at low ``j``, the table below it), ``k`` from inferior to
superior (slices; the liver dome and the esophagus in the top slices, the kidneys' lower poles near the bottom).
The anatomy is laid out relative to the field of view: in-plane in units of the body's half-width (along ``i``)
and half-depth (along ``j``), along ``k`` in fractions of the slab, so that any shape of at least
:data:`MIN_ORGAN_SHAPE` holds every organ; ``spacing`` sets the affine (and the organ volumes in ml that
``synth.json`` records). At the default, ``(96, 96, 32)`` voxels of ``(1.6, 1.6, 5.0)`` mm, the body is about
135 mm wide: a small patient, 160 mm of it from the liver dome down past the kidneys' lower poles.

**Hounsfield units** (:data:`ORGAN_HU`, :data:`TISSUE_HU`): liver 60, spleen 50, kidneys 150 (cortex), pancreas 45,
aorta 200, inferior vena cava 140, adrenal glands 30, gallbladder 10, esophagus 40, stomach 30 (with an air-fluid
level of gas, -1000 HU, in the most anterior part on some cases), duodenum 40; fat -100, muscle 50, vertebral
bone 400 (marrow) to 700 (cortex), intervertebral discs 90, spinal canal 20, unlabelled bowel loops 35 (some with
gas), air -1000, table 100. Each organ's mean is drawn within :data:`HU_VARIATION` of its value per case; a
smooth texture (SD 6 HU), a slight partial-volume blur and Gaussian noise (SD :data:`NOISE_HU`) follow. On most
cases neighbours of close densities touch, so that intensity alone does not tell their boundary: pancreas /
duodenum, pancreas / spleen, spleen / stomach, liver / stomach, liver / duodenum (liver and spleen, alike too, lie
apart).

**What varies per case** (drawn from ``rng``): the body's size (half-width 40-46 % of the field of view, half-depth
31-37 %), its centre (SD 2 % of the field of view, about 3 mm at the default), the fat and muscle wall thickness,
the scan range (the slab moves by up to 4 % of its height); each organ's size (a factor within
:data:`SIZE_VARIATION`, and 5 % per axis), its position (SD :data:`POSITION_SD` of the body's half-axes, about 2 mm
in-plane at the default, and of the slab's height, about 5 mm; at most twice that), its outline (one smooth random
field deforms the ellipsoids each organ is the union of) and its mean density; the bowel loops; the stomach gas.

Organs do not overlap: they are painted in :data:`PAINT_ORDER`, a later one over an earlier one, small organs last,
each within the abdominal cavity (never over the spine or the back muscles). Every labelled organ is non-empty and
on at least 2 slices (checked): no ellipsoid is smaller than 1.2 voxels in-plane and 2 slices, and the outline field
moves an outline in by at most half a radius.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ambisam.data.conventions import IntensityConvention
from ambisam.data.datalist import parse_split, split_by_patient, write_datalist
from ambisam.data.synth import _generate_cases, _offset_field, _output_folder, _write_record
from ambisam.errors import InputError
from ambisam.io import atomic_group, write_nifti

__all__ = [
    "FLARE22_LABELS",
    "ORGAN_HU",
    "TISSUE_HU",
    "PAINT_ORDER",
    "ORGAN_INTENSITY",
    "ORGAN_SPACING",
    "ORGAN_SHAPE",
    "MIN_ORGAN_SHAPE",
    "NOISE_HU",
    "HU_VARIATION",
    "SIZE_VARIATION",
    "POSITION_SD",
    "organ_names",
    "organ_affine",
    "synth_organ_case",
    "synthesize_organs",
]

FLARE22_LABELS: dict[str, int] = {
    "liver": 1,
    "kidney_right": 2,
    "spleen": 3,
    "pancreas": 4,
    "aorta": 5,
    "inferior_vena_cava": 6,
    "adrenal_gland_right": 7,
    "adrenal_gland_left": 8,
    "gallbladder": 9,
    "esophagus": 10,
    "stomach": 11,
    "duodenum": 12,
    "kidney_left": 13,
}
"""FLARE22's label map of its 13 abdominal organs, in its order and with its values."""

ORGAN_HU: dict[str, float] = {
    "liver": 60.0,
    "kidney_right": 150.0,
    "spleen": 50.0,
    "pancreas": 45.0,
    "aorta": 200.0,
    "inferior_vena_cava": 140.0,
    "adrenal_gland_right": 30.0,
    "adrenal_gland_left": 30.0,
    "gallbladder": 10.0,
    "esophagus": 40.0,
    "stomach": 30.0,
    "duodenum": 40.0,
    "kidney_left": 150.0,
}
"""Each organ's mean density in HU (contrast-enhanced CT; the stomach's gas aside)."""

TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "bone_cortex": 700.0,
    "bone_marrow": 400.0,
    "disc": 90.0,
    "spinal_canal": 20.0,
    "bowel": 35.0,
    "table": 100.0,
}
"""The densities in HU of the unlabelled tissues around the organs."""

PAINT_ORDER: tuple[str, ...] = (
    "liver",
    "stomach",
    "spleen",
    "kidney_right",
    "kidney_left",
    "duodenum",
    "pancreas",
    "gallbladder",
    "aorta",
    "inferior_vena_cava",
    "esophagus",
    "adrenal_gland_right",
    "adrenal_gland_left",
)
"""The order the organs are painted in: a later organ takes the voxels it shares with an earlier one."""

ORGAN_INTENSITY = IntensityConvention("ct", (-500.0, 1000.0))
"""The intensity convention written to the datalist: CT in HU, MedSAM's CT window ``[-500, 1000]`` (UR-SAM's)."""

ORGAN_SPACING: tuple[float, float, float] = (1.6, 1.6, 5.0)
"""The default voxel size in mm along i, j, k."""

ORGAN_SHAPE: tuple[int, int, int] = (96, 96, 32)
"""The default volume shape ``(H, W, D)``."""

MIN_ORGAN_SHAPE: tuple[int, int, int] = (32, 32, 8)
"""The smallest shape accepted: every organ is on at least 2 slices from it on."""

NOISE_HU: float = 15.0
"""The SD of the Gaussian image noise in HU."""

HU_VARIATION: float = 5.0
"""An organ's mean density on a case is drawn uniformly within this many HU of its :data:`ORGAN_HU`."""

SIZE_VARIATION: float = 0.15
"""An organ's size on a case is its layout's times a factor drawn uniformly in ``1 +- SIZE_VARIATION``."""

POSITION_SD: float = 0.03
"""The SD of an organ's position about its layout's, per axis in layout units (body half-axes in-plane, the slab's
height along k; at the default shape and spacing about 2 mm in-plane and 5 mm along k); clipped at twice this."""

# The layout: each organ is the union of ellipsoids (centre u, v, w; radii u, v, w). u: + towards the patient's
# right, in body half-widths from the body's centre; v: + anterior, in body half-depths; w: 0 at the bottom slice
# (inferior) to 1 at the top one (superior). A radius of 5 along w is a tube through every slice.
_LOBES: dict[str, tuple[tuple[float, float, float, float, float, float], ...]] = {
    "liver": ((0.50, 0.05, 0.70, 0.36, 0.55, 0.30), (0.05, 0.38, 0.76, 0.30, 0.25, 0.18)),  # right, left lobe
    "stomach": ((-0.38, 0.22, 0.72, 0.24, 0.26, 0.22), (-0.05, 0.42, 0.55, 0.22, 0.14, 0.10)),  # fundus, antrum
    "spleen": ((-0.66, -0.25, 0.70, 0.16, 0.30, 0.20),),
    "kidney_right": ((0.45, -0.42, 0.33, 0.13, 0.18, 0.22),),  # lower than the left one, on average
    "kidney_left": ((-0.45, -0.42, 0.40, 0.13, 0.18, 0.22),),
    "duodenum": (
        (0.18, 0.30, 0.50, 0.10, 0.09, 0.07),  # bulb, from the pylorus
        (0.30, 0.05, 0.38, 0.08, 0.10, 0.14),  # descending part, beside the pancreatic head
        (0.08, -0.08, 0.26, 0.22, 0.08, 0.06),  # horizontal part, in front of the great vessels
    ),
    "pancreas": (
        (0.16, 0.05, 0.40, 0.10, 0.12, 0.09),  # head, in the duodenal C-loop
        (-0.10, 0.10, 0.46, 0.18, 0.07, 0.06),  # body
        (-0.40, -0.05, 0.54, 0.16, 0.07, 0.06),  # tail, towards the splenic hilum
    ),
    "gallbladder": ((0.36, 0.40, 0.50, 0.08, 0.10, 0.12),),  # under the liver
    "aorta": ((-0.08, -0.28, 0.50, 0.065, 0.09, 5.0),),  # left of the midline, in front of the spine
    "inferior_vena_cava": ((0.16, -0.25, 0.50, 0.09, 0.07, 5.0),),  # right of the aorta, through the liver
    "esophagus": ((-0.06, -0.15, 0.90, 0.06, 0.07, 0.16),),  # the abdominal part, top slices
    "adrenal_gland_right": ((0.27, -0.38, 0.60, 0.035, 0.10, 0.08),),  # above the kidney, behind the IVC
    "adrenal_gland_left": ((-0.25, -0.36, 0.60, 0.035, 0.10, 0.08),),  # above the kidney, beside the aorta
}

_DEFORM = 0.25  # outline perturbation, in units of the ellipsoid function (1 on the outline); the field is <= 3 SD
_MIN_RADIUS_VOX = (1.2, 1.2, 2.0)  # smallest lobe radii in voxels: a core of >= 1 voxel in-plane, >= 2 slices
_FIELD_FRACTION = 1.0 / 12.0  # smoothness of the outline field, as a fraction of the shape
_AXIS_VARIATION = 0.05  # per-axis size factor on top of the organ's
_BODY_SHIFT = 0.02  # SD of the body's centre, as a fraction of the shape (about 3 mm at the default)
_SCAN_SHIFT = 0.04  # the slab's craniocaudal shift, as a fraction of its height
_TEXTURE_HU = 6.0
_BLUR_VOX = (0.5, 0.5, 0.3)  # partial-volume blur (Gaussian SD in voxels)
_GAS_PROBABILITY = 0.6
_TOP_SLICE_Z_MM = -80.0  # world z of the top slice


def organ_names(organs: bool | str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The organs a data set labels, in :data:`FLARE22_LABELS` order.

    Args:
        organs: ``None`` or ``True``: all 13; a comma-separated string (``"liver,spleen"``) or a sequence of
            names of :data:`FLARE22_LABELS`.

    Returns:
        The names, in FLARE22's label order whatever the order given.

    Raises:
        InputError: an unknown name (the message lists the known ones), a name given twice, or no name.
    """
    if organs is None or organs is True:
        return tuple(FLARE22_LABELS)
    if organs is False:
        raise InputError(None, "organs=False asks for no organ; give True (all 13) or organ names")
    if isinstance(organs, str):
        organs = organs.split(",")
    if not isinstance(organs, Sequence):
        raise InputError(None, f"organs must be True or organ names, got {organs!r}")
    names = [str(n).strip() for n in organs]
    names = [n for n in names if n]
    if not names:
        raise InputError(None, f"no organ named in {organs!r}; the organs are {', '.join(FLARE22_LABELS)}")
    unknown = [n for n in names if n not in FLARE22_LABELS]
    if unknown:
        raise InputError(None, f"unknown organ(s) {unknown}; the organs are {', '.join(FLARE22_LABELS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(None, f"organ(s) {repeated} named more than once")
    return tuple(n for n in FLARE22_LABELS if n in names)


def _check_grid(shape: Sequence[int], spacing: str | Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``shape`` and ``spacing`` as ints and floats; raises InputError unless they can hold every organ."""
    if len(shape) != 3 or any(int(s) < m for s, m in zip(shape, MIN_ORGAN_SHAPE)):
        raise InputError(None, f"synthetic organ shape must be three sizes (H, W, D) of at least {MIN_ORGAN_SHAPE} "
                               f"(smaller volumes cannot hold every organ on 2 slices), got {tuple(shape)}")
    try:
        spacing = tuple(float(s) for s in (spacing.split(",") if isinstance(spacing, str) else spacing))
    except (TypeError, ValueError) as e:
        raise InputError(None, f"spacing must be three sizes in mm, got {spacing!r}") from e
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(None, f"spacing must be three positive sizes in mm, got {spacing}")
    return tuple(int(s) for s in shape), spacing


def organ_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The voxel-to-world (RAS) matrix of a synthetic organ volume: ``diag(spacing)``, the scanner's isocentre in
    the middle of each slice and the top slice at z = -80 mm (an abdominal scan range).

    Args:
        shape: the volume shape ``(H, W, D)``.
        spacing: the voxel size in mm along i, j, k.

    Returns:
        The ``(4, 4)`` affine.
    """
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = [
        -(shape[0] - 1) / 2.0 * spacing[0],
        -(shape[1] - 1) / 2.0 * spacing[1],
        _TOP_SLICE_Z_MM - (shape[2] - 1) * spacing[2],
    ]
    return affine


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """The ellipsoid function ``sum(((x - c) / r) ** 2)`` (1 on the outline) over a broadcast grid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _body(
    rng: np.random.Generator, shape: tuple[int, ...], grid_vox: tuple[np.ndarray, ...], table: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The tissues around the organs: HU image, the cavity the organs lie in, and the body's frame.

    Returns ``(hu (H, W, D) float32, cavity (H, W, D) bool, frame)``; ``frame`` maps layout units to voxels:
    ``centre`` (i, j), ``half`` (half-width along i, half-depth along j, slab height along k) and ``shift_w``.
    """
    h, w, d = shape
    _, jj, kk = grid_vox
    offset = np.clip(rng.normal(0.0, _BODY_SHIFT, 2), -2.0 * _BODY_SHIFT, 2.0 * _BODY_SHIFT) * np.array([h, w])
    centre = np.array([(h - 1) / 2.0, 0.53 * (w - 1)]) + offset  # a little anterior: room for the table
    half = np.array([rng.uniform(0.40, 0.46) * h, rng.uniform(0.31, 0.37) * w, d - 1.0])
    frame = {"centre": centre, "half": half, "shift_w": rng.uniform(-_SCAN_SHIFT, _SCAN_SHIFT)}
    u, v, wz = _layout_grid(grid_vox, frame)
    taper = 1.0 + rng.uniform(-0.06, 0.06) * (wz - 0.5)  # the body widens or narrows along the slab
    radius = np.sqrt((u / taper) ** 2 + (v / taper) ** 2)  # 1 on the skin
    fat, muscle = rng.uniform(0.05, 0.12), rng.uniform(0.04, 0.07)
    cavity_edge = 1.0 - fat - muscle
    hu = np.full(shape, TISSUE_HU["air"], np.float32)
    hu[np.broadcast_to(radius <= 1.0, shape)] = TISSUE_HU["fat"]
    hu[np.broadcast_to((radius <= 1.0 - fat) & (radius > cavity_edge), shape)] = TISSUE_HU["muscle"]
    if table:  # a flat table top, 2 voxels thick, a voxel below the back
        back = centre[1] - half[1] * (1.0 + 0.06)
        slab = (jj <= back - 1.0) & (jj > back - 3.0) & (np.abs(u) < 0.9)
        hu[np.broadcast_to(slab, shape)] = TISSUE_HU["table"]

    # back muscles and psoas (muscle), the spine: vertebral bodies with discs, the posterior arch and the canal
    spine = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        back_muscle = _ellipsoid((u, v), (0.2 * side, -0.78), (0.17, 0.16)) <= 1.0
        hu[np.broadcast_to(back_muscle, shape)] = TISSUE_HU["muscle"]
        spine |= np.broadcast_to(back_muscle, shape)
        psoas = _ellipsoid((u, v, wz), (0.22 * side, -0.42, 0.0), (0.08, 0.10, 0.5)) <= 1.0
        hu[np.broadcast_to(psoas, shape)] = TISSUE_HU["muscle"]
    vertebra = _ellipsoid((u, v), (0.0, -0.5), (0.13, 0.14))
    period = d / 5.0  # five vertebrae over the slab
    disc = ((kk + rng.uniform(0.0, period)) % period) < 0.2 * period
    body_bone = np.broadcast_to(vertebra <= 1.0, shape)
    hu[body_bone] = TISSUE_HU["bone_cortex"]
    hu[np.broadcast_to(vertebra <= 0.7, shape)] = TISSUE_HU["bone_marrow"]
    hu[np.broadcast_to((vertebra <= 1.0) & disc, shape)] = TISSUE_HU["disc"]
    arch = (_ellipsoid((u, v), (0.0, -0.71), (0.09, 0.10)) <= 1.0) | (
        _ellipsoid((u, v), (0.0, -0.86), (0.03, 0.09)) <= 1.0
    )
    hu[np.broadcast_to(arch, shape)] = TISSUE_HU["bone_cortex"]
    hu[np.broadcast_to(_ellipsoid((u, v), (0.0, -0.71), (0.05, 0.055)) <= 1.0, shape)] = TISSUE_HU["spinal_canal"]
    spine |= body_bone | np.broadcast_to(arch, shape)
    cavity = np.broadcast_to(radius <= cavity_edge, shape) & ~spine

    # unlabelled bowel loops in the lower abdomen, some with gas on top (anterior: the patient lies supine)
    for _ in range(int(rng.integers(3, 6))):
        c = (rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.6), rng.uniform(0.05, 0.35))
        r = (rng.uniform(0.10, 0.16), rng.uniform(0.08, 0.14), rng.uniform(0.06, 0.12))
        loop = (_ellipsoid((u, v, wz), c, r) <= 1.0) & cavity
        hu[loop] = TISSUE_HU["bowel"]
        if rng.random() < 0.5:
            hu[loop & np.broadcast_to(v > c[1] + 0.5 * r[1], shape)] = TISSUE_HU["air"]
    return hu, cavity, frame


def _layout_grid(grid_vox: tuple[np.ndarray, ...], frame: dict) -> tuple[np.ndarray, ...]:
    """The layout coordinates ``(u, v, w)`` of the voxel grid (broadcastable arrays)."""
    ii, jj, kk = grid_vox
    centre, half = frame["centre"], frame["half"]
    return (ii - centre[0]) / half[0], (jj - centre[1]) / half[1], kk / half[2] - frame["shift_w"]


def _paint_organs(
    rng: np.random.Generator, shape: tuple[int, ...], grid_vox: tuple[np.ndarray, ...], frame: dict, cavity: np.ndarray
) -> np.ndarray:
    """Every organ of :data:`PAINT_ORDER` painted into one label map ``(H, W, D) uint8`` (FLARE22 values)."""
    u, v, wz = _layout_grid(grid_vox, frame)
    half = frame["half"]
    # one outline field for all organs: its correlation length (1/12 of the shape) is far below their distances
    deformation = _DEFORM * _offset_field(rng, shape, np.asarray(shape) * _FIELD_FRACTION)
    anatomy = np.zeros(shape, np.uint8)
    for name in PAINT_ORDER:
        lobes = np.asarray(_LOBES[name], dtype=np.float64)
        scale = rng.uniform(1.0 - SIZE_VARIATION, 1.0 + SIZE_VARIATION)
        scale *= rng.uniform(1.0 - _AXIS_VARIATION, 1.0 + _AXIS_VARIATION, 3)
        shift = np.clip(rng.normal(0.0, POSITION_SD, 3), -2.0 * POSITION_SD, 2.0 * POSITION_SD)
        anchor = lobes[0, :3]
        function = None
        for lobe in lobes:
            centre = anchor + (lobe[:3] - anchor) * scale + shift
            radii = np.maximum(lobe[3:] * scale, np.asarray(_MIN_RADIUS_VOX) / half)
            f = _ellipsoid((u, v, wz), centre, radii)
            function = f if function is None else np.minimum(function, f)
        anatomy[(function + deformation <= 1.0) & cavity] = FLARE22_LABELS[name]
    return anatomy


def synth_organ_case(
    rng: np.random.Generator,
    shape: Sequence[int] = ORGAN_SHAPE,
    spacing: Sequence[float] = ORGAN_SPACING,
    organs: bool | str | Sequence[str] | None = None,
    table: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one synthetic abdominal CT case with its organ label map.

    The image always holds all 13 organs, whatever ``organs`` says; ``rng`` is consumed the same way for any
    ``organs``, so a subset labels the same image.

    Args:
        rng: the random generator (consumed deterministically).
        shape: the volume shape ``(H, W, D)``, at least :data:`MIN_ORGAN_SHAPE`; slices along the last axis.
        spacing: the voxel size in mm along i, j, k (for the organ volumes in ``info``; the anatomy is laid out
            relative to the field of view).
        organs: the organs to label (see :func:`organ_names`; ``None``: all 13).
        table: draw the scanner table below the patient.

    Returns:
        ``(image, labels, info)``: the image as ``int16`` Hounsfield units of ``shape``; the label map as ``uint8``
        of ``shape`` holding 0 and the :data:`FLARE22_LABELS` value of each organ of ``organs``; and a
        JSON-serialisable dict: ``organs`` (per labelled organ its ``label``, ``centroid`` (i, j, k voxels),
        ``voxels``, ``volume_ml``, ``extent`` (bounding box size in voxels), ``slices`` ``[k_min, k_max]`` and the
        ``hu`` mean it was drawn with), ``body`` (``centre`` (i, j) and ``half_axes`` (i, j) in voxels) and
        ``stomach_gas``.

    Raises:
        InputError: an unknown organ name, a shape below :data:`MIN_ORGAN_SHAPE`, a bad spacing, or (never seen
            from :data:`MIN_ORGAN_SHAPE` on) an organ left on fewer than 2 slices.
    """
    names = organ_names(organs)
    shape, spacing = _check_grid(shape, spacing)
    grid_vox = tuple(np.arange(s, dtype=np.float32).reshape([-1 if a == n else 1 for a in range(3)])
                     for n, s in enumerate(shape))
    hu, cavity, frame = _body(rng, shape, grid_vox, table)
    anatomy = _paint_organs(rng, shape, grid_vox, frame, cavity)
    image, organ_hu, gas = _finish_image(rng, hu, anatomy, grid_vox)

    keep = np.zeros_like(organ_hu, dtype=np.uint8)  # label value -> itself where labelled, else 0
    for name in names:
        keep[FLARE22_LABELS[name]] = FLARE22_LABELS[name]
    labels = keep[anatomy]
    info = {
        "organs": _organ_records(labels, names, spacing, organ_hu),
        "body": {
            "centre": [round(float(c), 2) for c in frame["centre"]],
            "half_axes": [round(float(c), 2) for c in frame["half"][:2]],
        },
        "stomach_gas": gas,
    }
    return image, labels, info


def _finish_image(
    rng: np.random.Generator, hu: np.ndarray, anatomy: np.ndarray, grid_vox: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The organs' densities over the tissues, the stomach's gas, texture, blur and noise.

    Returns ``(image (H, W, D) int16, the drawn density of each label value (14,), whether the stomach has gas)``.
    """
    shape = hu.shape
    organ_hu = np.zeros(max(FLARE22_LABELS.values()) + 1, np.float32)
    for name, value in FLARE22_LABELS.items():
        organ_hu[value] = ORGAN_HU[name] + rng.uniform(-HU_VARIATION, HU_VARIATION)
    hu = np.where(anatomy > 0, organ_hu[anatomy], hu)
    gas = bool(rng.random() < _GAS_PROBABILITY)
    gas_depth = rng.uniform(0.15, 0.3)
    if gas:  # an air-fluid level: the most anterior part of the stomach (the patient lies supine)
        stomach = anatomy == FLARE22_LABELS["stomach"]
        j_of = np.flatnonzero(stomach.any(axis=(0, 2)))
        level = j_of[-1] - gas_depth * (j_of[-1] - j_of[0] + 1)
        hu[stomach & (grid_vox[1] > level)] = TISSUE_HU["air"]
    hu += _TEXTURE_HU * _offset_field(rng, shape, np.asarray(shape) * _FIELD_FRACTION / 2.0)
    hu = ndimage.gaussian_filter(hu, sigma=_BLUR_VOX, mode="nearest")
    hu += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), organ_hu, gas


def _organ_records(
    labels: np.ndarray, names: Sequence[str], spacing: Sequence[float], organ_hu: np.ndarray
) -> dict[str, dict]:
    """Each labelled organ's record for ``info``; raises InputError where one is on fewer than 2 slices."""
    values = [FLARE22_LABELS[name] for name in names]
    boxes = ndimage.find_objects(labels, max_label=max(FLARE22_LABELS.values()))
    for name, value in zip(names, values):
        box = boxes[value - 1]
        if box is None or box[2].stop - box[2].start < 2:
            raise InputError(None, f"synthetic organ shape {labels.shape} is too small to hold {name} on 2 slices")
    counts = np.bincount(labels.ravel(), minlength=len(organ_hu))
    centroids = ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, index=values)
    records = {}
    for name, value, centroid in zip(names, values, centroids):
        box = boxes[value - 1]
        records[name] = {
            "label": value,
            "centroid": [round(float(c), 2) for c in centroid],
            "voxels": int(counts[value]),
            "volume_ml": round(float(counts[value]) * float(np.prod(spacing)) / 1000.0, 2),
            "extent": [int(s.stop - s.start) for s in box],
            "slices": [int(box[2].start), int(box[2].stop - 1)],
            "hu": round(float(organ_hu[value]), 2),
        }
    return records


def synthesize_organs(
    out_dir: str | os.PathLike,
    cases: int = 6,
    seed: int = 0,
    shape: Sequence[int] = ORGAN_SHAPE,
    spacing: Sequence[float] = ORGAN_SPACING,
    split: str | Sequence[float] = (0.5, 0.25, 0.25),
    organs: bool | str | Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write a synthetic multi-organ abdominal CT data set (one label map per case) and its datalist.

    Writes ``imagesTr/<id>.nii.gz`` (``int16`` HU), ``labelsTr/<id>.nii.gz`` (``uint8`` label map, the
    :data:`FLARE22_LABELS` values of ``organs``), ``datalist.json`` (one rater: each item's ``label`` is a list of
    one file; the ``labels`` block is the class map of ``organs``, the ``intensity`` block :data:`ORGAN_INTENSITY`,
    CT with the window ``[-500, 1000]``; patient = id, split by :func:`~ambisam.data.datalist.split_by_patient`)
    and ``synth.json`` (the parameters, each case's organs and the versions). Affine :func:`organ_affine`.
    Case ``n`` (id ``case<nnn>``) is drawn from ``numpy.random.default_rng([seed, n])``, so the arrays are the
    same for the same seed, and a case does not change when ``cases`` grows.

    Args:
        out_dir: the output folder (created).
        cases: the number of cases.
        seed: the random seed.
        shape: the volume shape ``(H, W, D)``, at least :data:`MIN_ORGAN_SHAPE`.
        spacing: the voxel size in mm along i, j, k.
        split: train, validation, test fractions.
        organs: the organs to label (see :func:`organ_names`; ``None``: all 13).
        progress: show a progress bar (tqdm, where installed) over the cases.

    Returns:
        The path of ``datalist.json``.

    Raises:
        InputError: a bad argument (an unknown organ, cases below 1, a shape below :data:`MIN_ORGAN_SHAPE`, ...),
            checked before anything is written.
    """
    names = organ_names(organs)
    shape, spacing = _check_grid(shape, spacing)
    if int(cases) < 1:
        raise InputError(None, f"synth needs cases >= 1, got cases={cases}")
    fractions = parse_split(split)
    out_dir = _output_folder(out_dir)
    cases, seed = int(cases), int(seed)
    generated = _generate_cases(cases, seed, lambda rng: synth_organ_case(rng, shape, spacing, names), progress)

    with atomic_group():  # the files appear together, or none of them
        affine = organ_affine(shape, spacing)
        items, records = [], {}
        for case_id, image, labels, info in generated:
            image_path = write_nifti(out_dir / "imagesTr" / f"{case_id}.nii.gz", image, affine)
            label_path = write_nifti(out_dir / "labelsTr" / f"{case_id}.nii.gz", labels, affine)
            items.append({"id": case_id, "patient": case_id, "image": image_path, "label": [label_path]})
            records[case_id] = info
        by_split = split_by_patient(items, fractions, seed)
        class_map = {name: FLARE22_LABELS[name] for name in names}
        datalist = write_datalist(out_dir, by_split, labels=class_map, intensity=ORGAN_INTENSITY)
        parameters = dict(cases=cases, seed=seed, shape=list(shape), spacing=list(spacing), split=list(fractions))
        hounsfield = dict(organ_hu={name: ORGAN_HU[name] for name in names}, tissue_hu=TISSUE_HU, noise_hu=NOISE_HU)
        variation = dict(hu_variation=HU_VARIATION, size_variation=SIZE_VARIATION, position_sd=POSITION_SD)
        _write_record(out_dir, "synth_organs", parameters, by_split, organs=list(names), labels=class_map,
                      **hounsfield, **variation, cases_info=records)
    return datalist
