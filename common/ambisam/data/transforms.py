"""MONAI dictionary transforms for multi-rater, box-prompted segmentation: only what MONAI does not already do.

Conventions (shared across ``ambisam``):

- after ``LoadImaged(keys=["image", "label"], ensure_channel_first=True)`` a case is ``image (1, H, W, D)`` and
  ``label (K, H, W, D)``: the ``K`` raters' 0/1 masks stacked as channels. A 2D image is a one-slice volume
  (``D = 1``); slices run along the last axis and arrays are indexed ``a[c, i, j, k]``;
- a 2D box for SAM is ``[x_min, y_min, x_max, y_max] = [j_min, i_min, j_max, i_max]`` (x along the columns ``j``,
  y along the rows ``i``), inclusive pixel indices, ``float32``;
- per-slice boxes of a volume are a ``(D, 4)`` tensor whose row ``k`` is the box on slice ``k``, or
  ``[-1, -1, -1, -1]`` where slice ``k`` has no prompt (that slice is background, not a model call);
- a 3D box is ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices of the stored array; a box
  file is JSON ``{"box": [...]}``.

Everything MONAI already does (loading, orientation, spacing, intensity scaling, cropping, padding, resizing,
inverting, saving) is done with MONAI's own transforms; :func:`intensity_transform` only picks the right one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    MapTransform,
    RandomizableTransform,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialCrop,
)
from monai.utils import ensure_tuple

from ambisam.errors import InputError

__all__ = [
    "NO_BOX",
    "box_from_mask",
    "boxes_from_mask",
    "slice_boxes_from_box3d",
    "ValidateMultiRaterd",
    "intensity_transform",
    "SelectSlicesd",
    "LesionCropd",
    "BoxFromRaterd",
    "BoxesFromLabeld",
    "PromptBoxesd",
    "LoadBoxd",
    "ResizeBoxd",
    "SplitSamplingOutputd",
]

#: The row of a per-slice box tensor for a slice without a prompt.
NO_BOX = (-1.0, -1.0, -1.0, -1.0)


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _filename(x: Any, fallback: Any = None) -> Any:
    """The file ``x`` was loaded from (``meta["filename_or_obj"]`` of a MetaTensor), else ``fallback``."""
    if isinstance(x, MetaTensor):
        name = x.meta.get("filename_or_obj")
        if name:
            return name
    return fallback


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain torch tensor view of an array-like (MetaTensor metadata dropped)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def box_from_mask(mask: Any) -> torch.Tensor | None:
    """The tight 2D box of a mask's nonzero pixels.

    Args:
        mask: ``(H, W)`` array or tensor; nonzero pixels are foreground.

    Returns:
        ``float32 (4,)`` ``[x_min, y_min, x_max, y_max] = [j_min, i_min, j_max, i_max]``, inclusive pixel indices,
        or ``None`` when the mask is empty.

    Raises:
        ValueError: when ``mask`` is not 2D.
    """
    m = _as_tensor(mask)
    if m.ndim != 2:
        raise ValueError(f"box_from_mask expects an (H, W) mask, got shape {tuple(m.shape)}.")
    m = m != 0
    rows = torch.nonzero(m.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(m.any(dim=0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1], rows[-1]], dtype=torch.float32)


def boxes_from_mask(mask: Any) -> torch.Tensor:
    """Per-slice 2D boxes of a volume mask.

    Args:
        mask: ``(H, W, D)`` array or tensor; nonzero voxels are foreground.

    Returns:
        ``float32 (D, 4)``: row ``k`` is :func:`box_from_mask` of slice ``k``, or ``[-1, -1, -1, -1]`` where slice
        ``k`` is empty.

    Raises:
        ValueError: when ``mask`` is not 3D.
    """
    m = _as_tensor(mask)
    if m.ndim != 3:
        raise ValueError(f"boxes_from_mask expects an (H, W, D) mask, got shape {tuple(m.shape)}.")
    m = m != 0
    depth = m.shape[-1]
    out = torch.tensor(NO_BOX, dtype=torch.float32).repeat(depth, 1)
    rows_any = m.any(dim=1)  # (H, D): does row i of slice k hold anything
    cols_any = m.any(dim=0)  # (W, D)
    marked = rows_any.any(dim=0)  # (D,)
    h_idx = torch.arange(m.shape[0]).unsqueeze(1)
    w_idx = torch.arange(m.shape[1]).unsqueeze(1)
    big = max(m.shape[0], m.shape[1]) + 1
    i_min = torch.where(rows_any, h_idx, big).amin(dim=0)
    i_max = torch.where(rows_any, h_idx, -1).amax(dim=0)
    j_min = torch.where(cols_any, w_idx, big).amin(dim=0)
    j_max = torch.where(cols_any, w_idx, -1).amax(dim=0)
    boxes = torch.stack([j_min, i_min, j_max, i_max], dim=1).to(torch.float32)
    out[marked] = boxes[marked]
    return out


def slice_boxes_from_box3d(box: Sequence[int], depth: int) -> torch.Tensor:
    """Per-slice 2D boxes of a (validated) 3D box.

    Args:
        box: ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices, inside the volume.
        depth: number of slices ``D`` of the volume.

    Returns:
        ``float32 (D, 4)``: ``[j_min, i_min, j_max, i_max]`` on slices ``k_min..k_max``, ``-1`` rows elsewhere.
    """
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    out = torch.tensor(NO_BOX, dtype=torch.float32).repeat(depth, 1)
    out[k0 : k1 + 1] = torch.tensor([j0, i0, j1, i1], dtype=torch.float32)
    return out


def _jitter_box(box: torch.Tensor, jitter: int, height: int, width: int, rng: np.random.RandomState) -> torch.Tensor:
    """Add an independent uniform integer offset in ``[-jitter, jitter]`` to each coordinate, clip to the image and
    keep ``min <= max``."""
    box = box.clone()
    if jitter > 0:
        box = box + torch.as_tensor(rng.randint(-jitter, jitter + 1, size=4), dtype=torch.float32)
    box[0::2] = box[0::2].clamp(0, width - 1)
    box[1::2] = box[1::2].clamp(0, height - 1)
    x = torch.sort(box[0::2]).values
    y = torch.sort(box[1::2]).values
    return torch.stack([x[0], y[0], x[1], y[1]])


def _check_jitter(jitter: Any) -> int:
    if isinstance(jitter, bool) or not isinstance(jitter, (int, np.integer)) or jitter < 0:
        raise ValueError(f"jitter must be a whole number of pixels >= 0, got {jitter!r}.")
    return int(jitter)


# ---------------------------------------------------------------------------------------------------------------------
# validation and intensity
# ---------------------------------------------------------------------------------------------------------------------


class ValidateMultiRaterd(MapTransform):
    """Check a loaded multi-rater case and raise one clear :class:`~ambisam.errors.InputError` naming the file.

    Put it right after ``LoadImaged(keys=["image", "label"], ensure_channel_first=True)``, before any spatial
    transform, so that shapes and the file names refer to what is stored on disk. The data pass through unchanged.

    Args:
        image_key: key of the image, expected ``(C, H, W, D)`` (``C = 1`` for CT; a multi-channel image, e.g. MRI
            sequences stored channels-last ``(H, W, D, C)``, is accepted).
        label_key: key of the rater masks, expected ``(K, H, W, D)`` with values 0/1.
        num_raters: the number of raters the dataset declares; a label with fewer channels is an error (more is
            accepted). ``None`` skips the check.
        allow_missing_keys: do not fail when the label is absent (inference); the image is always required.

    Returns:
        (from ``__call__``) the input dict, unchanged.

    Raises:
        InputError: (from ``__call__``) naming the image or label file (``meta["filename_or_obj"]``) when the image
            is not ``(C, H, W, D)``, holds NaN or infinite values, the label is not ``(K, H, W, D)``, holds values
            other than 0 and 1, has fewer raters than ``num_raters``, or its spatial shape differs from the image's;
            or when the data item has no image at all.
        ValueError: (from ``__init__``) when ``num_raters`` is not a positive integer.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        num_raters: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        keys = [image_key] + ([label_key] if label_key is not None else [])
        super().__init__(keys, allow_missing_keys)
        if num_raters is not None and (isinstance(num_raters, bool) or int(num_raters) != num_raters or num_raters < 1):
            raise ValueError(f"num_raters must be a positive integer or None, got {num_raters!r}.")
        self.image_key = image_key
        self.label_key = label_key
        self.num_raters = None if num_raters is None else int(num_raters)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            raise InputError(None, f"the data item has no '{self.image_key}' entry: {sorted(map(str, d))}.")
        image = d[self.image_key]
        image_file = _filename(image)
        img = _as_tensor(image)
        image_shape = tuple(img.shape[1:])
        if img.ndim != 4:
            raise InputError(
                image_file,
                f"image has shape {_fmt_shape(img.shape[1:])} after adding the channel, i.e. {img.ndim - 1} "
                "spatial dimension(s); expected 3 (H, W, D) - store a 2D image as a one-slice volume (H, W, 1).",
            )
        if img.is_floating_point() or img.is_complex():
            bad = int((~torch.isfinite(img)).sum())
            if bad:
                raise InputError(image_file, f"image contains {bad} NaN or infinite intensity value(s).")
        if self.label_key is not None and (self.label_key in d or not self.allow_missing_keys):
            label = d[self.label_key]
            label_file = _filename(label)
            lab = _as_tensor(label)
            if lab.ndim != 4:
                raise InputError(
                    label_file,
                    f"label has shape {_fmt_shape(lab.shape)} after adding the channel; expected (K, H, W, D): "
                    "K rater masks of a 3D volume (a 2D image is a one-slice volume).",
                )
            not_binary = (lab != 0) & (lab != 1)
            if bool(not_binary.any()):
                found = torch.unique(lab[not_binary])[:5].tolist()
                raters = sorted({int(c) for c in torch.nonzero(not_binary.flatten(1).any(dim=1)).flatten()})
                raise InputError(
                    label_file,
                    f"label contains values other than 0 and 1 (found {', '.join(f'{v:g}' for v in found)}"
                    f"{', ...' if len(found) == 5 else ''} in rater channel(s) {raters}); masks must be binary.",
                )
            if self.num_raters is not None and lab.shape[0] < self.num_raters:
                raise InputError(
                    label_file,
                    f"label has {lab.shape[0]} rater mask(s); the dataset declares {self.num_raters} raters.",
                )
            if image_shape is not None and tuple(lab.shape[1:]) != image_shape:
                raise InputError(
                    label_file,
                    f"label spatial shape {_fmt_shape(lab.shape[1:])} differs from the image's "
                    f"{_fmt_shape(image_shape)}" + (f" ({image_file})." if image_file else "."),
                )
        return d


