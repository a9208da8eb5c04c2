"""The localiser's self-supervised training views: two random crops of one volume, augmented, with the offset of
their centres in mm and the voxel coordinates of the same physical points in a crop and its augmented copy.

The volume is on the localiser's grid (:func:`ambisam.data.localiser_volume_transforms`: RAS, 3 mm, intensities
in ``[0, 1]``, air 0). A crop is centred anywhere in the volume and sees air beyond it, as the box finding's patches
do (:class:`ambisam.inferers.LocaliserGrid`), so a volume of about one patch or less still gives crops at
different places. Every crop and augmentation is a MONAI transform on a MetaTensor,
which carries each view's voxel-to-world affine (``SpatialCrop`` moves it, ``RandAffine`` composes its sampling
matrix into it), so the offsets and the point correspondences come from the views' affines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    RandomizableTransform,
    RandScaleIntensity,
    RandShiftIntensity,
    SpatialCrop,
)

from ambisam.data.ids import case_id
from ambisam.data.transforms._utils import _filename
from ambisam.data.transforms.seeds import case_seed
from ambisam.errors import InputError

__all__ = ["LOCALISER_SPACING_MM", "PATCH_SIZE", "LOCALISER_VIEWS", "DISTANCE_PAIRS", "EMBEDDING_PAIR",
           "LocaliserPairsd"]

#: the voxel size in mm (isotropic) of the localiser's grid
LOCALISER_SPACING_MM = 3.0
#: the side of the localiser's cubic patch, in voxels of :data:`LOCALISER_SPACING_MM`
PATCH_SIZE = 64
#: the three training views of one volume, in their order along the batch's second axis: crop A (intensity
#: augmentation only), crop A with the affine and intensity augmentations, crop B (another place of the same
#: volume) with both
LOCALISER_VIEWS = ("crop_a", "crop_a_augmented", "crop_b_augmented")
#: the view pairs whose centres' offsets train the relative distance (the rows of ``offset_mm``, in this order)
DISTANCE_PAIRS = ((0, 2), (1, 2))
#: the view pair whose point embeddings are aligned (rows 0 and 1 of ``points``)
EMBEDDING_PAIR = (0, 1)


def _world(affine: torch.Tensor, voxels: np.ndarray) -> np.ndarray:
    """``(N, 3)`` world coordinates of ``(N, 3)`` voxel coordinates under a ``(4, 4)`` affine."""
    a = np.asarray(affine, dtype=np.float64)
    return voxels @ a[:3, :3].T + a[:3, 3]


def _voxels(affine: torch.Tensor, world: np.ndarray) -> np.ndarray:
    """``(N, 3)`` voxel coordinates of ``(N, 3)`` world coordinates under a ``(4, 4)`` affine."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return world @ inverse[:3, :3].T + inverse[:3, 3]


