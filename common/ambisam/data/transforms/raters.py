"""Loading a case's rater masks in the datalist's rater order, with raters who did not read the case, and
reordering them.

A datalist ``label`` entry ``null`` (``None`` after :func:`~ambisam.data.load_datalist`) is a rater who did not
read the case: that is not the same as an all-zero mask ("read it and saw nothing"). :class:`LoadRatersd` loads the
files that are there with MONAI's own ``LoadImaged`` (stacked as channels, as always), puts a zero channel where a
rater did not read the case, and says which channels are real in ``rater_valid``. :class:`RankRatersByAread`
replaces the datalist's rater identity by the area rank (ProSeg's LIDC convention), :class:`SelectReadRatersd`
drops the raters who did not read the case.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

from ambisam.data.transforms._utils import _as_tensor
from ambisam.errors import InputError

__all__ = ["LoadRatersd", "RankRatersByAread", "SelectReadRatersd"]


class LoadRatersd(LoadImaged):
    """``LoadImaged`` for rater masks: ``None`` entries (not read) become zero channels, and ``rater_valid`` says
    which channels were read.

    A label with no ``None`` entry is loaded exactly as ``LoadImaged(keys, ensure_channel_first=True)`` loads it
    (one file per rater stacked as channels, or one multi-channel file) and gets ``rater_valid`` all ones. A label
    already loaded (a tensor or array ``(K, ...)``) is kept and gets ``rater_valid`` all ones unless the item has
    one.

    Args:
        keys: key(s) of the rater file lists.
        valid_key: output key of the per-rater flags.
        ensure_channel_first: as ``LoadImaged`` (default ``True`` here: the raters are the channels).
        allow_missing_keys: do not fail when the label is absent (inference).
        kwargs: any other ``LoadImaged`` argument (``reader``, ``dtype``, ``image_only``, ...).

    Returns:
        (from ``__call__``) the dict with ``label (K, H, W, D)`` (a MetaTensor with the loaded files' metadata; zero
        channels where not read) and ``rater_valid``: ``float32 (K,)``, 1 = the rater read the case, 0 = not.

    Raises:
        InputError: (from ``__call__``) every entry is ``None``, or, with ``None`` entries, the present files do not
            hold one rater mask each (naming the first file).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        valid_key: str = "rater_valid",
        ensure_channel_first: bool = True,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            keys, ensure_channel_first=ensure_channel_first, allow_missing_keys=allow_missing_keys, **kwargs
        )
        self.valid_key = valid_key

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, (str, os.PathLike, list, tuple)):  # already loaded
                d.setdefault(self.valid_key, torch.ones(int(value.shape[0]), dtype=torch.float32))
                continue
            entries = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            present = [r for r, p in enumerate(entries) if p is not None]
            if not present:
                raise InputError(None, f"'{key}': every rater entry is None: no rater read this case")
            if len(present) == len(entries):
                d.update(super().__call__({key: value}, reader))
                d[self.valid_key] = torch.ones(int(d[key].shape[0]), dtype=torch.float32)
                continue
            d.update(super().__call__({key: [entries[r] for r in present]}, reader))
            loaded = d[key]
            if int(loaded.shape[0]) != len(present):
                raise InputError(
                    entries[present[0]],
                    f"the {len(present)} rater files of this case hold {int(loaded.shape[0])} channels; where a rater "
                    "entry is null each file must hold one rater's mask",
                )
            plain = loaded.as_tensor() if isinstance(loaded, MetaTensor) else torch.as_tensor(loaded)
            full = torch.zeros((len(entries), *plain.shape[1:]), dtype=plain.dtype)
            full[present] = plain
            if isinstance(loaded, MetaTensor):
                full = MetaTensor(full, meta=loaded.meta, applied_operations=loaded.applied_operations)
            d[key] = full
            valid = torch.zeros(len(entries), dtype=torch.float32)
            valid[present] = 1.0
            d[self.valid_key] = valid
        return d


