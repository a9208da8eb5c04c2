"""Box prompts of several structures (organs) of a volume: simulated manual boxes from the label, and box files
that give each organ's 3D box in voxel or world coordinates.

Both write ``box (S, D, 4)``: per structure (in the order of the item's ``structures``, see
:class:`~ambisam.data.StructureMasksd`) the per-slice boxes of its 3D box, ``-1`` rows on slices outside it and for
a structure the case does not have (it is then background, not a model call), and ``box3d (S, 6)``, the 3D boxes
``[i_min, j_min, k_min, i_max, j_max, k_max]`` (``-1`` for an absent structure).

The organ box file (JSON, UTF-8)::

    {"coordinates": "voxel",            # or "world": millimetres in the image's world frame (its affine)
     "boxes": {"liver": [i_min, j_min, k_min, i_max, j_max, k_max], "spleen": [...]}}

Voxel boxes are inclusive indices of the stored image. A world box is two opposite corners ``[x0, y0, z0, x1, y1,
z1]`` in the frame of the image's affine (RAS for NIfTI as nibabel and MONAI read it); it becomes the smallest voxel
box that holds both corners, so it lands on the same voxels whatever the image's orientation (RAS, LPS) or spacing.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from ambisam.data.ids import case_id
from ambisam.data.transforms._utils import _as_tensor, _filename, _read_json_file
from ambisam.data.transforms.boxes import NO_BOX, LoadBoxd, slice_boxes_from_box3d
from ambisam.data.transforms.seeds import case_seed
from ambisam.errors import InputError

__all__ = [
    "ORGAN_PROMPTS",
    "ManualOrganBoxesd",
    "OrganBoxFiled",
    "OrganPromptsd",
    "organ_slice_boxes",
    "read_organ_box_file",
]

#: the prompt modes of :class:`OrganPromptsd`
ORGAN_PROMPTS = {
    "manual": "the ground-truth 3D box of each organ, each in-plane side moved by a random 0-20 px (a user's box)",
    "box_file": "each organ's 3D box from a JSON box file, voxel or world coordinates",
    "auto": "a trained localiser's boxes (bundles/ursam/configs/train.json trains it)",
}

#: how to train the localiser that prompt "auto" needs
_TRAIN_LOCALISER = "python -m monai.bundle run --config_file bundles/ursam/configs/train.json"

#: the side, in pixels, of the grid the manual perturbation's pixels refer to (SAM's input, the paper's slices)
PERTURBATION_GRID = 1024


class ManualOrganBoxesd(RandomizableTransform, MapTransform):
    """Simulated manual 3D boxes per structure: the ground truth's tight box, each in-plane side moved outwards or
    inwards by a random whole number of pixels in ``[0, max_perturbation]`` (UR-SAM's manual prompting), seeded.

    With ``seed`` the draws of each case come from its own seed (:func:`~ambisam.data.case_seed` of the run's seed
    and the case's id), so a case gets the same boxes whatever came before it (another order, another rank of a
    distributed evaluation); with ``None`` from the transform's random state (``set_random_state``).

    The perturbation's pixels are those of a ``1024``-pixel slice (SAM's input, on which the paper perturbs), scaled
    to the slice's larger side: 20 px on a 512 x 512 slice is 10 px. The slice range is the ground truth's (a user
    draws the box on the slices the organ is on). The box is clipped to the image.

    Args:
        label_key: the per-structure masks ``(S * K, H, W, D)`` (:class:`~ambisam.data.StructureMasksd`).
        structures_key: the structure names (``S`` of them).
        box_key: output key of the per-slice boxes ``(S, D, 4)``.
        box3d_key: output key of the 3D boxes ``(S, 6)``.
        max_perturbation: the largest move of a side, in pixels of a 1024-pixel slice.
        seed: the run's seed (per-case draws), or ``None``.

    Raises:
        ValueError: a negative ``max_perturbation``; a label that is not ``(S * K, H, W, D)``.
    """

    def __init__(self, label_key: str = "label", structures_key: str = "structures", box_key: str = "box",
                 box3d_key: str = "box3d", max_perturbation: float = 20.0, seed: int | None = None) -> None:
        MapTransform.__init__(self, label_key)
        RandomizableTransform.__init__(self, prob=1.0)
        if max_perturbation < 0:
            raise ValueError(f"max_perturbation must be >= 0, got {max_perturbation}")
        self.label_key, self.structures_key = label_key, structures_key
        self.box_key, self.box3d_key = box_key, box3d_key
        self.max_perturbation = float(max_perturbation)
        self.seed = None if seed is None else int(seed)

    def tight_boxes(self, label: torch.Tensor, count: int) -> torch.Tensor:
        """``(S, 6)`` tight 3D boxes of the raters' union per structure (``-1`` rows where it is empty)."""
        if label.ndim != 4 or label.shape[0] % count:
            raise ValueError(f"expected '{self.label_key}' as (S * K, H, W, D) for {count} structures, got "
                             f"{tuple(label.shape)}")
        union = (label != 0).reshape(count, -1, *label.shape[1:]).any(dim=1)  # (S, H, W, D)
        out = torch.full((count, 6), -1.0)
        for s in range(count):
            where = torch.nonzero(union[s])
            if len(where):
                out[s] = torch.cat([where.amin(dim=0), where.amax(dim=0)]).float()
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = _as_tensor(d[self.label_key])
        boxes = self.tight_boxes(label, len(d[self.structures_key]))
        h, w, depth = label.shape[1:]
        scale = self.max_perturbation * max(h, w) / PERTURBATION_GRID
        rng = self.R if self.seed is None else np.random.RandomState(case_seed(self.seed, case_id(d)) % 2**32)
        for s in range(len(boxes)):
            if boxes[s, 0] < 0:
                continue
            moves = np.round(rng.uniform(0.0, scale, size=4)) * rng.choice([-1, 1], size=4)
            i0, j0, i1, j1 = boxes[s, [0, 1, 3, 4]].tolist()
            i0, j0 = max(0, i0 - moves[0]), max(0, j0 - moves[1])  # a positive move widens the box
            i1, j1 = min(h - 1, i1 + moves[2]), min(w - 1, j1 + moves[3])
            if i1 <= i0 or j1 <= j0:  # moved inwards past each other on a small organ: keep the tight side
                i0, j0, i1, j1 = boxes[s, [0, 1, 3, 4]].tolist()
            boxes[s, [0, 1, 3, 4]] = torch.tensor([i0, j0, i1, j1], dtype=boxes.dtype)
        d[self.box3d_key] = boxes
        d[self.box_key] = organ_slice_boxes(boxes, depth)
        return d


