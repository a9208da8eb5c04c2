"""The embedding cache's memory against the number of slices it has seen: peak RSS, one fresh process a run.

A fake backbone whose encoder returns a random LiteMedSAM-shaped embedding (``(256, 64, 64)``, 4 MiB in float32)
at once pushes ``N`` distinct slices through an :class:`~ambisam.sam.EmbeddingCache`; with ``max_memory_mb`` the
peak resident memory stays flat as ``N`` grows, without it it grows by 4 MiB a slice. Each run is a fresh
process, since peak RSS (``getrusage``'s ``ru_maxrss``) only grows within one. Run as
``python -m ambisam.bench_cache``: 500 and 2000 slices under the base config's 1024 MiB bound, in memory only and
float16 on disk (read back once more), and 500 without a bound, printed as JSON (about 4 minutes on 2 CPU cores;
the float16 runs write up to 4 GiB to the temporary folder).
"""

from __future__ import annotations

import json
import resource
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn

from ambisam.sam.cache import EmbeddingCache

__all__ = ["RandomEmbeddingBackbone", "cache_peak_rss", "peak_rss_by_slices"]


class RandomEmbeddingBackbone(nn.Module):
    """A backbone stand-in whose encoder costs nothing: ``encode`` returns random ``(B, C, h, w)`` float32.

    Args:
        embedding_dim: ``C``.
        embedding_size: ``(h, w)``.
    """

    name = "random"

    def __init__(self, embedding_dim: int = 256, embedding_size: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.image_encoder = nn.Identity()
        self.embedding_dim = embedding_dim
        self.embedding_size = tuple(embedding_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1|3, H, W)`` -> ``(B, embedding_dim, *embedding_size)`` random values."""
        return torch.randn(images.shape[0], self.embedding_dim, *self.embedding_size)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cache_peak_rss(
    num_slices: int,
    max_memory_mb: float | None = 1024,
    storage_dtype: str = "float32",
    on_disk: bool = False,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Push ``num_slices`` distinct slices through one cache in this process and report its memory.

    Args:
        num_slices: distinct ``(1, 8, 8)`` images encoded, ``batch_size`` a call.
        max_memory_mb: the cache's RAM bound; ``None`` for none.
        storage_dtype: the cache's storage dtype.
        on_disk: give the cache a temporary ``cache_dir`` (removed afterwards) and read every slice back once
            more at the end, from disk where memory dropped it.
        batch_size: slices a call.

    Returns:
        ``num_slices``, ``max_memory_mb``, ``storage_dtype``, ``on_disk``, ``held_mib`` (what the cache holds at
        the end), ``peak_rss_before_mib`` (torch imported, the backbone built) and ``peak_rss_mib``.
    """
    backbone = RandomEmbeddingBackbone()
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as folder:
        cache = EmbeddingCache(backbone, cache_dir=folder if on_disk else None, max_memory_mb=max_memory_mb,
                               storage_dtype=storage_dtype, batch_size=batch_size)
        before = _peak_rss_mib()
        images = torch.arange(num_slices, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
        for start in range(0, num_slices, batch_size):
            cache(images[start : start + batch_size])
        if on_disk:
            for start in range(0, num_slices, batch_size):
                cache(images[start : start + batch_size])
        return {"num_slices": num_slices, "max_memory_mb": max_memory_mb, "storage_dtype": storage_dtype,
                "on_disk": on_disk, "held_mib": cache.memory_bytes / 2**20, "peak_rss_before_mib": before,
                "peak_rss_mib": _peak_rss_mib()}


def peak_rss_by_slices(counts: tuple[int, ...] = (500, 2000), **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`cache_peak_rss` for each count, each in a fresh (spawned) process on one thread.

    Args:
        counts: the ``num_slices`` of the runs.
        kwargs: the other arguments of :func:`cache_peak_rss`.

    Returns:
        One result a count, in order.
    """
    results = []
    for count in counts:
        with ProcessPoolExecutor(1, get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results.append(pool.submit(cache_peak_rss, count, **kwargs).result())
    return results


if __name__ == "__main__":
    runs = [
        *peak_rss_by_slices((500, 2000)),
        *peak_rss_by_slices((500, 2000), storage_dtype="float16", on_disk=True),
        *peak_rss_by_slices((500,), max_memory_mb=None),
    ]
    print(json.dumps(runs, indent=2))