def intensity_transform(
    keys: KeysCollection = "image",
    modality: str = "ct",
    window: Sequence[float] = (-1000, 400),
    percentiles: Sequence[float] = (0.5, 99.5),
) -> MapTransform:
    """The MONAI transform that maps intensities to ``[0, 1]`` for a modality.

    Args:
        keys: the image key(s).
        modality: ``"ct"``: the Hounsfield window ``window`` scaled to ``[0, 1]`` with clipping
            (``ScaleIntensityRanged``); ``"mri"``: the ``percentiles`` of each image scaled to ``[0, 1]`` with
            clipping (``ScaleIntensityRangePercentilesd``); ``"none"``: min-max to ``[0, 1]`` (``ScaleIntensityd``).
            Case-insensitive. "mri" and "none" work per channel (multi-sequence images); "ct" uses one window.
        window: ``(low, high)`` CT window in HU; default the lung window ``(-1000, 400)``.
        percentiles: ``(lower, upper)`` percentiles for MRI.

    Returns:
        A MONAI dictionary transform.

    Raises:
        ValueError: for an unknown modality or a window/percentile pair with ``low >= high``.
    """
    mod = str(modality).lower()
    if mod == "ct":
        lo, hi = (float(v) for v in window)
        if not lo < hi:
            raise ValueError(f"CT window must be (low, high) with low < high, got {tuple(window)}.")
        return ScaleIntensityRanged(keys=keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if mod == "mri":
        lo, hi = (float(v) for v in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"MRI percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(percentiles)}.")
        return ScaleIntensityRangePercentilesd(
            keys=keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    if mod == "none":
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0, channel_wise=True)
    raise ValueError(f"modality must be 'ct', 'mri' or 'none', got {modality!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# slices and crops
# ---------------------------------------------------------------------------------------------------------------------


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
        id_key: key of the case id; when the dict has none, it is set to the image file's name without its
            extension (so that embeddings can be cached per ``(id, slice_index)``).
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
        if self.id_key not in d:
            name = _filename(d.get(self.image_key))
            if name:
                base = os.path.basename(str(name))
                for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".npy", ".npz"):
                    if base.lower().endswith(ext):
                        base = base[: -len(ext)]
                        break
                d[self.id_key] = base
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


# ---------------------------------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------------------------------


class BoxFromRaterd(RandomizableTransform, MapTransform):
    """Pick one rater of a 2D slice and make the SAM box prompt and the training target from that rater's mask.

    Args:
        label_key: key of the rater masks ``(K, H, W)``.
        rater: ``"random"`` (uniform over the ``K`` raters), a fixed rater index, or ``"union"`` (all raters
            together; ``rater_index`` is then ``-1``).
        jitter: box augmentation: each of the 4 coordinates moves by an independent uniform random whole number of
            pixels in ``[-jitter, jitter]``; the box is then clipped to the image and kept with ``min <= max``.
        empty: what box an empty rater mask gets: ``"other"``: the box of the union of the other raters (and
            ``default_box`` when they are all empty too); ``"default"``: ``default_box``.
        default_box: ``[x_min, y_min, x_max, y_max]``; ``None`` means the whole image ``[0, 0, W - 1, H - 1]``.
        box_key: output key of the box.
        rater_index_key: output key of the chosen rater index (int, ``-1`` for the union).
        rater_mask_key: output key of the chosen rater's mask ``(1, H, W)``, same type and metadata as the label.

    Returns:
        (from ``__call__``) the dict plus ``rater_index`` (int), ``box`` (``float32 (4,)`` ``[x_min, y_min, x_max,
        y_max]``) and ``rater_mask (1, H, W)``.

    Raises:
        ValueError: (from ``__init__``) bad ``rater``/``jitter``/``empty``; (from ``__call__``) a label that is not
            ``(K, H, W)``.
        InputError: (from ``__call__``) a fixed rater index the label does not have, naming the label file.
    """

    def __init__(
        self,
        label_key: str = "label",
        rater: str | int = "random",
        jitter: int = 0,
        empty: str = "other",
        default_box: Sequence[float] | None = None,
        box_key: str = "box",
        rater_index_key: str = "rater_index",
        rater_mask_key: str = "rater_mask",
    ) -> None:
        MapTransform.__init__(self, label_key)
        RandomizableTransform.__init__(self, prob=1.0)
        if isinstance(rater, str):
            if rater not in ("random", "union"):
                raise ValueError(f"rater must be 'random', 'union' or a rater index, got {rater!r}.")
        elif isinstance(rater, bool) or int(rater) != rater or rater < 0:
            raise ValueError(f"a fixed rater must be an index >= 0, got {rater!r}.")
        if empty not in ("other", "default"):
            raise ValueError(f"empty must be 'other' or 'default', got {empty!r}.")
        if default_box is not None and len(default_box) != 4:
            raise ValueError(f"default_box must be [x_min, y_min, x_max, y_max], got {default_box!r}.")
        self.label_key = label_key
        self.rater = rater if isinstance(rater, str) else int(rater)
        self.jitter = _check_jitter(jitter)
        self.empty = empty
        self.default_box = None if default_box is None else [float(v) for v in default_box]
        self.box_key = box_key
        self.rater_index_key = rater_index_key
        self.rater_mask_key = rater_mask_key
        self._rater_index = 0

    def randomize(self, num_raters: int) -> None:
        """Draw the rater index (``-1`` for the union)."""
        if self.rater == "union":
            self._rater_index = -1
        elif self.rater == "random":
            self._rater_index = int(self.R.randint(num_raters))
        else:
            self._rater_index = int(self.rater)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        lab = _as_tensor(label)
        if lab.ndim != 3:
            raise ValueError(f"BoxFromRaterd expects '{self.label_key}' as (K, H, W), got {tuple(lab.shape)}.")
        num_raters, height, width = lab.shape
        self.randomize(num_raters)
        r = self._rater_index
        if r >= num_raters:
            raise InputError(_filename(label), f"label has {num_raters} rater mask(s); rater index {r} requested.")
        fg = lab != 0
        mask = fg.any(dim=0) if r < 0 else fg[r]
        box = box_from_mask(mask)
        if box is None and self.empty == "other" and r >= 0:
            others = torch.cat([fg[:r], fg[r + 1 :]], dim=0)
            box = box_from_mask(others.any(dim=0)) if others.shape[0] else None
        if box is None:
            box = torch.tensor(
                self.default_box if self.default_box is not None else [0, 0, width - 1, height - 1],
                dtype=torch.float32,
            )
        d[self.box_key] = _jitter_box(box, self.jitter, height, width, self.R)
        d[self.rater_index_key] = r
        target = lab[r : r + 1].clone() if r >= 0 else fg.any(dim=0, keepdim=True).to(lab.dtype)
        if isinstance(label, MetaTensor):
            target = MetaTensor(
                target, meta=deepcopy(label.meta), applied_operations=deepcopy(label.applied_operations)
            )
        elif isinstance(label, np.ndarray):
            target = target.numpy()
        d[self.rater_mask_key] = target
        return d


class BoxesFromLabeld(RandomizableTransform, MapTransform):
    """Per-slice box prompts ``(D, 4)`` of a volume from the raters' union (e.g. to simulate a user's boxes).

    Args:
        label_key: key of the rater masks ``(K, H, W, D)`` (or any ``(C, H, W, D)`` mask: all channels are united).
        box_key: output key.
        jitter: each coordinate of each marked slice's box moves by an independent uniform random whole number of
            pixels in ``[-jitter, jitter]``, then is clipped to the image (``min <= max`` kept).
        allow_missing_keys: do not fail when the label is absent.

    Returns:
        (from ``__call__``) the dict plus ``box``: ``float32 (D, 4)``, row ``k`` = ``[x_min, y_min, x_max, y_max]``
        of slice ``k``, ``[-1, -1, -1, -1]`` where no rater marks anything.

    Raises:
        ValueError: when the label is not ``(C, H, W, D)`` or ``jitter`` is not a whole number >= 0.
    """

    def __init__(
        self, label_key: str = "label", box_key: str = "box", jitter: int = 0, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key = label_key
        self.box_key = box_key
        self.jitter = _check_jitter(jitter)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = _as_tensor(d[key])
            if lab.ndim != 4:
                raise ValueError(f"BoxesFromLabeld expects '{key}' as (C, H, W, D), got {tuple(lab.shape)}.")
            boxes = boxes_from_mask((lab != 0).any(dim=0))
            if self.jitter:
                height, width = lab.shape[1], lab.shape[2]
                for k in torch.nonzero(boxes[:, 0] >= 0).flatten().tolist():
                    boxes[k] = _jitter_box(boxes[k], self.jitter, height, width, self.R)
            d[self.box_key] = boxes
        return d


class PromptBoxesd(BoxesFromLabeld):
    """The box prompts of one case at inference: the given ``box`` if the item has one (from :class:`LoadBoxd`),
    else the raters' union's per-slice boxes (with jitter, to simulate a user), else an error.

    Args:
        label_key, box_key, jitter: as :class:`BoxesFromLabeld`.
        image_key: the image, named in the error.

    Raises:
        InputError: the item has neither a box nor a label (naming the image file).
    """

    def __init__(self, label_key: str = "label", box_key: str = "box", jitter: int = 0, image_key: str = "image"):
        super().__init__(label_key, box_key, jitter, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.box_key in data:
            return dict(data)
        if self.label_key not in data:
            raise InputError(
                _filename(data.get(self.image_key)),
                "no box prompt: give a box file (--box PATH) or rater masks to derive boxes from (--label PATH)",
            )
        return super().__call__(data)


class LoadBoxd(MapTransform):
    """Turn a 3D box (a JSON box file, or the list itself from the datalist) into per-slice boxes ``(D, 4)``.

    The 3D box is ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices of the STORED image, so
    this must run right after loading (before ``Orientationd``/``Spacingd``). To follow later resampling, give
    ``mask_key``: the box is then also written as a ``(1, H, W, D)`` 0/1 mask with the image's metadata; resample it
    with the image (nearest) and rebuild the per-slice boxes from it with ``BoxesFromLabeld(label_key=mask_key)``
    (``ambisam.data.pipelines.volume_transforms`` does this).

    Args:
        box_key: key of the box: a path (``str``/``PathLike``) to a JSON file ``{"box": [...]}``, or the 6 numbers
            (list/tuple/array), or a dict ``{"box": [...]}``. Replaced by the per-slice boxes.
        image_key: key of the loaded image ``(1, H, W, D)`` whose shape the box must fit.
        mask_key: optional output key for the box as a mask (see above).
        allow_missing_keys: do not fail when the box key is absent (e.g. cases without a box).

    Returns:
        (from ``__call__``) the dict with ``box`` = ``float32 (D, 4)`` (``[j_min, i_min, j_max, i_max]`` on slices
        ``k_min..k_max``, ``-1`` rows elsewhere) and, with ``mask_key``, the box mask.

    Raises:
        InputError: naming the box file (or the image file when the box came from the datalist) when the file is
            missing or not JSON ``{"box": [...]}``, the box does not have 6 whole numbers, has a min > max, or lies
            (partly) outside the image.
    """

    def __init__(
        self,
        box_key: str = "box",
        image_key: str = "image",
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(box_key, allow_missing_keys)
        self.box_key = box_key
        self.image_key = image_key
        self.mask_key = mask_key

    @staticmethod
    def read_box(value: Any, image_file: Any = None) -> tuple[list[float], Any]:
        """The raw 3D box from a path, a dict or a list, and the file to name in errors."""
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if not os.path.isfile(path):
                raise InputError(path, "box file not found.")
            try:
                with open(path, encoding="utf-8") as f:
                    content = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(path, f"box file is not readable JSON ({e}).") from None
            if not isinstance(content, dict) or "box" not in content:
                raise InputError(path, 'box file must hold a JSON object {"box": [i_min, j_min, k_min, i_max, '
                                       "j_max, k_max]}.")
            return content["box"], path
        if isinstance(value, Mapping):
            if "box" not in value:
                raise InputError(image_file, 'box given as a mapping must have a "box" entry.')
            return value["box"], image_file
        return value, image_file

    @staticmethod
    def check_box(raw: Any, shape: Sequence[int], source: Any) -> list[int]:
        """Validate a raw 3D box against the image's spatial shape ``(H, W, D)``; return it as 6 ints."""
        fmt = "[i_min, j_min, k_min, i_max, j_max, k_max]"
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(source, f"box must be 6 numbers {fmt}, got {raw!r}.") from None
        if arr.ndim != 1 or arr.shape[0] != 6:
            raise InputError(source, f"box must be 6 numbers {fmt}, got {arr.size} value(s) of shape {arr.shape}.")
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(source, f"box coordinates must be whole voxel indices {fmt}, got {arr.tolist()}.")
        box = [int(v) for v in arr]
        names = "ijk"
        for a in range(3):
            if box[a] > box[a + 3]:
                raise InputError(source, f"box {box} has {names[a]}_min {box[a]} > {names[a]}_max {box[a + 3]}.")
        for a in range(3):
            if box[a] < 0 or box[a + 3] >= shape[a]:
                raise InputError(
                    source,
                    f"box {box} lies outside the image of shape {_fmt_shape(shape)} along axis {names[a]} "
                    f"(valid indices 0..{shape[a] - 1}).",
                )
        return box

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            img = _as_tensor(image)
            image_file = _filename(image)
            if img.ndim != 4:
                raise ValueError(f"LoadBoxd expects '{self.image_key}' as (1, H, W, D), got {tuple(img.shape)}.")
            shape = tuple(img.shape[1:])
            raw, source = self.read_box(d[key], image_file)
            box = self.check_box(raw, shape, source)
            d[key] = slice_boxes_from_box3d(box, shape[2])
            if self.mask_key is not None:
                mask = torch.zeros((1, *shape), dtype=torch.float32)
                mask[0, box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = 1
                if isinstance(image, MetaTensor):
                    mask = MetaTensor(
                        mask, meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations)
                    )
                d[self.mask_key] = mask
        return d


class ResizeBoxd(MapTransform):
    """Scale 2D boxes so that they follow a ``Resized`` of their image to ``spatial_size`` in-plane.

    Place it BEFORE the ``Resized`` of the image (it reads the image's current size). The scaling is the one SAM,
    MedSAM and ``SamBackbone.boxes_to_input`` use: ``x * W'/W``, ``y * H'/H``. ``[-1, -1, -1, -1]`` rows (no
    prompt) stay as they are. Apply it again with the original size to map boxes back.

    MONAI's ``monai.apps.detection`` box transforms (``ZoomBoxd`` etc.) do not fit: their boxes are ``(N, 2*dims)``
    with x along the FIRST spatial axis (ours: along the columns), they have no "no prompt" rows, and they resize the
    image themselves with ``Zoom`` rather than following a ``Resized``.

    Args:
        keys: box key(s): ``(4,)`` or ``(..., 4)`` boxes ``[x_min, y_min, x_max, y_max]`` in the reference image's
            pixels.
        ref_key: key of the image the boxes refer to: ``(C, H, W)`` or ``(C, H, W, D)``; ``H, W`` are read.
        spatial_size: the in-plane target size ``(H', W')`` (an int for both); a ``-1`` keeps that axis, and any
            further entries (e.g. the ``D`` of a 3D ``Resized`` size) are ignored.
        allow_missing_keys: do not fail when a box key is absent.

    Returns:
        (from ``__call__``) the dict with ``float32`` boxes of the same shape.
    """

    def __init__(
        self,
        keys: KeysCollection = "box",
        ref_key: str = "image",
        spatial_size: Sequence[int] | int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        size = list(ensure_tuple(spatial_size))
        if len(size) == 1:
            size = size * 2
        self.spatial_size = [int(s) for s in size[:2]]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = _as_tensor(d[self.ref_key])
        height, width = int(ref.shape[1]), int(ref.shape[2])
        new_h = height if self.spatial_size[0] < 0 else self.spatial_size[0]
        new_w = width if self.spatial_size[1] < 0 else self.spatial_size[1]
        scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        for key in self.key_iterator(d):
            box = _as_tensor(d[key]).to(torch.float32)
            if box.shape[-1] != 4:
                raise ValueError(f"ResizeBoxd expects '{key}' boxes of shape (..., 4), got {tuple(box.shape)}.")
            no_box = (box < 0).all(dim=-1, keepdim=True)
            d[key] = torch.where(no_box, box, box * scale)
        return d


# ---------------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------------


class SplitSamplingOutputd(MapTransform):
    """Split the sampling inferer's output into the final mask, the mean, the uncertainty maps and the samples.

    The inferer returns one tensor per case ``(3 + N, H, W, D)``: channels ``[mean probability, entropy of the mean,
    variance, N binary samples ...]``. Each output keeps the input's MetaTensor metadata (affine, file name) and
    transform trace, so ``Invertd(keys=[...], orig_keys="image")`` maps each back through
    ``Orientationd``/``Spacingd`` and ``SaveImaged`` writes each in the input's geometry (invert ``pred`` and
    ``samples`` with ``nearest_interp=True``, the continuous maps with ``False``).

    Args:
        key: key of the inferer's output; it is replaced by the final mask.
        num_samples: the expected ``N``; ``None`` accepts any ``N >= 0``.
        threshold: the final mask is ``mean > threshold``.
        mean_key: output key of the mean probability ``(1, H, W, D)``.
        uncertainty_key: output key of the entropy of the mean ``(1, H, W, D)``.
        variance_key: output key of the variance ``(1, H, W, D)``.
        samples_key: output key of the samples ``(N, H, W, D)``.

    Returns:
        (from ``__call__``) the dict with ``pred`` ``(1, H, W, D)`` (0/1, the mean's dtype), ``mean``,
        ``uncertainty``, ``variance`` and ``samples``.

    Raises:
        ValueError: when the output has fewer than 3 channels or not ``3 + num_samples``.
    """

    def __init__(
        self,
        key: str = "pred",
        num_samples: int | None = None,
        threshold: float = 0.5,
        mean_key: str = "mean",
        uncertainty_key: str = "uncertainty",
        variance_key: str = "variance",
        samples_key: str = "samples",
    ) -> None:
        super().__init__(key)
        self.key = key
        self.num_samples = None if num_samples is None else int(num_samples)
        self.threshold = float(threshold)
        self.mean_key = mean_key
        self.uncertainty_key = uncertainty_key
        self.variance_key = variance_key
        self.samples_key = samples_key

    @staticmethod
    def _part(x: Any, start: int, stop: int) -> Any:
        if isinstance(x, MetaTensor):
            return MetaTensor(
                x.as_tensor()[start:stop].clone(),
                meta=deepcopy(x.meta),
                applied_operations=deepcopy(x.applied_operations),
            )
        return x[start:stop].clone() if torch.is_tensor(x) else np.array(x[start:stop])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        out = d[self.key]
        channels = int(out.shape[0])
        if channels < 3:
            raise ValueError(
                f"'{self.key}' has {channels} channels; expected 3 + N (mean, entropy, variance, samples)."
            )
        if self.num_samples is not None and channels != 3 + self.num_samples:
            raise ValueError(f"'{self.key}' has {channels} channels; expected 3 + {self.num_samples} samples.")
        mean = self._part(out, 0, 1)
        pred = self._part(out, 0, 1)
        if torch.is_tensor(pred):
            pred.copy_((mean > self.threshold).to(pred.dtype))
        else:
            pred = (mean > self.threshold).astype(mean.dtype)
        d[self.mean_key] = mean
        d[self.uncertainty_key] = self._part(out, 1, 2)
        d[self.variance_key] = self._part(out, 2, 3)
        d[self.samples_key] = self._part(out, 3, channels)
        d[self.key] = pred
        return d