def organ_slice_boxes(boxes: torch.Tensor, depth: int) -> torch.Tensor:
    """Per-slice boxes of several structures' 3D boxes.

    Args:
        boxes: ``(S, 6)`` ``[i_min, j_min, k_min, i_max, j_max, k_max]``, a row of ``-1`` for an absent structure.
        depth: the volume's slices ``D``.

    Returns:
        ``(S, D, 4)``: :func:`~ambisam.data.slice_boxes_from_box3d` of each row, ``NO_BOX`` rows everywhere for an
        absent structure.
    """
    none = torch.tensor(NO_BOX, dtype=torch.float32).repeat(depth, 1)
    return torch.stack([slice_boxes_from_box3d(b.long().tolist(), depth) if b[0] >= 0 else none for b in boxes])


def read_organ_box_file(path: str | os.PathLike, structures: Sequence[str], affine: np.ndarray,
                        shape: Sequence[int]) -> torch.Tensor:
    """The ``(S, 6)`` voxel boxes of ``structures`` from an organ box file (see the module docstring).

    Args:
        path: the JSON file.
        structures: the organs to prompt, in output order.
        affine: the image's ``(4, 4)`` voxel-to-world affine (for world coordinates).
        shape: the image's spatial shape ``(H, W, D)``.

    Returns:
        ``(S, 6)`` float boxes ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices.

    Raises:
        InputError: naming the file: missing, not JSON, not the documented layout, an unknown ``coordinates``, an
            organ to prompt that it has no box for, or a box outside the image, of zero area or malformed.
    """
    path = os.fspath(path)
    content = _read_json_file(path, "organ box file")
    if not isinstance(content, dict) or not isinstance(content.get("boxes"), dict):
        raise InputError(path, 'organ box file must hold {"coordinates": "voxel"|"world", "boxes": {organ: [6 '
                               "numbers]}}.")
    coordinates = content.get("coordinates", "voxel")
    if coordinates not in ("voxel", "world"):
        raise InputError(path, f"coordinates must be 'voxel' or 'world', got {coordinates!r}.")
    missing = [s for s in structures if s not in content["boxes"]]
    if missing:
        raise InputError(path, f"has no box for {missing} (it has {sorted(content['boxes'])}).")
    out = []
    for name in structures:
        raw = content["boxes"][name]
        if coordinates == "world":
            raw = _world_to_voxel_box(raw, affine, shape, path, name)
        try:
            out.append(LoadBoxd.check_box(raw, shape, path))
        except InputError as e:
            raise InputError(path, f"organ {name!r}: {e.problem}") from None
    return torch.tensor(out, dtype=torch.float32)


def _world_to_voxel_box(raw: Any, affine: np.ndarray, shape: Sequence[int], path: str, name: str) -> list[int]:
    """The smallest voxel box holding both world corners of ``raw``, clipped to the image."""
    try:
        corners = np.asarray(raw, dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError):
        raise InputError(path, f"organ {name!r}: a world box is 6 numbers [x0, y0, z0, x1, y1, z1], got {raw!r}.") \
            from None
    if not np.all(np.isfinite(corners)):
        raise InputError(path, f"organ {name!r}: world box has non-finite values {raw!r}.")
    grid = np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(-1, 3)
    world = np.where(grid == 0, corners[0], corners[1])  # the box's 8 corners in the world
    voxels = (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.c_[world, np.ones(8)].T)[:3].T
    low, high = np.floor(voxels.min(axis=0) + 1e-6), np.ceil(voxels.max(axis=0) - 1e-6)
    if np.any(high < 0) or np.any(low > np.asarray(shape) - 1):
        raise InputError(path, f"organ {name!r}: world box {list(raw)} lies outside the image.")
    low = np.maximum(low, 0)
    high = np.minimum(high, np.asarray(shape) - 1)
    return [int(v) for v in (*low, *high)]


