"""Organ boxes from UR-SAM's localiser (MedLAM-style): the six extreme points of each organ found in a query volume
by relative-distance regression against a few annotated support scans, refined by local feature matching.

**Supports.** Each support scan (a datalist item with a multi-label ``label``) goes onto the localiser's grid
(:func:`ambisam.data.localiser_volume_transforms`: RAS, 3 mm). Per organ (a value of the class map) its six
extreme points are found along the grid's axes ``i, j, k`` (world x, y, z), in the order ``[i_min, i_max,
j_min, j_max, k_min, k_max]``: for ``i_min`` the organ's voxels (their centres, mapped from the label's own grid
through the world) whose grid ``i`` is within half a grid voxel of the smallest, averaged. Each point's latent
position (the patch centred on it) and its point embedding (at the point, in that patch) are averaged over the
supports (the embedding renormalised).

**Query.** The volume goes onto the same grid. Each extreme point starts at the volume's centre and moves
``coarse_steps`` times by the predicted displacement ``r * tanh(p_support - p_query)`` (the sign of
:class:`ambisam.losses.RelativeDistanceLoss`: the offset from the query patch's centre to the support point),
clipped to the volume. Then the point moves to the most similar point embedding (dot product) within a cube of
``search_size`` grid voxels (default 32, 96 mm) around it, in the patch centred there (ties go to the nearer
point).

**Back to the input's grid.** The six points go through the world to the input's voxel grid (any affine:
anisotropic spacing, rotation, RAS or LPS) and the box is the smallest voxel box holding them (on an input grid
along the world's axes: ``i`` from the ``i_min`` and ``i_max`` points, and so on; on a rotated one each point's
coordinates along the input's axes, so the box does not grow by the rotation), extended by
``extension_zxy`` = ``[2, 10, 10]`` voxels of the input's grid (METHODS.md: ``z, x, y``) and clipped to the
image. The extension is per input axis by the anatomical axis it runs along most (the largest component of its
direction in the world): the axis along z (inferior-superior, usually ``k``, the slices) gets 2 voxels at each
end, the axes along x and y (usually ``i`` and ``j``, in-plane) 10.

**Small volumes.** A patch that reaches past the volume sees air (0) there, so a volume smaller than one patch is
padded; one under :data:`MIN_EXTENT_VOXELS` grid voxels (48 mm at 3 mm) along an axis is refused with an
:class:`~ambisam.errors.InputError` naming its file: a patch would then be mostly padding.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from ambisam.data.pipelines import localiser_volume_transforms
from ambisam.errors import InputError
from ambisam.data.transforms.localiser import LOCALISER_SPACING_MM, PATCH_SIZE
from ambisam.networks.localiser import (
    RELATIVE_RANGE_MM,
    RelativePositionLocaliser,
    point_features,
    relative_offset_mm,
)
from ambisam.weights import load_weights

__all__ = [
    "EXTREME_POINTS",
    "MIN_EXTENT_VOXELS",
    "LocaliserGrid",
    "OrganLocaliser",
    "LocaliseOrgansd",
    "box_overlap",
    "extreme_points",
    "organ_box",
    "score_boxes",
]

logger = logging.getLogger(__name__)

#: the six extreme points of an organ, in the order of every ``(..., 6, 3)`` array here
EXTREME_POINTS = ("i_min", "i_max", "j_min", "j_max", "k_min", "k_max")
#: the smallest side, in grid voxels, of a volume the localiser accepts (a quarter of a patch)
MIN_EXTENT_VOXELS = PATCH_SIZE // 4


class LocaliserGrid:
    """A volume on the localiser's grid.

    Args:
        volume: ``(h, w, d)`` float intensities in ``[0, 1]`` (air 0).
        affine: ``(4, 4)`` its voxel-to-world matrix (diagonal, RAS).
        source: the file it came from, for messages.
        patch_size: the side of the patches cut from it.

    Attributes:
        padded: the volume with ``patch_size // 2`` voxels of air on every side, so that any patch centred inside
            the volume can be cut.
    """

    def __init__(self, volume: torch.Tensor, affine: np.ndarray, source: Any = None,
                 patch_size: int = PATCH_SIZE) -> None:
        self.volume = volume
        self.affine = np.asarray(affine, dtype=np.float64)
        self.source = source
        self.patch_size = int(patch_size)
        self.half = self.patch_size // 2
        self.padded = torch.nn.functional.pad(volume[None, None], (self.half,) * 6)[0, 0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume's ``(h, w, d)``."""
        return tuple(int(s) for s in self.volume.shape)

    def clip(self, points: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` grid coordinates clipped to the volume."""
        high = torch.as_tensor(self.shape, dtype=points.dtype, device=points.device) - 1
        return torch.minimum(points.clamp_min(0), high)

    def patch_starts(self, centres: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` integer first voxels of the patches centred on ``centres`` (grid coordinates): the patch's
        centre ``start + (P - 1) / 2`` is the nearest such point to each centre."""
        return torch.round(self.clip(centres) - (self.patch_size - 1) / 2.0).long()

    def patches(self, starts: torch.Tensor) -> torch.Tensor:
        """``(N, 1, P, P, P)`` patches whose first voxels are ``starts`` (grid coordinates; air beyond the volume)."""
        p, h = self.patch_size, self.half
        return torch.stack([self.padded[i + h:i + h + p, j + h:j + h + p, k + h:k + h + p]
                            for i, j, k in starts.tolist()])[:, None]

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` world coordinates (mm) of grid coordinates."""
        return np.asarray(points, dtype=np.float64) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def from_world(self, world: np.ndarray) -> np.ndarray:
        """``(N, 3)`` grid coordinates of world coordinates (mm)."""
        inverse = np.linalg.inv(self.affine)
        return np.asarray(world, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]


def extreme_points(points: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
    """The six extreme points of a point set along its three axes (:data:`EXTREME_POINTS` order).

    Args:
        points: ``(N, 3)`` coordinates, ``N >= 1``.
        tolerance: the points within this distance of the extreme along the axis are averaged.

    Returns:
        ``(6, 3)``.
    """
    out = []
    for axis in range(3):
        values = points[:, axis]
        for extreme in (values.min(), values.max()):
            out.append(points[np.abs(values - extreme) <= tolerance].mean(axis=0))
    return np.stack(out)


def box_overlap(box_a: Sequence[float], box_b: Sequence[float]) -> tuple[float, float]:
    """IoU and Dice of two 3D boxes ``[i_min, j_min, k_min, i_max, j_max, k_max]`` (inclusive voxel indices).

    Returns:
        ``(iou, dice)``, both 0 when the boxes do not meet.
    """
    a, b = np.asarray(box_a, dtype=float), np.asarray(box_b, dtype=float)
    side = np.clip(np.minimum(a[3:], b[3:]) - np.maximum(a[:3], b[:3]) + 1, 0, None)
    inter = float(np.prod(side))
    vol_a, vol_b = float(np.prod(a[3:] - a[:3] + 1)), float(np.prod(b[3:] - b[:3] + 1))
    return inter / (vol_a + vol_b - inter), 2.0 * inter / (vol_a + vol_b)


def _source(image: Any) -> Any:
    return image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None


class OrganLocaliser:
    """Find organ boxes in CT volumes with a trained :class:`~ambisam.networks.localiser.RelativePositionLocaliser`
    and a few annotated support scans (see the module docstring for the algorithm and the conventions).

    Args:
        weights: the localiser's weights file (a state dict, as training writes ``models/localiser.pt``; loaded
            with ``torch.load(weights_only=True)``), or a network.
        support_items: the support scans: datalist items with ``image`` and ``label`` (a multi-label map; a list
            of rater files is read as its first file), e.g. ``load_datalist(datalist, "training")[:5]``.
        class_map: ``{organ: label value}`` (the datalist's ``labels``).
        device: where the network runs.
        coarse_steps: relative-regression moves per point.
        search_size: the side, in grid voxels, of the refinement's neighbourhood (0: no refinement).
        extension_zxy: voxels added at each end of the box along the input's z, x and y axes.
        range_mm: ``r`` along ``(i, j, k)`` of the grid.
        batch_size: patches through the network at once.
        network_kwargs: arguments of the network when ``weights`` is a file.

    Raises:
        InputError: no support scan; an empty or malformed class map; a weights file that is missing or needs
            pickle.
    """

    def __init__(self, weights: str | os.PathLike | torch.nn.Module, support_items: Sequence[Mapping],
                 class_map: Mapping[str, int], device: str | torch.device = "cpu", *, coarse_steps: int = 4,
                 search_size: int = 32, extension_zxy: Sequence[int] = (2, 10, 10),
                 range_mm: Sequence[float] = RELATIVE_RANGE_MM, batch_size: int = 8,
                 network_kwargs: Mapping | None = None) -> None:
        if not support_items:
            raise InputError(None, "the localiser needs at least one support scan (a datalist item with a label); "
                                   "the support list is empty")
        if not isinstance(class_map, Mapping) or not class_map:
            raise InputError(None, f"the localiser needs a class map {{organ: label value}}, got {class_map!r}")
        self.device = torch.device(device)
        if isinstance(weights, torch.nn.Module):
            network = weights
        else:
            network = RelativePositionLocaliser(**dict(network_kwargs or {}))
            network.load_state_dict(load_weights(weights, "the localiser's weights (models/localiser.pt)"))
        self.network = network.to(self.device).eval()
        self.patch_size = int(getattr(self.network, "patch_size", PATCH_SIZE))
        self.support_items = [dict(item) for item in support_items]
        self.class_map = {str(k): int(v) for k, v in class_map.items()}
        self.coarse_steps, self.search_size = int(coarse_steps), int(search_size)
        self.extension_zxy = tuple(int(v) for v in extension_zxy)
        self.range_mm = tuple(float(v) for v in range_mm)
        self.batch_size = int(batch_size)
        self._volume_transforms = localiser_volume_transforms(load=False)
        self._supports: list[tuple[LocaliserGrid, dict[str, np.ndarray | None], Any]] | None = None
        self._templates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_datalist(cls, weights: str | os.PathLike | torch.nn.Module, datalist: str | os.PathLike,
                      split: str = "training", num_supports: int | None = 5, **kwargs: Any) -> OrganLocaliser:
        """A localiser whose supports are the first ``num_supports`` items of a datalist's list and whose class
        map is the datalist's ``labels``.

        Raises:
            InputError: as :func:`ambisam.data.load_datalist`; a datalist without a ``labels`` block.
        """
        from ambisam.data.conventions import datalist_class_map
        from ambisam.data.datalist import load_datalist

        class_map = datalist_class_map(datalist)
        if class_map is None:
            raise InputError(datalist, "has no 'labels' block (class map): the localiser needs organ labels")
        items = load_datalist(datalist, split)
        return cls(weights, items[:num_supports] if num_supports else items, class_map, **kwargs)

    # ------------------------------------------------------------------------------------------ the grid
    def grid(self, image: MetaTensor) -> LocaliserGrid:
        """A ``(1, H, W, D)`` CT image (HU, its affine in ``image.affine``) on the localiser's grid.

        Raises:
            InputError: an image that is not ``(1, H, W, D)``, or under :data:`MIN_EXTENT_VOXELS` grid voxels along
                an axis, naming its file.
        """
        source = _source(image)
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(source, f"the localiser reads a (1, H, W, D) volume, got {tuple(image.shape)}")
        out = self._volume_transforms({"image": image})["image"]
        shape = tuple(int(s) for s in out.shape[1:])
        if min(shape) < MIN_EXTENT_VOXELS:
            mm = " x ".join(f"{s * LOCALISER_SPACING_MM:.0f}" for s in shape)
            raise InputError(source, f"is {mm} mm ({' x '.join(map(str, shape))} voxels of "
                                     f"{LOCALISER_SPACING_MM:g} mm): the localiser needs at least "
                                     f"{MIN_EXTENT_VOXELS * LOCALISER_SPACING_MM:.0f} mm along every axis")
        if min(shape) < self.patch_size:
            logger.info(f"{source}: {shape} grid voxels, under one {self.patch_size}^3 patch: padded with air")
        return LocaliserGrid(out[0].as_tensor().float(), np.asarray(out.affine, dtype=np.float64), source,
                             self.patch_size)

    # ------------------------------------------------------------------------------------ network hooks
    def _encode(self, grid: LocaliserGrid, starts: torch.Tensor) -> list[dict]:
        outputs = []
        with torch.no_grad():
            for part in torch.split(starts, self.batch_size):
                outputs.append(self.network(grid.patches(part).to(self.device)))
        return outputs

    def latent_positions(self, grid: LocaliserGrid, centres: torch.Tensor) -> torch.Tensor:
        """The latent positions of the patches centred on ``centres``.

        Args:
            grid: the volume.
            centres: ``(N, 3)`` grid coordinates.

        Returns:
            ``(N, 3)`` on the CPU.
        """
        starts = grid.patch_starts(centres)
        unique, inverse = torch.unique(starts, dim=0, return_inverse=True)  # many points share the first patch
        return torch.cat([o["position"].cpu() for o in self._encode(grid, unique)])[inverse]

    def point_features(self, grid: LocaliserGrid, centres: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The point embeddings of ``points`` in the patches centred on ``centres``.

        Args:
            grid: the volume.
            centres: ``(N, 3)`` grid coordinates of the patches' centres.
            points: ``(N, Q, 3)`` grid coordinates of the points of each patch.

        Returns:
            ``(N, Q, F)`` unit vectors on the CPU.
        """
        starts = grid.patch_starts(centres)
        out, n = [], 0
        for encoded in self._encode(grid, starts):
            count = encoded["position"].shape[0]
            local = (points[n:n + count] - starts[n:n + count, None].to(points.dtype)).to(self.device)
            out.append(point_features(encoded["features"], local, self.patch_size).cpu())
            n += count
        return torch.cat(out)

    # -------------------------------------------------------------------------------------------- supports
    def _load_supports(self) -> list[tuple[LocaliserGrid, dict[str, np.ndarray | None], Any]]:
        """Each support scan on the grid, with every class-map organ's six extreme points on that grid (``None``
        for an organ it lacks) and its label file; the label volumes are not kept."""
        if self._supports is None:
            load_image = LoadImage(image_only=True, ensure_channel_first=True)
            load_label = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)  # the file's integers
            supports = []
            for item in self.support_items:
                labels = item.get("label")
                label_file = next((f for f in labels if f), None) if isinstance(labels, (list, tuple)) else labels
                if label_file is None:
                    raise InputError(item.get("image"), "a support scan needs a label (the organs' label map)")
                grid, label = self.grid(load_image(item["image"])), load_label(label_file)
                affine, values = np.asarray(label.affine, dtype=np.float64), np.asarray(label[0])
                points = {}
                for organ, value in self.class_map.items():
                    voxels = np.argwhere(values == value)
                    world = voxels @ affine[:3, :3].T + affine[:3, 3]
                    points[organ] = extreme_points(grid.from_world(world)) if len(voxels) else None
                supports.append((grid, points, label_file))
            self._supports = supports
        return self._supports

    def check_organs(self, organs: Sequence[str]) -> list[str]:
        """``organs`` as a list, if every one is in the class map.

        Raises:
            InputError: an organ the class map does not have, naming the ones it has.
        """
        unknown = [o for o in organs if o not in self.class_map]
        if unknown:
            raise InputError(None, f"organ(s) {unknown} not in the class map ({', '.join(self.class_map)})")
        return list(organs)

    def support_templates(self, organ: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The six extreme points' latent positions and point embeddings of ``organ``, averaged over the supports.

        Returns:
            ``(6, 3)`` latent positions and ``(6, F)`` unit point embeddings.

        Raises:
            InputError: an organ not in the class map; a support scan without the organ, naming its label file.
        """
        self.check_organs([organ])
        if organ not in self._templates:
            positions, features = [], []
            for grid, extremes, label_file in self._load_supports():
                if extremes[organ] is None:
                    raise InputError(label_file, f"support scan has no voxel of organ {organ!r} (label value "
                                                 f"{self.class_map[organ]})")
                points = torch.as_tensor(extremes[organ], dtype=torch.float32)
                positions.append(self.latent_positions(grid, points))
                features.append(self.point_features(grid, points, points[:, None])[:, 0])
            self._templates[organ] = (torch.stack(positions).mean(0),
                                      torch.nn.functional.normalize(torch.stack(features).mean(0), dim=-1))
        return self._templates[organ]

    # ------------------------------------------------------------------------------------------ the query
    def find_points(self, grid: LocaliserGrid, positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Find template points in a volume: the coarse relative-regression moves, then the local refinement.

        Args:
            grid: the query volume.
            positions: ``(N, 3)`` the templates' latent positions.
            features: ``(N, F)`` their point embeddings.

        Returns:
            ``(N, 3)`` grid coordinates.
        """
        spacing = torch.as_tensor(np.abs(np.diag(grid.affine)[:3]), dtype=torch.float32)
        points = ((torch.as_tensor(grid.shape, dtype=torch.float32) - 1) / 2).expand(len(positions), 3).clone()
        for _ in range(self.coarse_steps):
            moves = relative_offset_mm(positions, self.latent_positions(grid, points), self.range_mm) / spacing
            points = grid.clip(points + moves)
        if self.search_size < 1:
            return points
        half = (self.search_size - 1) / 2.0
        steps = torch.arange(self.search_size, dtype=torch.float32) - half
        offsets = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        penalty = 1e-3 * offsets.norm(dim=1) / max(1.0, half)  # ties go to the nearer point
        refined = []
        for n in range(len(points)):
            candidates = grid.clip(points[n] + offsets)
            similarity = self.point_features(grid, points[n:n + 1], candidates[None])[0] @ features[n]
            refined.append(candidates[int(torch.argmax(similarity - penalty))])
        return torch.stack(refined)

    def extension(self, affine: np.ndarray) -> np.ndarray:
        """``(3,)`` voxels added at each end of a box along each axis of a grid with this ``(4, 4)`` affine:
        ``extension_zxy`` by the world axis the grid's axis runs along most."""
        z, x, y = self.extension_zxy
        by_world_axis = np.array([x, y, z])
        return by_world_axis[np.argmax(np.abs(affine[:3, :3]), axis=0)]

    def to_input_box(self, grid: LocaliserGrid, points: np.ndarray, affine: np.ndarray,
                     shape: Sequence[int]) -> list[int] | None:
        """The box of an organ's six extreme points as an inclusive voxel box of the input's grid, extended and
        clipped.

        Args:
            grid: the localiser's grid the points are on.
            points: ``(6, 3)`` grid coordinates.
            affine: the input's ``(4, 4)`` voxel-to-world matrix.
            shape: the input's ``(H, W, D)``.

        Returns:
            ``[i_min, j_min, k_min, i_max, j_max, k_max]``, or ``None`` when it lies outside the image.
        """
        inverse = np.linalg.inv(affine)
        voxels = grid.to_world(points) @ inverse[:3, :3].T + inverse[:3, 3]
        extension = self.extension(affine)
        first = np.floor(voxels.min(axis=0) + 1e-6) - extension
        last = np.ceil(voxels.max(axis=0) - 1e-6) + extension
        size = np.asarray(shape) - 1
        if np.any(last < 0) or np.any(first > size):
            return None
        return [int(v) for v in (*np.clip(first, 0, size), *np.clip(last, 0, size))]

    def locate(self, image: MetaTensor, organs: Sequence[str] | None = None) -> dict[str, list[int] | None]:
        """The boxes of ``organs`` in ``image``.

        Args:
            image: ``(1, H, W, D)`` CT in HU, a MetaTensor with its affine (as ``LoadImaged`` gives it).
            organs: which organs (default: every organ of the class map).

        Returns:
            ``{organ: [i_min, j_min, k_min, i_max, j_max, k_max]}``, inclusive voxel indices of ``image``'s own
            grid, or ``None`` for an organ whose box falls outside the image.

        Raises:
            InputError: an organ not in the class map; a support scan without a requested organ; a volume that is
                not ``(1, H, W, D)`` or too small (naming its file).
        """
        organs = self.check_organs(list(self.class_map) if organs is None else list(organs))
        templates = [self.support_templates(o) for o in organs]
        grid = self.grid(image)
        positions = torch.cat([t[0] for t in templates])
        features = torch.cat([t[1] for t in templates])
        points = self.find_points(grid, positions, features).reshape(len(organs), 6, 3).numpy()
        affine = np.asarray(image.affine, dtype=np.float64)
        return {organ: self.to_input_box(grid, p, affine, image.shape[1:]) for organ, p in zip(organs, points)}


class LocaliseOrgansd(MapTransform):
    """The organ prompts of one case from an :class:`OrganLocaliser` (UR-SAM's auto-prompting).

    Writes ``box3d (S, 6)``, the 3D boxes ``[i_min, j_min, k_min, i_max, j_max, k_max]`` of the ``S`` structures
    (``-1`` for one whose box falls outside the image), ``box (S, D, 4)``, their per-slice boxes
    (:func:`ambisam.data.slice_boxes_from_box3d`; :data:`~ambisam.data.NO_BOX` rows off the box and for a missing
    structure), and ``structures``.

    Args:
        localiser: the localiser.
        structures: the organs, in output order (default: the item's ``structures``, else the class map's organs).
        image_key: the ``(1, H, W, D)`` image in HU: place the transform before the pipeline's intensity scaling
            (or point ``image_key`` at a copy in HU); the boxes are on this image's grid.
        structures_key, box_key, box3d_key: the keys read and written.

    Raises:
        InputError: an organ not in the class map (at construction for ``structures``, else at call).
    """

    def __init__(self, localiser: OrganLocaliser, structures: Sequence[str] | None = None, image_key: str = "image",
                 structures_key: str = "structures", box_key: str = "box", box3d_key: str = "box3d") -> None:
        super().__init__(image_key)
        self.localiser = localiser
        self.structures = None if structures is None else localiser.check_organs(list(structures))
        self.image_key, self.structures_key = image_key, structures_key
        self.box_key, self.box3d_key = box_key, box3d_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        names = self.structures or d.get(self.structures_key) or list(self.localiser.class_map)
        image = d[self.image_key]
        found = self.localiser.locate(image, names)
        from ambisam.data.transforms.organ_boxes import organ_slice_boxes  # the data package imports this one

        boxes = torch.tensor([found[name] or [-1] * 6 for name in names], dtype=torch.float32).reshape(-1, 6)
        d[self.structures_key] = list(names)
        d[self.box3d_key] = boxes
        d[self.box_key] = organ_slice_boxes(boxes, int(image.shape[-1]))
        return d


def organ_box(label: np.ndarray, value: int) -> list[int] | None:
    """The tight box ``[i_min, j_min, k_min, i_max, j_max, k_max]`` of the voxels of ``label`` equal to ``value``
    (``(H, W, D)``), or ``None`` where there is none."""
    where = np.argwhere(np.asarray(label) == value)
    return None if not len(where) else [int(v) for v in (*where.min(axis=0), *where.max(axis=0))]


def score_boxes(localiser: OrganLocaliser, items: Sequence[Mapping], organs: Sequence[str] | None = None) -> dict:
    """The found boxes of labelled volumes against their ground truth, per organ.

    The ground truth is the organ's tight box extended and clipped as the localiser extends its own
    (:meth:`OrganLocaliser.extension`), so a perfect localiser scores 1; ``iou_tight`` compares with the tight box
    itself, ``coverage`` is the share of the organ's voxels inside the found box. A box not found scores 0.

    Args:
        localiser: the localiser.
        items: datalist items with ``image`` and ``label`` (a multi-label map, or a list whose first file is one).
        organs: the organs (default: the class map's); an organ a volume does not have is skipped there.

    Returns:
        ``{organ: {"iou": [...], "dice": [...], "iou_tight": [...], "coverage": [...]}}`` (one value per volume
        that has the organ) and ``"seconds"``, the wall time of each volume's :meth:`OrganLocaliser.locate`.
    """
    organs = localiser.check_organs(list(localiser.class_map) if organs is None else list(organs))
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    scores: dict = {organ: {"iou": [], "dice": [], "iou_tight": [], "coverage": []} for organ in organs}
    scores["seconds"] = []
    for item in items:
        labels = item["label"]
        image = loader(item["image"])
        label = np.asarray(loader(labels[0] if isinstance(labels, (list, tuple)) else labels)[0])
        start = time.perf_counter()
        found = localiser.locate(image, organs)
        scores["seconds"].append(time.perf_counter() - start)
        extension, size = localiser.extension(np.asarray(image.affine, dtype=np.float64)), np.asarray(label.shape) - 1
        for organ in organs:
            tight = organ_box(label, localiser.class_map[organ])
            if tight is None:
                continue
            truth = [*np.maximum(np.asarray(tight[:3]) - extension, 0),
                     *np.minimum(np.asarray(tight[3:]) + extension, size)]
            box = found[organ]
            iou, dice = box_overlap(box, truth) if box is not None else (0.0, 0.0)
            inside = np.argwhere(label == localiser.class_map[organ])
            covered = 0.0 if box is None else float(np.all((inside >= box[:3]) & (inside <= box[3:]), axis=1).mean())
            for key, value in zip(("iou", "dice", "iou_tight", "coverage"),
                                  (iou, dice, 0.0 if box is None else box_overlap(box, tight)[0], covered)):
                scores[organ][key].append(value)
    return scores
