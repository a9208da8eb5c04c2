"""What a datalist declares about its data as a whole: the rater table (``raters``), the class map of multi-label
volumes (``labels``) and the intensity convention (``intensity``); the three optional top-level blocks of
``docs/datalist.md``.

Each block is checked here, once, by the function that reads it; :func:`~ambisam.data.load_datalist` runs the same
checks before it returns any item, and :func:`~ambisam.data.write_datalist` before it writes one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ambisam.errors import InputError

__all__ = [
    "IntensityConvention",
    "DEFAULT_INTENSITY",
    "MODALITIES",
    "read_datalist_file",
    "check_raters",
    "check_class_map",
    "check_intensity",
    "datalist_raters",
    "datalist_class_map",
    "datalist_intensity",
]

logger = logging.getLogger("ambisam.data")

MODALITIES: tuple[str, ...] = ("ct", "mri", "none")
"""The intensity conventions :func:`~ambisam.data.intensity_transform` knows."""


class IntensityConvention(NamedTuple):
    """How a data set's intensities map to ``[0, 1]`` (the datalist's ``intensity`` block).

    Attributes:
        modality: ``"ct"`` (a fixed Hounsfield window), ``"mri"`` (per-image percentiles) or ``"none"`` (a fixed
            value range, or per-image min-max without one).
        window: ``(low, high)`` in HU for ``"ct"``, else ``None``.
        value_range: ``(low, high)`` for ``"none"`` where the data set states one (e.g. ``(0, 255)`` for 8-bit
            pictures), else ``None``.
        source: ``"datalist"`` when read from the datalist, ``"default"`` when assumed.
    """

    modality: str
    window: tuple[float, float] | None = None
    value_range: tuple[float, float] | None = None
    source: str = "datalist"

    def as_block(self) -> dict[str, Any]:
        """The convention as the datalist's ``intensity`` block (what :func:`check_intensity` reads back)."""
        block: dict[str, Any] = {"modality": self.modality}
        if self.window is not None:
            block["window"] = [_plain(v) for v in self.window]
        if self.value_range is not None:
            block["range"] = [_plain(v) for v in self.value_range]
        return block


DEFAULT_INTENSITY = IntensityConvention("ct", (-1000.0, 400.0), None, "default")
"""What a datalist without an ``intensity`` block is assumed to hold: CT in HU, the lung window."""


