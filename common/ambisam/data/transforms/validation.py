"""Checking a loaded multi-rater case before anything else runs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from ambisam.data.transforms._utils import _as_tensor, _filename, _fmt_shape
from ambisam.errors import InputError

__all__ = ["ValidateMultiRaterd"]


class ValidateMultiRaterd(MapTransform):
    """Check a loaded multi-rater case and raise one clear :class:`~ambisam.errors.InputError` naming the file.

    Put it right after loading (``LoadImaged`` of the image, :class:`~ambisam.data.LoadRatersd` of the label, or
    ``LoadImaged(keys=["image", "label"], ensure_channel_first=True)``), before any spatial transform, so that shapes
    and the file names refer to what is stored on disk. The data pass through unchanged.

    Args:
        image_key: key of the image, expected ``(C, H, W, D)`` (``C = 1`` for CT; a multi-channel image, e.g. MRI
            sequences stored channels-last ``(H, W, D, C)``, is accepted).
        label_key: key of the rater masks, expected ``(K, H, W, D)`` with values 0/1.
        num_raters: the number of raters the dataset declares; a label with fewer channels is an error (more is
            accepted). A rater who did not read the case (a zero channel from :class:`~ambisam.data.LoadRatersd`)
            counts as a declared rater. ``None`` skips the check.
        label_values: the structure values of multi-label rater maps (the datalist's class map values); the label
            may then hold exactly ``{0} | label_values``. ``None``: binary masks, 0 and 1.
        valid_key: key of the per-rater flags ``(K,)`` (from :class:`~ambisam.data.LoadRatersd`); where present
            it must have one entry per label channel.
        allow_missing_keys: do not fail when the label is absent (inference); the image is always required.

    Returns:
        (from ``__call__``) the input dict, unchanged.

    Raises:
        InputError: (from ``__call__``) naming the image or label file (``meta["filename_or_obj"]``) when the image
            is not ``(C, H, W, D)``, holds NaN or infinite values, the label is not ``(K, H, W, D)``, holds values
            other than 0 and 1 (or than 0 and ``label_values``), has fewer raters than ``num_raters`` or another
            number than ``rater_valid`` has entries, or its spatial shape differs from the image's; or when the data
            item has no image at all.
        ValueError: (from ``__init__``) when ``num_raters`` is not a positive integer or ``label_values`` not
            positive integers.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        num_raters: int | None = None,
        allow_missing_keys: bool = False,
        label_values: Sequence[int] | None = None,
        valid_key: str = "rater_valid",
    ) -> None:
        keys = [image_key] + ([label_key] if label_key is not None else [])
        super().__init__(keys, allow_missing_keys)
        if num_raters is not None and (isinstance(num_raters, bool) or int(num_raters) != num_raters or num_raters < 1):
            raise ValueError(f"num_raters must be a positive integer or None, got {num_raters!r}.")
        self.image_key = image_key
        self.label_key = label_key
        self.num_raters = None if num_raters is None else int(num_raters)
        if label_values is not None and (
            not label_values or any(isinstance(v, bool) or int(v) != v or v < 1 for v in label_values)
        ):
            raise ValueError(f"label_values must be positive integers or None, got {label_values!r}.")
        self.label_values = None if label_values is None else sorted({int(v) for v in label_values})
        self.valid_key = valid_key

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
        if min(image_shape[:2]) < 2:
            raise InputError(
                image_file,
                f"image of spatial shape {_fmt_shape(image_shape)} is too small: a slice must be at least 2 x 2 voxels "
                "for a box prompt to have an area.",
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
            allowed = [0] + (self.label_values or [1])
            not_allowed = ~torch.isin(lab, torch.tensor(allowed, dtype=lab.dtype))
            if bool(not_allowed.any()):
                found = torch.unique(lab[not_allowed])[:5].tolist()
                raters = sorted({int(c) for c in torch.nonzero(not_allowed.flatten(1).any(dim=1)).flatten()})
                values = "0 and 1" if self.label_values is None else ", ".join(map(str, allowed))
                rule = "masks must be binary" if self.label_values is None else "the class map's values"
                raise InputError(
                    label_file,
                    f"label contains values other than {values} (found {', '.join(f'{v:g}' for v in found)}"
                    f"{', ...' if len(found) == 5 else ''} in rater channel(s) {raters}); {rule}.",
                )
            valid = d.get(self.valid_key)
            if valid is not None and int(torch.as_tensor(valid).numel()) != lab.shape[0]:
                raise InputError(
                    label_file,
                    f"label has {lab.shape[0]} rater channel(s) but '{self.valid_key}' has "
                    f"{int(torch.as_tensor(valid).numel())} entries.",
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
            _check_same_grid(image, label, image_file, label_file)
        return d


def affine_difference(a: Any, b: Any) -> float | None:
    """How far apart two voxel-to-world affines are, when they are not one voxel grid.

    Args:
        a, b: 4x4 affines (arrays or tensors).

    Returns:
        ``None`` when they agree within float32 rounding of a NIfTI header (relative 1e-4, absolute 1e-3 mm),
        else their largest element difference (``nan`` for affines of different shapes).
    """
    a, b = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (a, b))
    if a.shape != b.shape:
        return float("nan")
    return None if np.allclose(a, b, rtol=1e-4, atol=1e-3) else float(np.abs(a - b).max())


def _check_same_grid(image: Any, label: Any, image_file: Any, label_file: Any) -> None:
    """Raise an InputError naming the label file when both carry an affine (MetaTensors) and they differ by more
    than float32 rounding of a NIfTI header: the rater masks would be drawn on another grid than the image."""
    if not (hasattr(image, "affine") and hasattr(label, "affine")):
        return
    largest = affine_difference(image.affine, label.affine)
    if largest is not None:
        raise InputError(
            label_file,
            f"label's affine differs from the image's (largest difference {largest:.4g})"
            + (f" ({image_file})" if image_file else "")
            + ": the rater masks lie on another voxel grid; resample them onto the image first.",
        )
