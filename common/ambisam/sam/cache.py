"""An embedding cache: each (image, slice) is encoded once and reused by training, evaluation and sampling.

A frozen image encoder is the expensive part of every method here (about 1.2 s per 256x256 slice for
LiteMedSAM on two CPU threads, against about 55 ms for the decoder), so the cache turns a training epoch from
encoder time into decoder time. Entries are keyed by the slice's content and the encoder's weights *at lookup
time*, so a changed image, a different encoder, or one whose weights changed after the cache was made (a LoRA
step, a checkpoint loaded into it) never hits a stale entry. Hashing the weights costs tens of milliseconds,
so the cache keeps a cheap state token of the encoder (:func:`encoder_state_token`) and rehashes only when
that token changes. Entries live in memory and, with ``cache_dir``, on disk (``<key>.pt``, loaded with
``weights_only=True``); a file that does not load, or holds other than an embedding of the expected shape and
dtype, is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ambisam.io import atomic_path
from ambisam.sam.protocol import ImageBackbone

__all__ = ["EmbeddingCache", "encoder_fingerprint", "encoder_state_token"]

logger = logging.getLogger(__name__)


def encoder_state_token(encoder: nn.Module) -> tuple:
    """A cheap token that changes whenever the encoder's weights may have changed, without reading them.

    Per parameter and buffer: its name, storage address, version counter (bumped by every in-place change
    through autograd's view of the tensor: optimizer steps, ``load_state_dict``'s ``copy_``, ``mul_`` under
    ``no_grad``), dtype, device and shape. Writes through ``tensor.data`` bypass the version counter and are
    not seen; neither are writes by code holding the storage elsewhere.

    Args:
        encoder: the image encoder.

    Returns:
        A hashable tuple; equal tokens mean the weights did not change in any of the ways above.
    """
    tensors = list(encoder.named_parameters()) + list(encoder.named_buffers())
    return tuple((n, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for n, t in tensors)


def encoder_fingerprint(backbone: ImageBackbone) -> str:
    """A short hash of the backbone's name and image-encoder weights (LoRA adapters included)."""
    digest = hashlib.sha1(backbone.name.encode())
    for name, tensor in sorted(backbone.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class EmbeddingCache:
    """Encode images once; serve their embeddings from memory or disk afterwards.

    Args:
        backbone: the backbone whose encoder produces the embeddings (trainable or not: the key follows its
            weights).
        cache_dir: folder for on-disk entries, shared between runs; ``None`` keeps entries in memory only.
        max_items: most entries kept in memory (least recently used dropped first); ``None`` for no limit.
        batch_size: images encoded per encoder call on a miss.

    Attributes:
        hits: lookups served from memory or disk.
        misses: lookups that ran the encoder (a corrupt disk entry counts as a miss).
    """

    def __init__(
        self,
        backbone: ImageBackbone,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        batch_size: int = 4,
    ) -> None:
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items = max_items
        self.batch_size = batch_size
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._state_token: tuple | None = None
        self._fingerprint = ""
        self._encoded_spec: tuple[tuple[int, ...], torch.dtype] | None = None  # of the first embedding encoded
        self.hits = 0
        self.misses = 0
        self._refresh_fingerprint()  # hash the weights now, as before, not at the first lookup

    @property
    def fingerprint(self) -> str:
        """:func:`encoder_fingerprint` of the encoder's current weights.

        Rehashed only when :func:`encoder_state_token` changes; when the hash changes, the memory entries
        (all of the old weights, never served again under the new key) are dropped.
        """
        return self._refresh_fingerprint()

    def _refresh_fingerprint(self) -> str:
        token = encoder_state_token(self.backbone.image_encoder)
        if token != self._state_token:
            fingerprint = encoder_fingerprint(self.backbone)
            if fingerprint != self._fingerprint:
                self._memory.clear()
            self._state_token, self._fingerprint = token, fingerprint
        return self._fingerprint

    def key(self, image: torch.Tensor) -> str:
        """The cache key of one image ``(1|3, H, W)``: its shape and bytes plus the encoder fingerprint."""
        return self._key(image, self.fingerprint)

    @staticmethod
    def _key(image: torch.Tensor, fingerprint: str) -> str:
        data = image.detach().cpu().float().contiguous()
        digest = hashlib.sha1(fingerprint.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def _expected(self) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
        """Shape and dtype of one embedding: what the backbone says (a SAM backbone's ``embedding_dim`` and
        ``embedding_size``, its encoder's parameter dtype), else what the first embedding this cache encoded
        had, else ``None`` (not known yet)."""
        backbone = self.backbone
        encoded_shape, encoded_dtype = self._encoded_spec or (None, None)
        shape = encoded_shape
        if hasattr(backbone, "embedding_dim") and hasattr(backbone, "embedding_size"):
            shape = (int(backbone.embedding_dim), *map(int, backbone.embedding_size))
        dtype = next((p.dtype for p in backbone.image_encoder.parameters() if p.is_floating_point()), encoded_dtype)
        return shape, dtype

    def _load(self, path: Path) -> torch.Tensor | None:
        """The embedding in ``path``, or ``None`` (with a warning) when it is unreadable or not an embedding."""
        try:
            embedding = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: any load failure means recompute
            logger.warning("embedding cache: %s cannot be read (%s: %s); encoding again", path, type(e).__name__, e)
            return None
        shape, dtype = self._expected()
        if (
            not isinstance(embedding, torch.Tensor)
            or not embedding.is_floating_point()
            or (shape is not None and tuple(embedding.shape) != shape)
            or (dtype is not None and embedding.dtype != dtype)
        ):
            found = (
                f"{embedding.dtype} {tuple(embedding.shape)}" if isinstance(embedding, torch.Tensor)
                else type(embedding).__name__
            )
            logger.warning(
                "embedding cache: %s holds %s, not a %s %s embedding; encoding again", path, found, dtype, shape
            )
            return None
        return embedding

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
                embedding = self._load(path)
                if embedding is not None:
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
        fingerprint = self.fingerprint  # once per call: the weights do not change during it
        keys = [self._key(img, fingerprint) for img in images]
        found = [self._lookup(k) for k in keys]
        todo = [i for i, e in enumerate(found) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            embeddings = self.backbone.encode(images[idx]).cpu()
            if self._encoded_spec is None:
                self._encoded_spec = (tuple(embeddings.shape[1:]), embeddings.dtype)
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