def _plain(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def read_datalist_file(path: str | os.PathLike) -> dict:
    """The parsed JSON object of a datalist file.

    Raises:
        InputError: the file is missing, not readable JSON, or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "datalist file not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a readable JSON datalist ({e})") from e
    if not isinstance(raw, dict):
        raise InputError(path, "a datalist must be a JSON object with the lists 'training', 'validation', 'test'")
    return raw


def _pair(value: Any, what: str, where: Any) -> tuple[float, float]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if not ok or not value[0] < value[1]:
        raise InputError(where, f"'intensity': '{what}' must be two numbers [low, high] with low < high, got {value!r}")
    return float(value[0]), float(value[1])


def check_intensity(block: Any, where: Any = None) -> IntensityConvention:
    """Read an ``intensity`` block.

    Args:
        block: ``{"modality": "ct", "window": [low, high]}``, ``{"modality": "mri"}``, or ``{"modality": "none"}``
            with an optional ``"range": [low, high]``.
        where: the datalist, named in errors.

    Returns:
        The :class:`IntensityConvention` (``source="datalist"``).

    Raises:
        InputError: naming ``where``: not an object, an unknown modality or key, a CT block without its window,
            or a window/range that is not two finite numbers ``low < high``.
    """
    if not isinstance(block, Mapping) or "modality" not in block:
        raise InputError(
            where, f"'intensity' must be an object with a 'modality' ({', '.join(MODALITIES)}), got {block!r}"
        )
    modality = block["modality"]
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise InputError(where, f"'intensity': unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    modality = modality.lower()
    allowed = {"ct": {"modality", "window"}, "mri": {"modality"}, "none": {"modality", "range"}}[modality]
    unknown = sorted(set(map(str, block)) - allowed)
    if unknown:
        raise InputError(
            where, f"'intensity': {unknown} do not apply to modality '{modality}' (it takes {sorted(allowed)})"
        )
    if modality == "ct":
        if "window" not in block:
            raise InputError(
                where, "'intensity': modality 'ct' needs its 'window': [low, high] in HU, e.g. [-1000, 400]"
            )
        return IntensityConvention("ct", _pair(block["window"], "window", where), None, "datalist")
    if modality == "none" and "range" in block:
        return IntensityConvention("none", None, _pair(block["range"], "range", where), "datalist")
    return IntensityConvention(modality, None, None, "datalist")


def check_class_map(block: Any, where: Any = None) -> dict[str, int]:
    """Read a ``labels`` block: the integer value of each structure in the rater label files.

    Args:
        block: ``{"liver": 1, "kidney_right": 2, ...}``; background 0 is implicit.
        where: the datalist, named in errors.

    Returns:
        The class map as a plain dict, in the order written.

    Raises:
        InputError: naming ``where``: not a non-empty object, an empty name, a value that is not a positive
            integer, or two names with one value.
    """
    if not isinstance(block, Mapping) or not block:
        raise InputError(where, f"'labels' must be a non-empty object {{structure name: value}}, got {block!r}")
    seen: dict[int, str] = {}
    for name, value in block.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError(where, f"'labels': structure names must be non-empty, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(
                where, f"'labels': {name!r} must map to a positive integer (0 is background), got {value!r}"
            )
        if value in seen:
            raise InputError(where, f"'labels': {name!r} and {seen[value]!r} share the value {value}")
        seen[value] = name
    return dict(block)


def check_raters(block: Any, where: Any = None) -> tuple[str, ...]:
    """Read a ``raters`` block: the names of the data set's raters, in the order of the label channels.

    Raises:
        InputError: naming ``where``: not a non-empty list of unique non-empty strings.
    """
    if (
        not isinstance(block, (list, tuple))
        or not block
        or not all(isinstance(r, str) and r.strip() for r in block)
    ):
        raise InputError(where, f"'raters' must be a non-empty list of rater names, got {block!r}")
    repeated = sorted({r for r in block if list(block).count(r) > 1})
    if repeated:
        raise InputError(where, f"'raters' names {repeated} more than once")
    return tuple(block)


def _positional_raters(raw: Mapping) -> tuple[str, ...]:
    """``"0" .. "K-1"`` with K the longest ``label`` list of any list in the datalist."""
    k = 0
    for items in raw.values():
        if isinstance(items, list):
            for item in items:
                label = item.get("label") if isinstance(item, Mapping) else None
                k = max(k, len(label) if isinstance(label, list) else int(label is not None))
    return tuple(str(r) for r in range(k))


def datalist_raters(path: str | os.PathLike, *, raw: Mapping | None = None) -> tuple[str, ...]:
    """The rater table of a datalist: the label channel ``r`` after loading is rater ``names[r]``.

    Args:
        path: the datalist JSON file.
        raw: its parsed content, where already read.

    Returns:
        The top-level ``raters``, or ``("0", .., "K-1")`` positional names where the datalist has none (``K`` the
        longest ``label`` list in the file).

    Raises:
        InputError: an unreadable datalist or a malformed ``raters`` block, naming the datalist.
    """
    raw = read_datalist_file(path) if raw is None else raw
    if "raters" in raw:
        return check_raters(raw["raters"], path)
    return _positional_raters(raw)


def datalist_class_map(path: str | os.PathLike) -> dict[str, int] | None:
    """The class map of a multi-label datalist (its ``labels`` block).

    Args:
        path: the datalist JSON file.

    Returns:
        ``{structure name: label value}`` or ``None`` where the label files are binary (no ``labels`` block).

    Raises:
        InputError: an unreadable datalist or a malformed ``labels`` block, naming the datalist.
    """
    raw = read_datalist_file(path)
    return check_class_map(raw["labels"], path) if "labels" in raw else None


def datalist_intensity(path: str | os.PathLike | None) -> IntensityConvention:
    """The intensity convention a datalist declares (its ``intensity`` block).

    A datalist without the block is assumed to hold CT in HU (:data:`DEFAULT_INTENSITY`, the lung window
    ``[-1000, 400]``); one warning line on the ``ambisam.data`` logger says so. Without a datalist (``None``: an
    image given on its own) the default applies silently: the bundle's ``modality`` / ``window`` say what is used.

    Args:
        path: the datalist JSON file, or ``None``.

    Returns:
        The :class:`IntensityConvention`; ``source`` is ``"datalist"`` or ``"default"``.

    Raises:
        InputError: an unreadable datalist or a malformed ``intensity`` block, naming the datalist.
    """
    if path is None:
        return DEFAULT_INTENSITY
    raw = read_datalist_file(path)
    if "intensity" in raw:
        return check_intensity(raw["intensity"], path)
    logger.warning(
        "%s: no 'intensity' block; assuming CT in HU with the window [-1000, 400] (see docs/datalist.md)", path
    )
    return DEFAULT_INTENSITY
