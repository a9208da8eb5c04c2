"""Multi-label rater maps (one integer value per structure, the datalist's ``labels`` class map) as binary
per-structure rater masks."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ambisam.data.conventions import check_class_map
from ambisam.data.transforms._utils import _as_tensor
from ambisam.errors import InputError

__all__ = ["StructureMasksd"]


class StructureMasksd(MapTransform):
    """Turn integer rater maps into binary per-structure rater masks, stacked structure-major.

    Channel ``s * K + r`` of the output is rater ``r``'s mask of structure ``structures[s]``, so a K-rater case with
    S structures looks like S K-rater binary cases one after the other (``rater_valid (K,)`` still applies to each
    block of K channels). Values not in ``structures`` (background 0, structures left out) become 0.

    Args:
        keys: key(s) of the integer rater maps ``(K, *spatial)``, e.g. ``(K, H, W, D)``.
        class_map: ``{structure name: label value}`` (the datalist's ``labels``, see
            :func:`~ambisam.data.datalist_class_map`).
        structures: the structures to keep, in this order; ``None``: all, in the class map's order.
        structures_key: output key of the structure names (list of S str).
        allow_missing_keys: do not fail when a key is absent.

    Returns:
        (from ``__call__``) the dict with each key ``(S * K, *spatial)`` 0/1 (the input's dtype and MetaTensor
        metadata) and ``structures`` = the S names.

    Raises:
        InputError: (from ``__init__``) a malformed class map, or a structure the class map does not have (the
            message lists the known names).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        class_map: Mapping[str, int] | None = None,
        structures: Sequence[str] | str | None = None,
        structures_key: str = "structures",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_map = check_class_map(class_map)
        if structures is None:
            names = list(self.class_map)
        else:
            names = [structures] if isinstance(structures, str) else list(structures)
        unknown = [s for s in names if s not in self.class_map]
        if unknown or not names:
            raise InputError(None, f"unknown structure(s) {unknown}; the class map has {list(self.class_map)}")
        self.structures = names
        self.structures_key = structures_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            lab = _as_tensor(label)
            values = torch.tensor([self.class_map[s] for s in self.structures], dtype=lab.dtype)
            shape = (1, len(values)) + (1,) * (lab.ndim - 1)
            masks = (lab.unsqueeze(1) == values.reshape(shape)).to(lab.dtype)  # (K, S, ...)
            out = masks.transpose(0, 1).reshape(len(values) * lab.shape[0], *lab.shape[1:])
            if isinstance(label, MetaTensor):
                out = MetaTensor(out, meta=deepcopy(label.meta), applied_operations=deepcopy(label.applied_operations))
            elif isinstance(label, np.ndarray):
                out = out.numpy()
            d[key] = out
            d[self.structures_key] = list(self.structures)
        return d
