"""A MONAI ``CacheDataset`` whose cache is bounded in bytes, so that a training process's memory does not grow
with the number of volumes in the datalist.

MONAI's ``CacheDataset`` with ``cache_rate=1.0`` holds every item's deterministic pre-processing (the loaded
volume and its raters' masks, about 4.4 MB for a 96 x 96 x 24 CT with 4 raters) for the whole run: on a data set
of 8,000 slices that alone is over a GiB. :class:`BoundedCacheDataset` caches the first items up to
``max_memory_mb`` (their count estimated from the first item's bytes) and loads the others from disk each time
they are drawn, as MONAI's ``Dataset`` does; with no bound it is ``CacheDataset`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset

__all__ = ["BoundedCacheDataset", "item_bytes"]

_MIB = 2**20


def item_bytes(item: Any) -> int:
    """The bytes of the arrays in ``item`` (tensors and NumPy arrays, in dicts, lists and tuples, nested).

    Args:
        item: a data item, e.g. a dict of tensors.

    Returns:
        The sum of their ``nbytes``; 0 for an item without arrays.
    """
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, np.ndarray):
        return int(item.nbytes)
    if isinstance(item, Mapping):
        return sum(item_bytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(item_bytes(v) for v in item)
    return 0


class BoundedCacheDataset(CacheDataset):
    """``CacheDataset`` holding at most ``max_memory_mb`` MiB of cached items.

    The number of cached items is ``max_memory_mb`` over the bytes of the first item's cached pre-processing
    (items of one data set are alike; a larger one later can exceed the bound by its difference), and never more
    than ``cache_num`` or ``cache_rate`` allow; the items beyond it run their whole transform each time.

    Args:
        data: the items (e.g. a datalist split).
        transform: a ``Compose``; its transforms up to the first random one are cached.
        max_memory_mb: the bound in MiB (``2**20`` bytes); ``None`` for none (``CacheDataset``).
        kwargs: the other arguments of ``monai.data.CacheDataset`` (``cache_num``, ``cache_rate``,
            ``num_workers``, ...).

    Attributes:
        item_bytes: the first item's cached bytes (``None`` without a bound or items).

    Raises:
        ValueError: a negative ``max_memory_mb``.
    """

    def __init__(
        self,
        data: Sequence,
        transform: Sequence[Callable] | Callable | None = None,
        max_memory_mb: float | None = None,
        **kwargs: Any,
    ) -> None:
        if max_memory_mb is not None and max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be >= 0 or None, not {max_memory_mb}")
        self.max_memory_mb = max_memory_mb
        self.item_bytes: int | None = None
        self._requested_num: int | None = None
        super().__init__(data, transform, **kwargs)

    def set_data(self, data: Sequence) -> None:
        """Set the items and cache the first ones up to the bound (see the class docstring)."""
        if self._requested_num is None:
            self._requested_num = int(self.set_num)
        self.set_num = self._requested_num
        if self.max_memory_mb is not None and len(data):
            self.data = data
            self.item_bytes = item_bytes(self._load_cache_item(0))
            fit = int(self.max_memory_mb * _MIB) // max(1, self.item_bytes)
            self.set_num = min(self._requested_num, fit)
        super().set_data(data)
