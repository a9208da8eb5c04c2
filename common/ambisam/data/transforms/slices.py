"""From volumes to training slices: choosing slices and cropping around the lesion."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import BorderPad, MapTransform, RandomizableTransform, SpatialCrop
from monai.utils import ensure_tuple

from ambisam.data.ids import case_id
from ambisam.data.transforms._utils import _as_tensor, _filename

__all__ = ["SelectSlicesd", "LesionCropd"]


def _slice_meta_tensor(x: Any, k: int) -> Any:
    """Slice ``k`` (last axis) of a ``(C, H, W, D)`` array as ``(C, H, W)``.

    A MetaTensor becomes a fresh 2D MetaTensor: the 3x3 affine of the slice's plane (what ``SpatialCrop`` of slice
    ``k`` followed by ``SqueezeDim`` would give), the volume's other metadata, and no transform trace (the volume's
    trace does not apply to a slice).
    """
    if not isinstance(x, MetaTensor):
        return x[..., k]
    data = x.as_tensor()[..., k].clone()
    aff = x.affine.to(torch.float64).clone()
    if aff.shape == (4, 4):
        aff[:, 3] = aff[:, 3] + aff[:, 2] * k
        keep = [0, 1, 3]
        aff = aff[keep][:, keep]
    meta = {key: val for key, val in x.meta.items() if key not in ("affine", "spatial_shape")}
    meta["spatial_shape"] = np.asarray(data.shape[1:])
    return MetaTensor(data, affine=aff, meta=meta)


class SelectSlicesd(RandomizableTransform, MapTransform):
    """Turn one volume dict into a LIST of 2D slice dicts for training.

    Keeps every slice where ANY rater marks the target, plus randomly drawn empty slices so that they make up
    (in expectation) ``empty_share`` of the returned list: ``n_empty = n_marked * empty_share / (1 - empty_share)``,
    rounded stochastically and capped by the number of empty slices available. A volume with no marked slice at all
    yields one random empty slice when ``empty_share > 0``, else an empty list. Slices are returned in slice order.

    Like MONAI's ``RandCropByPosNegLabeld``, the list is handled by MONAI: a ``Compose`` (``map_items=True``, the
    default) applies the following transforms to each slice dict, and ``list_data_collate`` (MONAI's DataLoader
    default) flattens the lists into one batch. Caching datasets stop caching at this (random) transform.

    Args:
        label_key: key of the rater masks ``(K, H, W, D)`` that decides which slices are marked.
        empty_share: expected fraction of empty slices in the output, in ``[0, 1)``.
        keys: the spatial keys to slice, each ``(C, H, W, D)`` -> ``(C, H, W)``; every other entry of the dict
            (``id``, file names, ...) is copied into each slice dict as is.
        slice_key: key of the new integer slice index in each slice dict.
        id_key: key of the case id; when the dict has none, it is set to :func:`~ambisam.data.case_id` of the
            image (its file name without the image extension), so that embeddings can be cached per
            ``(id, slice_index)``.
        image_key: key whose file name gives the fallback id.
        allow_missing_keys: do not fail when one of ``keys`` is absent.

    Returns:
        (from ``__call__``) a list of dicts, each with ``image (C, H, W)``, ``label (K, H, W)`` (2D MetaTensors
        with the slice plane's 3x3 affine), the copied entries, ``id`` and ``slice_index`` (int).

    Raises:
        ValueError: when ``empty_share`` is not in ``[0, 1)`` or the label is not ``(K, H, W, D)``.
    """

    def __init__(
        self,
        label_key: str = "label",
        empty_share: float = 0.1,
        keys: KeysCollection = ("image", "label"),
        slice_key: str = "slice_index",
        id_key: str = "id",
        image_key: str = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= float(empty_share) < 1.0:
            raise ValueError(f"empty_share must be in [0, 1), got {empty_share!r}.")
        self.label_key = label_key
        self.empty_share = float(empty_share)
        self.slice_key = slice_key
        self.id_key = id_key
        self.image_key = image_key
        self._indices: list[int] = []

    def randomize(self, marked: np.ndarray) -> None:
        """Draw the slice indices: all marked ones plus a random sample of empty ones."""
        pos = np.flatnonzero(marked)
        neg = np.flatnonzero(~marked)
        if len(pos) == 0:
            n_neg = 1 if self.empty_share > 0 else 0
        else:
            want = len(pos) * self.empty_share / (1.0 - self.empty_share)
            n_neg = int(math.floor(want)) + int(self.R.rand() < want - math.floor(want))
        n_neg = min(n_neg, len(neg))
        chosen = self.R.choice(neg, size=n_neg, replace=False) if n_neg else np.empty(0, dtype=int)
        self._indices = sorted(int(i) for i in np.concatenate([pos, chosen]))

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        label = _as_tensor(d[self.label_key])
        if label.ndim != 4:
            raise ValueError(f"SelectSlicesd expects '{self.label_key}' as (K, H, W, D), got {tuple(label.shape)}.")
        marked = (label != 0).flatten(0, 2).any(dim=0).cpu().numpy()
        self.randomize(marked)
        if self.id_key not in d and _filename(d.get(self.image_key)):
            d[self.id_key] = case_id(d[self.image_key])
        keys = [key for key in self.key_iterator(d)]
        out = []
        for k in self._indices:
            item = {key: val for key, val in d.items() if key not in keys}
            for key in keys:
                item[key] = _slice_meta_tensor(d[key], k)
            item[self.slice_key] = int(k)
            out.append(item)
        return out


class LesionCropd(MapTransform):
    """A fixed-size crop centred on the raters' union, padded where it runs past the image border.

    The centre is the middle of the bounding box of all raters' masks together (the image centre when no rater
    marks anything). The crop is done with MONAI's ``SpatialCrop`` and the missing border filled with MONAI's
    ``BorderPad``, so the lesion stays exactly centred and the output always has ``spatial_size``. Works on 2D
    slices ``(C, H, W)`` and on volumes ``(C, H, W, D)``. A lesion larger than ``spatial_size`` is cut.

    Args:
        keys: the spatial keys to crop (image, label, and e.g. ``rater_mask``), all with the label's spatial shape.
        label_key: key of the rater masks ``(K, *spatial)`` that defines the centre.
        spatial_size: crop size per spatial axis (an int for all axes).
        shift_inside: instead of padding, shift the window to lie inside the image where the image is large
            enough (padding only where the image is smaller than the crop). Default ``False`` (keep centred).
        mode: MONAI/PyTorch padding mode (``"constant"`` pads with ``value``, default 0).
        allow_missing_keys: do not fail when a key is absent.
        pad_kwargs: further arguments to ``BorderPad`` (e.g. ``value=0``).

    Returns:
        (from ``__call__``) the dict with each key cropped to ``(C, *spatial_size)``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        spatial_size: Sequence[int] | int = 128,
        shift_inside: bool = False,
        mode: str = "constant",
        allow_missing_keys: bool = False,
        **pad_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.spatial_size = spatial_size
        self.shift_inside = bool(shift_inside)
        self.mode = mode
        self.pad_kwargs = pad_kwargs

    def window(self, label: Any) -> tuple[list[int], list[int]]:
        """The crop window ``(start, end)`` per spatial axis (may extend past the image) for a label."""
        lab = _as_tensor(label)
        spatial = tuple(lab.shape[1:])
        size = list(ensure_tuple(self.spatial_size))
        if len(size) == 1:
            size = size * len(spatial)
        if len(size) != len(spatial):
            raise ValueError(f"spatial_size {tuple(size)} does not match the {len(spatial)} spatial axes.")
        size = [int(s) if int(s) > 0 else spatial[a] for a, s in enumerate(size)]
        union = (lab != 0).any(dim=0)
        nz = torch.nonzero(union)
        if nz.numel():
            centre = [(int(nz[:, a].min()) + int(nz[:, a].max())) // 2 for a in range(len(spatial))]
        else:
            centre = [(s - 1) // 2 for s in spatial]
        start, end = [], []
        for c, s, n in zip(centre, size, spatial):
            lo = c - (s - 1) // 2
            if self.shift_inside and n >= s:
                lo = min(max(lo, 0), n - s)
            elif self.shift_inside:
                lo = -((s - n) // 2)
            start.append(lo)
            end.append(lo + s)
        return start, end

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start, end = self.window(d[self.label_key])
        spatial = tuple(_as_tensor(d[self.label_key]).shape[1:])
        crop = SpatialCrop(
            roi_start=[max(s, 0) for s in start], roi_end=[min(e, n) for e, n in zip(end, spatial)]
        )
        border: list[int] = []
        for s, e, n in zip(start, end, spatial):
            border += [max(0, -s), max(0, e - n)]
        pad = BorderPad(spatial_border=border, mode=self.mode, **self.pad_kwargs) if any(border) else None
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != spatial:
                raise ValueError(
                    f"LesionCropd: '{key}' has spatial shape {tuple(d[key].shape[1:])}, '{self.label_key}' {spatial}."
                )
            out = crop(d[key])
            d[key] = pad(out) if pad is not None else out
        return d
