"""Box prompts from a MONAI Label client, turned into the bundles' own 3D box.

The bundles take one 3D box ``[i_min, j_min, k_min, i_max, j_max, k_max]`` (inclusive voxel indices of the stored
image, the format of a bundle's ``--box`` file) and prompt every slice from ``k_min`` to ``k_max`` with its
in-plane part. A client gives it in one of these forms (request params, first found wins):

- ``box``: the 3D box itself (checked as given: a box outside the image is an error);
- ``roi``: 3D Slicer's ROI/BBox prompt, ``[i0, i1, j0, j1, k0, k1]`` in the image's IJK (clipped to the image);
- ``foreground``: points ``[[i, j, k], ...]`` (Slicer's and OHIF's clicks): two or more give their bounding box,
  one gives a square of ``2 * point_box_half_size + 1`` voxels around it on its slice (clipped to the image).

An uploaded ``label`` file (rater masks) gives per-slice boxes from the raters' union instead, as the bundles'
``--label`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import Transform

from ambisam.errors import InputError

__all__ = ["BoxPromptFromRequestd", "box_from_request", "image_spatial_shape"]

BOX_FORMAT = "[i_min, j_min, k_min, i_max, j_max, k_max]"


def image_spatial_shape(path: Any) -> tuple[int, ...] | None:
    """The first three dimensions of an image file nibabel can read (header only), else ``None``."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    try:
        import nibabel as nib

        return tuple(int(s) for s in nib.load(os.fspath(path)).shape[:3])
    except Exception:  # noqa: BLE001 - not a format nibabel reads: the bundle's LoadBoxd checks the box later
        return None


def _numbers(value: Any, name: str, image: Any) -> np.ndarray:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(image, f"'{name}' prompt is not a JSON list: {value!r}") from None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(image, f"'{name}' prompt must be numbers, got {value!r}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise InputError(image, f"'{name}' prompt must be finite numbers, got {value!r}")
    return arr


def _clip(box: list[int], shape: Sequence[int] | None) -> list[int]:
    if shape is None:
        return box
    lo = [min(max(box[a], 0), shape[a] - 1) for a in range(3)]
    hi = [min(max(box[a + 3], 0), shape[a] - 1) for a in range(3)]
    return lo + hi


def box_from_request(request: Mapping, image: Any = None, point_box_half_size: int = 10) -> tuple[list[int], str] | None:
    """The 3D box a client asked for, and the request key it came from.

    Args:
        request: the infer request (with the client's params merged in, as MONAI Label does).
        image: the image file (named in errors; its header gives the shape that ROIs and points are clipped to).
        point_box_half_size: half the side of the square put around a single foreground point.

    Returns:
        ``(box, source)`` with ``box`` = 6 ints ``[i_min, j_min, k_min, i_max, j_max, k_max]`` and ``source`` one of
        ``"box"``, ``"roi"``, ``"foreground"``; or ``None`` when the request has no prompt.

    Raises:
        InputError: a prompt that is not of the documented form (naming the image and the prompt).
    """
    if request.get("box") not in (None, "", []):
        arr = _numbers(request["box"], "box", image).reshape(-1)
        if arr.size != 6:
            raise InputError(image, f"'box' prompt must be 6 numbers {BOX_FORMAT}, got {arr.size}")
        return [int(round(v)) for v in arr], "box"
    if request.get("roi") not in (None, "", []):
        arr = _numbers(request["roi"], "roi", image).reshape(-1)
        if arr.size != 6:
            raise InputError(image, f"'roi' prompt must be 6 numbers [i0, i1, j0, j1, k0, k1], got {arr.size}")
        pairs = np.sort(np.round(arr).astype(int).reshape(3, 2), axis=1)
        return _clip([*pairs[:, 0].tolist(), *pairs[:, 1].tolist()], image_spatial_shape(image)), "roi"
    if request.get("foreground") not in (None, "", []):
        points = _numbers(request["foreground"], "foreground", image)
        if points.ndim != 2 or points.shape[1] != 3:
            raise InputError(image, f"'foreground' prompt must be points [[i, j, k], ...], got shape {points.shape}")
        points = np.round(points).astype(int)
        lo, hi = points.min(axis=0), points.max(axis=0)
        if len(points) == 1:
            half = int(point_box_half_size)
            lo = lo - np.array([half, half, 0])
            hi = hi + np.array([half, half, 0])
        return _clip([*lo.tolist(), *hi.tolist()], image_spatial_shape(image)), "foreground"
    return None


class BoxPromptFromRequestd(Transform):
    """First pre-transform of every infer request: the client's prompt becomes the bundle's ``box`` item.

    Puts the 3D box (:func:`box_from_request`) under ``box_key`` for the bundle's ``LoadBoxd``, keeps ``label``
    only when it is an uploaded mask file (3D Slicer sends the segment's name there), and records what prompted
    the run under ``prompt_key`` for the result JSON.

    Args:
        needs_box: whether the bundle's method takes a box (prompt-free methods ignore any prompt).
        image_key: the image path's key.
        box_key: the bundle's box key.
        label_key: the bundle's rater-mask key.
        prompt_key: where the prompt actually used is recorded.
        point_box_half_size: see :func:`box_from_request`.

    Raises:
        InputError: (from ``__call__``) a malformed prompt, or none at all for a method that needs one.
    """

    def __init__(
        self,
        needs_box: bool = True,
        image_key: str = "image",
        box_key: str = "box",
        label_key: str = "label",
        prompt_key: str = "prompt",
        point_box_half_size: int = 10,
    ) -> None:
        self.needs_box = needs_box
        self.image_key = image_key
        self.box_key = box_key
        self.label_key = label_key
        self.prompt_key = prompt_key
        self.point_box_half_size = point_box_half_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key)
        labels = d.pop(self.label_key, None)
        label_files = [labels] if isinstance(labels, (str, os.PathLike)) else labels
        if isinstance(label_files, (list, tuple)) and label_files and all(
            isinstance(p, (str, os.PathLike)) and os.path.isfile(p) for p in label_files
        ):
            d[self.label_key] = [os.fspath(p) for p in label_files]
        found = box_from_request(d, image, self.point_box_half_size)
        d.pop(self.box_key, None)
        if not self.needs_box:
            d[self.prompt_key] = {"source": "none (the method takes no prompt)"}
            return d
        if found is not None:
            d[self.box_key], source = found
            d[self.prompt_key] = {"source": source, "box": d[self.box_key]}
        elif self.label_key in d:
            d[self.prompt_key] = {"source": "label (boxes from the uploaded rater masks)"}
        else:
            raise InputError(
                image,
                f"no box prompt: send params {{\"box\": {BOX_FORMAT}}} (voxel indices), a 3D Slicer ROI, "
                "or foreground points",
            )
        return d