class OrganBoxFiled(MapTransform):
    """Each structure's 3D box from an organ box file (see the module docstring) as per-slice boxes.

    Args:
        box_key: the key holding the file's path; replaced by the per-slice boxes ``(S, D, 4)``.
        image_key: the loaded image ``(1, H, W, D)`` (its affine and shape).
        structures_key: the structure names; ``structures`` when the item has none (no label).
        structures: the organs to prompt when the item names none.
        box3d_key: output key of the 3D boxes ``(S, 6)``.

    Raises:
        InputError: as :func:`read_organ_box_file`.
    """

    def __init__(self, box_key: str = "box", image_key: str = "image", structures_key: str = "structures",
                 structures: Sequence[str] | None = None, box3d_key: str = "box3d") -> None:
        super().__init__(box_key)
        self.box_key, self.image_key, self.structures_key = box_key, image_key, structures_key
        self.structures = None if structures is None else list(structures)
        self.box3d_key = box3d_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        names = d.get(self.structures_key) or self.structures
        if not names:
            raise InputError(_filename(image), "no organs to prompt: name them (organs) or give a labelled case.")
        affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
        shape = tuple(_as_tensor(image).shape[1:])
        boxes = read_organ_box_file(d[self.box_key], names, affine, shape)
        d[self.structures_key] = list(names)
        d[self.box3d_key] = boxes
        d[self.box_key] = organ_slice_boxes(boxes, shape[2])
        return d


class OrganPromptsd(MapTransform):
    """The organ prompts of one case in the mode ``prompt`` (:data:`ORGAN_PROMPTS`).

    ``"manual"``: :class:`ManualOrganBoxesd` (needs the case's label); ``"box_file"``: :class:`OrganBoxFiled`
    (needs the item's ``box``, a path); ``"auto"``: the boxes of a trained localiser
    (:class:`~ambisam.inferers.LocaliseOrgansd`), found on the image as stored, in HU (read again from its file, since
    the pipeline's image is already windowed), so the pipeline must not resample before this step.

    Args:
        prompt: the mode.
        structures: the organs to prompt when the case has no label (a box file, the localiser).
        max_perturbation, seed: as :class:`ManualOrganBoxesd`.
        localiser: an :class:`~ambisam.inferers.OrganLocaliser` (``"auto"`` only); ``None`` with ``"auto"`` is an
            error saying how to train one.

    Raises:
        InputError: an unknown mode (at construction); at call, what the mode needs and the case lacks, naming the
            image file.
    """

    def __init__(self, prompt: str = "manual", structures: Sequence[str] | None = None,
                 max_perturbation: float = 20.0, localiser: Any = None, seed: int | None = None) -> None:
        super().__init__("image")
        if prompt not in ORGAN_PROMPTS:
            raise InputError(None, f"prompt must be one of {', '.join(ORGAN_PROMPTS)}, got {prompt!r}")
        self.prompt = prompt
        self.manual = ManualOrganBoxesd(max_perturbation=max_perturbation, seed=seed)
        self.box_file = OrganBoxFiled(structures=structures)
        self.structures = None if structures is None else list(structures)
        self.localiser = localiser

    def set_random_state(self, seed=None, state=None):
        self.manual.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        source = _filename(data.get("image"))
        if self.prompt == "auto":
            if self.localiser is None:
                raise InputError(source, f"auto-prompting needs a trained localiser ({_TRAIN_LOCALISER}); or use "
                                         "prompt 'box_file' (a box per organ) or 'manual' (boxes from a label)")
            return self.locate(data)
        if self.prompt == "box_file":
            if not isinstance(data.get("box"), (str, os.PathLike)):
                raise InputError(source, "prompt 'box_file' needs an organ box file (--box PATH)")
            return self.box_file(data)
        if "label" not in data:
            raise InputError(source, "prompt 'manual' simulates boxes from the label: give one (--label PATH), an "
                                     f"organ box file with prompt 'box_file', or train a localiser for prompt 'auto' "
                                     f"({_TRAIN_LOCALISER})")
        return self.manual(data)

    def locate(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The localiser's boxes on the image as stored, read again in HU from its file."""
        from monai.transforms import LoadImage

        from ambisam.inferers.localise import LocaliseOrgansd

        source = _filename(data.get("image"))
        if source is None:
            raise InputError(None, "prompt 'auto' reads the image again in HU: it needs the image's file")
        hu = LoadImage(image_only=True, ensure_channel_first=True)(source)
        names = data.get("structures") or self.structures
        found = LocaliseOrgansd(self.localiser, names)({"image": hu})
        return {**data, **{k: found[k] for k in ("structures", "box", "box3d")}}