class LocaliserPairsd(RandomizableTransform, MapTransform):
    """Three views of one volume for the localiser's losses (:data:`LOCALISER_VIEWS`).

    Two crops of ``patch_size^3`` centred at independent uniform places of the volume (the volume padded with
    air by half a patch on every side, MONAI ``BorderPad``): crop A and crop B. Crop A is kept
    (intensity augmentation only) and also augmented with a small random affine (MONAI ``RandAffine``: rotation
    up to ``rotate_degrees`` about each axis, scaling within ``scale``, translation up to ``translate_voxels``,
    zero padding = air), crop B gets both. The intensity augmentation is MONAI's ``RandScaleIntensity``,
    ``RandShiftIntensity``, ``RandAdjustContrast`` and ``RandGaussianNoise``. With ``augment=False`` (validation)
    no view is augmented and the two crops are drawn from a seed of the case (:func:`ambisam.data.case_seed` of
    ``seed`` and the case's id), so every validation sees the same pairs.

    Outputs (replacing ``image_key``'s volume):

    - ``image``: ``(3, P, P, P)`` the views;
    - ``offset_mm``: ``(2, 3)`` for each of :data:`DISTANCE_PAIRS` ``(a, b)`` the world
      offset from view ``b``'s centre to view ``a``'s, in mm along the grid's ``(i, j, k)`` (the world's RAS axes);
    - ``points``: ``(2, N, 3)`` voxel coordinates of ``num_points`` random points in the middle half of view
      :data:`EMBEDDING_PAIR` ``[0]`` (row 0) and of the same world points in view
      ``EMBEDDING_PAIR[1]`` (row 1, clipped to the patch).

    Args:
        image_key: the volume ``(1, H, W, D)``, a MetaTensor with its affine.
        patch_size: the crops' side.
        num_points: points per pair for the point-embedding loss.
        augment: augment the views (training) or not (validation, seeded per case).
        seed: the run's seed, for the per-case draws when ``augment`` is off.
        rotate_degrees, scale, translate_voxels: the affine augmentation's ranges.
        noise_std: the Gaussian noise's standard deviation (intensities are in ``[0, 1]``).

    Raises:
        InputError: (at call) a volume that is not ``(1, H, W, D)``, naming its file.
    """

    def __init__(self, image_key: str = "image", patch_size: int = PATCH_SIZE, num_points: int = 64,
                 augment: bool = True, seed: int = 0, rotate_degrees: float = 10.0, scale: float = 0.1,
                 translate_voxels: float = 3.0, noise_std: float = 0.02) -> None:
        MapTransform.__init__(self, image_key)
        RandomizableTransform.__init__(self, prob=1.0)
        self.image_key, self.patch_size, self.num_points = image_key, int(patch_size), int(num_points)
        self.augment, self.seed = bool(augment), int(seed)
        self.affine_augmentation = RandAffine(
            prob=1.0, rotate_range=(np.deg2rad(rotate_degrees),) * 3, scale_range=(scale,) * 3,
            translate_range=(translate_voxels,) * 3, padding_mode="zeros", mode="bilinear",
        )
        self.intensity_augmentation = Compose([
            RandScaleIntensity(factors=0.1, prob=1.0),
            RandShiftIntensity(offsets=0.05, prob=1.0),
            RandAdjustContrast(prob=0.5, gamma=(0.8, 1.25)),
            RandGaussianNoise(prob=1.0, std=noise_std),
        ])

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and, from its generator, its augmentations."""
        super().set_random_state(seed, state)
        self.affine_augmentation.set_random_state(int(self.R.randint(2**31)))
        self.intensity_augmentation.set_random_state(int(self.R.randint(2**31)))
        return self

    def _crop(self, volume: MetaTensor, shape: np.ndarray) -> MetaTensor:
        start = [int(self.R.randint(0, s - self.patch_size + 1)) for s in shape]
        return SpatialCrop(roi_start=start, roi_end=[s + self.patch_size for s in start])(volume)

    def _augmented(self, view: MetaTensor, affine: bool) -> MetaTensor:
        if not self.augment:
            return view
        view = self.affine_augmentation(view) if affine else view
        return self.intensity_augmentation(view)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volume = d[self.image_key]
        if not isinstance(volume, MetaTensor):
            volume = MetaTensor(volume)
        if volume.ndim != 4 or volume.shape[0] != 1:
            raise InputError(_filename(volume), f"the localiser's crops need a (1, H, W, D) volume, got "
                                                f"{tuple(volume.shape)}")
        volume = BorderPad(spatial_border=self.patch_size // 2, value=0.0)(volume)  # air; the affine follows
        shape = np.asarray(volume.shape[1:])
        if not self.augment:
            self.set_random_state(seed=case_seed(self.seed, case_id(d)) % 2**32)
        crop_a, crop_b = self._crop(volume, shape), self._crop(volume, shape)
        views = [self._augmented(crop_a, affine=False), self._augmented(crop_a, affine=True),
                 self._augmented(crop_b, affine=True)]
        centre = np.full((1, 3), (self.patch_size - 1) / 2.0)
        centres = [_world(v.affine, centre)[0] for v in views]
        offsets = np.stack([centres[a] - centres[b] for a, b in DISTANCE_PAIRS])
        low, high = self.patch_size / 4.0, 3.0 * self.patch_size / 4.0 - 1.0
        points_a = self.R.uniform(low, high, size=(self.num_points, 3))
        first, second = (views[i] for i in EMBEDDING_PAIR)
        points_b = np.clip(_voxels(second.affine, _world(first.affine, points_a)), 0.0, self.patch_size - 1.0)
        d[self.image_key] = torch.cat([torch.as_tensor(v.as_tensor(), dtype=torch.float32) for v in views])
        d["offset_mm"] = torch.as_tensor(offsets, dtype=torch.float32)
        d["points"] = torch.as_tensor(np.stack([points_a, points_b]), dtype=torch.float32)
        return d
