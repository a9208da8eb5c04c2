"""A tiny multi-organ CT generator for the localiser's tests and its benchmark: a body ellipse (fat around soft
tissue), a spine, and a few organs as ellipsoids (an aorta as a cylinder) at the same anatomical places on every
case, in world millimetres (RAS), sampled on any voxel grid: any spacing, any orientation, any affine.

Per case the body and each organ move by a few millimetres and their sizes vary by a few percent; the labels use
FLARE22's values. The volumes are ``int16`` HU, the label maps ``uint8``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ambisam.data import write_datalist, write_nifti

#: organ -> (FLARE22 label value, centre (x, y, z) mm, radii mm, HU); +x is the patient's right (RAS)
ORGANS = {
    "liver": (1, (60.0, 10.0, 25.0), (50.0, 55.0, 50.0), 60.0),
    "kidney_right": (2, (50.0, -40.0, -30.0), (18.0, 18.0, 32.0), 150.0),
    "spleen": (3, (-70.0, -15.0, 35.0), (22.0, 32.0, 35.0), 45.0),
    "aorta": (5, (-12.0, -30.0, 0.0), (9.0, 9.0, 80.0), 200.0),
    "kidney_left": (13, (-50.0, -40.0, -25.0), (18.0, 18.0, 32.0), 150.0),
}
#: the field of view in mm (x, y, z), centred on the world origin
FIELD_OF_VIEW_MM = (300.0, 240.0, 210.0)


def grid_affine(spacing, orientation: str = "RAS", rotation_degrees: float = 0.0, shift_mm=(0.0, 0.0, 0.0),
                field_of_view=FIELD_OF_VIEW_MM) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An affine and shape covering ``field_of_view`` around ``shift_mm`` with voxels of ``spacing`` mm.

    Args:
        spacing: ``(si, sj, sk)`` mm.
        orientation: ``"RAS"`` or ``"LPS"``: where the voxel axes point (LPS flips i and j).
        rotation_degrees: a rotation of the grid about the world's z axis (a non-identity affine).
        shift_mm: the world position of the grid's centre.
        field_of_view: the extent along (x, y, z) in mm.

    Returns:
        ``(4, 4)`` affine and the shape ``(H, W, D)``.
    """
    signs = {"RAS": (1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}[orientation]
    t = np.deg2rad(rotation_degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    linear = rotation @ np.diag(signs) @ np.diag(np.asarray(spacing, dtype=float))
    shape = tuple(int(round(f / s)) for f, s in zip(field_of_view, spacing))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(shift_mm, dtype=float) - linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine, shape


def organ_case(affine: np.ndarray, shape, rng: np.random.Generator, organs=ORGANS) -> tuple[np.ndarray, np.ndarray]:
    """One case on the grid ``(affine, shape)``.

    Returns:
        ``int16 (H, W, D)`` HU and ``uint8 (H, W, D)`` labels.
    """
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    x, y, z = (xyz[..., n] - rng.normal(0, 4.0) for n in range(3))
    body = (x / 135.0) ** 2 + (y / 100.0) ** 2 < 1.0
    inner = (x / 125.0) ** 2 + (y / 90.0) ** 2 < 1.0
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = -100.0
    hu[inner] = 40.0
    hu[((x / 18.0) ** 2 + ((y + 70.0) / 16.0) ** 2 < 1.0)] = 500.0  # the spine
    label = np.zeros(shape, dtype=np.uint8)
    for value, centre, radii, organ_hu in organs.values():
        c = np.asarray(centre) + rng.normal(0, 4.0, 3)
        r = np.asarray(radii) * rng.uniform(0.95, 1.05)
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1.0
        hu[inside] = organ_hu + rng.normal(0, 5.0)
        label[inside] = value
    hu += rng.normal(0, 10.0, shape).astype(np.float32)
    return np.clip(hu, -1024, 3000).astype(np.int16), label


def organ_dataset(out_dir, cases: int = 6, seed: int = 0, spacing=(2.5, 2.5, 5.0), split=(4, 1, 1),
                  orientation: str = "RAS") -> Path:
    """A datalist of ``cases`` cases (``split``: training, validation, test counts) with the organs' class map.

    Returns:
        The datalist's path.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    affine, shape = grid_affine(spacing, orientation)
    items = []
    for n in range(cases):
        image, label = organ_case(affine, shape, rng)
        write_nifti(out / f"case{n}.nii.gz", image, affine)
        write_nifti(out / f"case{n}_label.nii.gz", label, affine)
        items.append({"id": f"case{n}", "image": str(out / f"case{n}.nii.gz"),
                      "label": [str(out / f"case{n}_label.nii.gz")]})
    a, b = split[0], split[0] + split[1]
    return write_datalist(out, {"training": items[:a], "validation": items[a:b], "test": items[b:]},
                          labels={name: spec[0] for name, spec in ORGANS.items()})