class SelectReadRatersd(MapTransform):
    """Keep only the rater channels of raters who read the case, so that a metric compares the samples with the
    raters who drew something or saw nothing, never with a rater who did not look (for the evaluation's
    post-processing, one case at a time).

    Args:
        keys: the rater masks ``(K, ...)`` (default ``label``).
        valid_key: the flags ``rater_valid (K,)``; an item without them keeps every channel.
        allow_missing_keys: do not fail when a key is absent.

    Returns:
        (from ``__call__``) the dict with ``label (K', ...)``, ``K'`` the raters who read the case.
    """

    def __init__(self, keys: KeysCollection = "label", valid_key: str = "rater_valid", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.valid_key = valid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        valid = d.get(self.valid_key)
        if valid is None:
            return d
        read = torch.as_tensor(valid).reshape(-1) > 0
        if bool(read.all()):
            return d
        for key in self.key_iterator(d):
            if d[key].shape[0] != read.numel():
                raise ValueError(f"'{key}' has {d[key].shape[0]} channels for {read.numel()} rater flags")
            d[key] = d[key][torch.nonzero(read).flatten().tolist()]
        return d


class RankRatersByAread(MapTransform):
    """Reorder the rater channels by ascending foreground area: "rater ``r``" becomes the ``r``-th smallest mask of
    the item (the LIDC convention of ProSeg's reference code), instead of the datalist's rater order.

    The area of a rater is the number of non-zero voxels of its channel over the whole item (a 2D image, or the
    whole volume: put this before any slice selection so that a rater keeps one identity across a volume's
    slices). Ties keep the stored order (a stable sort); raters who did not read the case (``rater_valid`` 0) go
    last, in their stored order. ``rater_valid`` is reordered the same way, and the stored channel of each new
    channel is recorded.

    Args:
        keys: the keys whose rater channels are reordered, each ``(K, *spatial)`` (default ``label``).
        label_key: the rater masks ``(K, H, W[, D])`` whose areas decide the order (default ``label``).
        valid_key: the per-rater flags ``rater_valid (K,)``; an item without them counts every rater as read.
        rater_order_key: output key of the order.
        allow_missing_keys: do not fail when a key is absent; an item without ``label_key`` passes unchanged
            (inference without a label).

    Returns:
        (from ``__call__``) the dict with each of ``keys`` reordered (a MetaTensor keeps its metadata),
        ``rater_valid (K,)`` reordered where present, and ``rater_order``: ``int64 (K,)``, the stored (datalist)
        channel of each new channel (new channel ``r`` was channel ``rater_order[r]``).

    Raises:
        ValueError: (from ``__call__``) a key or ``rater_valid`` does not have one entry per rater of
            ``label_key``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        label_key: str = "label",
        valid_key: str = "rater_valid",
        rater_order_key: str = "rater_order",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.valid_key = valid_key
        self.rater_order_key = rater_order_key

    def order(self, label: Any, valid: Any = None) -> torch.Tensor:
        """The new order of the rater channels of ``label (K, ...)`` given the flags ``valid (K,)`` (or ``None``).

        Returns:
            ``int64 (K,)``: the stored channel of each new channel.
        """
        masks = _as_tensor(label)
        areas = torch.count_nonzero(masks.reshape(masks.shape[0], -1), dim=1).cpu().numpy()
        read = np.ones(len(areas), dtype=bool) if valid is None else _as_tensor(valid).reshape(-1).cpu().numpy() > 0
        if len(read) != len(areas):
            raise ValueError(
                f"'{self.label_key}' has {len(areas)} rater channels for {len(read)} '{self.valid_key}' flags"
            )
        return torch.as_tensor(np.lexsort((areas, ~read)), dtype=torch.int64)  # lexsort is stable

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d and self.allow_missing_keys:
            return d
        valid = d.get(self.valid_key)
        order = self.order(d[self.label_key], valid)
        for key in self.key_iterator(d):
            if d[key].shape[0] != order.numel():
                raise ValueError(f"'{key}' has {d[key].shape[0]} channels for {order.numel()} raters")
            d[key] = d[key][order.tolist()]
        if valid is not None:
            d[self.valid_key] = torch.as_tensor(valid).reshape(-1)[order]
        d[self.rater_order_key] = order
        return d
