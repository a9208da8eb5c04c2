"""The one rule that names a case: :func:`case_id`.

Output files, embedding caches, metric reports and benchmark tables all key a case by this id, so every part of
ambisam derives it the same way: the item's ``id`` where it has one, else its image file's name with one known
image extension removed (``a.b.nii.gz -> a.b``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from monai.data import MetaTensor

__all__ = ["IMAGE_EXTENSIONS", "case_id", "strip_image_extension"]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".nii",
    ".nrrd",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".npy",
    ".npz",
    ".dcm",
)
"""The image extensions :func:`case_id` removes, case-insensitively; each also with a ``.gz`` after it
(``.nii.gz``, ``.nrrd.gz``, ...)."""


def strip_image_extension(name: str) -> str:
    """A file name without its one known image extension (:data:`IMAGE_EXTENSIONS`, optionally gzipped).

    Args:
        name: a file name or path; only its last component is used.

    Returns:
        The base name without the extension: ``"a.b.nii.gz" -> "a.b"``, ``"x.PNG" -> "x"``; a name without a known
        extension is returned whole (``"scan.v2" -> "scan.v2"``, ``"notes.gz" -> "notes.gz"``).
    """
    base = os.path.basename(os.fspath(name).rstrip("/\\"))
    lower = base.lower()
    stem_len = len(base) - 3 if lower.endswith(".gz") else len(base)
    for ext in IMAGE_EXTENSIONS:
        if lower[:stem_len].endswith(ext) and stem_len > len(ext):
            return base[: stem_len - len(ext)]
    return base


def _file_of(x: Any) -> Any:
    """The file name of a MetaTensor (the first one where several files were stacked), else ``x`` itself."""
    if isinstance(x, MetaTensor):
        x = x.meta.get("filename_or_obj")
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    return x


def case_id(item: Any) -> str:
    """The id of a case.

    Args:
        item: a data item (dict: its ``id``; else its ``image``, a path or a loaded MetaTensor), a MetaTensor (its
            ``meta["filename_or_obj"]``) or a path.

    Returns:
        ``str(item["id"])`` where the item has an ``id``; else the image's file name without its one known image
        extension (see :func:`strip_image_extension`): ``"/data/a.b.nii.gz" -> "a.b"``.

    Raises:
        ValueError: the item has neither an ``id`` nor an image path or file name to derive one from.
    """
    if isinstance(item, Mapping):
        if item.get("id") is not None:
            return str(item["id"])
        source = _file_of(item.get("image"))
    else:
        source = _file_of(item)
    if isinstance(source, (str, os.PathLike)) and os.fspath(source):
        return strip_image_extension(os.fspath(source))
    raise ValueError(f"cannot derive a case id: no 'id' and no image file name in {type(item).__name__} {item!r:.200}")
