"""Private helpers shared by the transforms: tensors, file names, shapes, box jitter."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor


def _filename(x: Any, fallback: Any = None) -> Any:
    """The file ``x`` was loaded from (``meta["filename_or_obj"]`` of a MetaTensor), else ``fallback``."""
    if isinstance(x, MetaTensor):
        name = x.meta.get("filename_or_obj")
        if name:
            return name
    return fallback


def _read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The content of a JSON prompt file; an :class:`~ambisam.errors.InputError` naming it when it is missing or
    not readable JSON (``what`` names the kind of file in the message)."""
    from ambisam.errors import InputError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, f"{what} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"{what} is not readable JSON ({e}).") from None


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain torch tensor view of an array-like (MetaTensor metadata dropped)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


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
