"""An embedding cache: each (image, slice) is encoded once and reused by training, evaluation and sampling.

A frozen image encoder is the expensive part of every method here (about 1.2 s per 256x256 slice for
LiteMedSAM on two CPU threads, against about 55 ms for the decoder), so the cache turns a training epoch from
encoder time into decoder time. Entries are keyed by the slice's content and the encoder's weights, so a
changed image or a different (or fine-tuned) encoder never hits a stale entry. Entries live in memory and,
with ``cache_dir``, on disk (``<key>.pt``, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch

from ambisam.io import atomic_path
from ambisam.sam.backbone import SamBackbone

__all__ = ["EmbeddingCache", "encoder_fingerprint"]

logger = logging.getLogger(__name__)


def encoder_fingerprint(backbone: SamBackbone) -> str:
    """A short hash of the backbone's name and image-encoder weights (LoRA adapters included)."""
    digest = hashlib.sha1(backbone.name.encode())
    for name, tensor in sorted(backbone.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class EmbeddingCache:
    """Encode images once; serve their embeddings from memory or disk afterwards.

    Args:
        backbone: the backbone whose (frozen) encoder produces the embeddings.
        cache_dir: folder for on-disk entries, shared between runs; ``None`` keeps entries in memory only.
        max_items: most entries kept in memory (least recently used dropped first); ``None`` for no limit.
        batch_size: images encoded per encoder call on a miss.

    Attributes:
        hits: lookups served from memory or disk.
        misses: lookups that ran the encoder.
    """

    def __init__(
        self,
        backbone: SamBackbone,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        batch_size: int = 4,
    ) -> None:
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items = max_items
        self.batch_size = batch_size
        self.fingerprint = encoder_fingerprint(backbone)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, image: torch.Tensor) -> str:
        """The cache key of one image ``(1|3, H, W)``: its shape and bytes plus the encoder fingerprint."""
        data = image.detach().cpu().float().contiguous()
        digest = hashlib.sha1(self.fingerprint.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def _remember(self, key: str, embedding: torch.Tensor) -> None:
        self._memory[key] = embedding
        self._memory.move_to_end(key)
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.cache_dir is not None:
            path = self.cache_dir / f"{key}.pt"
            if path.is_file():
                embedding = torch.load(path, map_location="cpu", weights_only=True)
                self._remember(key, embedding)
                return embedding
        return None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of images, encoding only those not seen before.

        Args:
            images: ``(B, 1|3, H, W)`` intensities in ``[0, 1]``.

        Returns:
            ``(B, C, h, w)`` on the device of ``images``.
        """
        keys = [self.key(img) for img in images]
        found = [self._lookup(k) for k in keys]
        todo = [i for i, e in enumerate(found) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            embeddings = self.backbone.encode(images[idx]).cpu()
            for i, emb in zip(idx, embeddings):
                emb = emb.clone()
                found[i] = emb
                self._remember(keys[i], emb)
                if self.cache_dir is not None:
                    with atomic_path(self.cache_dir / f"{keys[i]}.pt") as tmp:
                        torch.save(emb, tmp)
        return torch.stack(found).to(images.device)

    def log_stats(self) -> str:
        """Log and return the hit/miss count."""
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        msg = f"embedding cache: {self.hits} hits, {self.misses} misses ({rate:.0%} hit rate), {len(self._memory)} in memory"
        logger.info(msg)
        return msg
