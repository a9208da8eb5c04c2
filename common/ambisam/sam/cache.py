"""An embedding cache: each (image, slice) is encoded once and reused by training, evaluation and sampling.

A frozen image encoder is the expensive part of every method here (about 1.2 s per 256x256 slice for
LiteMedSAM on two CPU threads, against about 55 ms for the decoder), so the cache turns a training epoch from
encoder time into decoder time. Entries are keyed by the slice's content, the storage dtype, the dtype the
encoder computes in (its precision: bfloat16 and float32 embeddings never mix) and the encoder's weights *at
lookup time*, so a changed image, a different encoder, or one whose weights changed after the cache was made
(a LoRA step, a checkpoint loaded into it) never hits a stale entry. Hashing the weights costs tens of
milliseconds, so the cache keeps a cheap state token of the encoder (:func:`encoder_state_token`) and rehashes
only when that token changes.

Memory is bounded: the entries held in RAM are a least-recently-used set of at most ``max_memory_mb`` (and
``max_items``); with ``cache_dir`` every entry is also on disk, so one dropped from memory is read back (a few
milliseconds) instead of encoded again. A LiteMedSAM embedding is ``(256, 64, 64)`` float32, 4 MiB; the full LIDC
crops would need tens of GiB held in memory. ``storage_dtype="float16"`` halves what memory and disk hold.

An on-disk entry ``<key>.pt`` (written under a temporary name and renamed when complete, loaded with
``weights_only=True``) is a record of its key, storage dtype, CRC-32 and embedding; a file that does not load
(truncated), names another key (copied or renamed), holds another shape or dtype, or fails its checksum is logged
and encoded again, never served.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ambisam.io import atomic_path
from ambisam.sam.protocol import ImageBackbone

__all__ = ["EmbeddingCache", "STORAGE_DTYPES", "encoder_fingerprint", "encoder_state_token"]

logger = logging.getLogger(__name__)

#: the dtypes an :class:`EmbeddingCache` stores embeddings in, by the name a config gives
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_MIB = 2**20


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
    """Encode images once; serve their embeddings from memory or disk afterwards, holding a bounded RAM.

    Memory holds the most recently used entries, at most ``max_memory_mb`` of them in bytes (and at most
    ``max_items``); the least recently used entry is dropped first. Without ``cache_dir`` a dropped entry is
    encoded again when it is next asked for; with ``cache_dir`` it is read back from its file. With
    ``max_memory_mb`` the entries live in one buffer of :attr:`capacity` entries, allocated at the first entry (its
    pages resident as they are filled), so the process's memory, not only the count of bytes, stays within the
    bound (plus the batch in flight) however many slices pass through. The bound is per cache object, that is per
    process: ``R`` ranks on a node hold up to ``R * max_memory_mb``.

    Embeddings are stored (in memory and on disk) in ``storage_dtype`` and returned in the encoder's dtype (its
    first floating-point parameter's; for an encoder without parameters, that of its first encoding), so with
    ``"float16"`` every lookup, the first one included, returns the same rounded embedding.

    Ranks and nodes: every rank builds its own cache on the same ``cache_dir`` (the base training config gives
    ``output_dir + '/embeddings'``). A rank encodes only the slices its sampler hands it that are neither in its
    memory nor on disk. The distributed samplers give the ranks disjoint slices in an epoch (but for the training
    sampler's padding), so in the first epoch each slice is encoded by one rank; in later ones, reshuffled, a rank
    reads from the folder what the others encoded. Two ranks that miss the same slice at once (that padding, two
    runs on one ``output_dir``) both encode and write it: each writes a temporary file and renames it onto
    ``<key>.pt`` (atomic on a POSIX file system), so the file is always one complete entry, whichever rename came
    last. Nodes share entries when ``cache_dir`` is on a shared file system and keep their own otherwise; no rank
    reads a partial file. A process killed while writing can leave a hidden temporary ``.<key>.*.pt``, never read.

    Args:
        backbone: the backbone whose encoder produces the embeddings (trainable or not: the key follows its
            weights).
        cache_dir: folder for on-disk entries, shared between runs and ranks; ``None`` keeps entries in memory
            only.
        max_items: most entries kept in memory; ``None`` for no count limit.
        batch_size: images encoded per encoder call on a miss.
        max_memory_mb: most MiB (``2**20`` bytes) of embeddings kept in memory; ``None`` for no byte limit, 0 to
            keep none (every hit then reads its file). The base training config sets 1024.
        storage_dtype: ``"float32"`` or ``"float16"`` (or the torch dtype): what memory and disk hold. Entries of
            one storage dtype are never served to a cache of another (the dtype is part of the key).

    Attributes:
        hits: lookups served from memory or disk.
        misses: lookups that ran the encoder (a rejected disk entry counts as a miss).
        memory_bytes: bytes of the embeddings held in memory now.

    Raises:
        ValueError: ``storage_dtype`` is not one of :data:`STORAGE_DTYPES`, or a bound is negative.
    """

    def __init__(
        self,
        backbone: ImageBackbone,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        batch_size: int = 4,
        max_memory_mb: float | None = None,
        storage_dtype: str | torch.dtype = "float32",
    ) -> None:
        names = {v: k for k, v in STORAGE_DTYPES.items()}
        name = names.get(storage_dtype, storage_dtype)
        if name not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype {storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
        for bound, value in (("max_items", max_items), ("max_memory_mb", max_memory_mb)):
            if value is not None and value < 0:
                raise ValueError(f"{bound} must be >= 0 or None, not {value}")
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items = max_items
        self.batch_size = batch_size
        self.max_memory_mb = max_memory_mb
        self.storage_dtype = STORAGE_DTYPES[name]
        self._storage_name = name
        self._memory: OrderedDict[str, tuple[torch.Tensor, int | None]] = OrderedDict()  # key -> (entry, slot)
        self._slab: torch.Tensor | None = None  # (capacity, C, h, w): the held entries, allocated once
        self._free_slots: list[int] | None = []  # None: the slab could not be allocated
        self.memory_bytes = 0
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
                for key in list(self._memory):
                    self._drop(key)
            self._state_token, self._fingerprint = token, fingerprint
        return self._fingerprint

    @property
    def capacity(self) -> int | None:
        """Most entries memory holds: ``max_items`` or ``max_memory_mb`` over one entry's bytes (its shape as
        the backbone declares it or as first encoded, in ``storage_dtype``), whichever is smaller; ``None`` when
        neither bound applies yet (no bound, or only a byte bound and the shape not known yet)."""
        shape = self._expected()[0]
        return self._capacity(None if shape is None else math.prod(shape) * self.storage_dtype.itemsize)

    def _capacity(self, entry_bytes: int | None) -> int | None:
        """:attr:`capacity` for entries of ``entry_bytes`` (``None``: not known)."""
        bounds = [] if self.max_items is None else [self.max_items]
        if self.max_memory_mb is not None and entry_bytes is not None:
            bounds.append(int(self.max_memory_mb * _MIB) // entry_bytes)
        return min(bounds) if bounds else None

    def key(self, image: torch.Tensor) -> str:
        """The cache key of one image ``(1|3, H, W)``: its shape and bytes, the storage dtype, the encoder
        fingerprint and the dtype the encoder computes in (the backbone's precision, so bfloat16 and float32
        embeddings never mix)."""
        return self._key(image, self.fingerprint)

    def _compute_dtype(self) -> str:
        """The encoder's compute dtype (``SamBackbone.compute_dtype``; float32 for a backbone without one)."""
        compute_dtype = getattr(self.backbone, "compute_dtype", None)
        return str(compute_dtype() if callable(compute_dtype) else torch.float32)

    def _key(self, image: torch.Tensor, fingerprint: str) -> str:
        data = image.detach().cpu().float().contiguous()
        digest = hashlib.sha1(fingerprint.encode())
        digest.update(self._storage_name.encode())
        compute = self._compute_dtype()
        if compute != str(torch.float32):  # float32 keys stay as they were, so existing cache folders still hit
            digest.update(compute.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path | None:
        """The file of the entry ``key`` (:meth:`key`), or ``None`` without ``cache_dir``."""
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pt"

    def _expected(self) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
        """Shape and dtype of one embedding as the encoder gives it: what the backbone says (a SAM backbone's
        ``embedding_dim`` and ``embedding_size``, its encoder's parameter dtype), else what the first embedding
        this cache encoded had, else ``None`` (not known yet)."""
        backbone = self.backbone
        encoded_shape, encoded_dtype = self._encoded_spec or (None, None)
        shape = encoded_shape
        if hasattr(backbone, "embedding_dim") and hasattr(backbone, "embedding_size"):
            shape = (int(backbone.embedding_dim), *map(int, backbone.embedding_size))
        dtype = next((p.dtype for p in backbone.image_encoder.parameters() if p.is_floating_point()), encoded_dtype)
        return shape, dtype

    @staticmethod
    def _checksum(embedding: torch.Tensor) -> int:
        return zlib.crc32(embedding.contiguous().view(torch.uint8).numpy())

    def _load(self, path: Path, key: str) -> torch.Tensor | None:
        """The embedding in ``path``, or ``None`` (with a warning) unless it is a complete entry of ``key``."""
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: any load failure means recompute
            logger.warning("embedding cache: %s cannot be read (%s: %s); encoding again", path, type(e).__name__, e)
            return None
        shape, dtype = self._expected()[0], self.storage_dtype
        embedding = record.get("embedding") if isinstance(record, dict) else None
        if not isinstance(embedding, torch.Tensor):
            problem = f"holds a {type(record).__name__}, not an embedding cache entry"
        elif record.get("key") != key:
            problem = f"is the entry of key {record.get('key')!r}, not of its own name's"
        elif embedding.dtype != dtype or (shape is not None and tuple(embedding.shape) != shape):
            problem = f"holds {embedding.dtype} {tuple(embedding.shape)}, not a {dtype} {shape} embedding"
        elif record.get("crc32") != self._checksum(embedding):
            problem = "fails its checksum"
        else:
            return embedding
        logger.warning("embedding cache: %s %s; encoding again", path, problem)
        return None

    def _save(self, key: str, embedding: torch.Tensor) -> None:
        """Write the entry of ``key`` under a temporary name, renamed onto its path when complete."""
        record = {"key": key, "storage_dtype": self._storage_name, "crc32": self._checksum(embedding),
                  "embedding": embedding}
        with atomic_path(self.path(key)) as tmp:
            torch.save(record, tmp)

    def _over(self, count: int, nbytes: int) -> bool:
        """Whether ``count`` entries of ``nbytes`` in all exceed a bound."""
        return (self.max_items is not None and count > self.max_items) or (
            self.max_memory_mb is not None and nbytes > self.max_memory_mb * _MIB
        )

    def _slot_for(self, embedding: torch.Tensor) -> int | None:
        """A free slot of the slab for ``embedding``, the slab allocated at the first entry of a cache with a byte
        bound (:attr:`capacity` entries of its shape, resident only as they are filled); ``None`` without a byte
        bound, for an entry of another shape, or where the slab could not be allocated: such entries are held as
        tensors of their own."""
        if self._slab is None and self.max_memory_mb is not None and self._free_slots is not None:
            capacity = self._capacity(embedding.numel() * embedding.element_size())
            try:
                self._slab = torch.empty((capacity, *embedding.shape), dtype=embedding.dtype)
                self._free_slots = list(range(capacity))[::-1]
            except RuntimeError as e:  # more address space than the machine allows
                logger.warning("embedding cache: no %g MiB buffer (%s); holding entries one by one",
                               self.max_memory_mb, e)
                self._free_slots = None
        if self._slab is None or not self._free_slots or self._slab.shape[1:] != embedding.shape:
            return None
        return self._free_slots.pop()

    def _remember(self, key: str, embedding: torch.Tensor) -> None:
        """Hold a copy of ``embedding`` in memory, dropping the least recently used entries first until both
        bounds hold with it (none held when it alone exceeds them).

        A bounded cache copies entries into one slab allocated once, not into tensors of their own: thousands of
        4 MiB tensors allocated and freed in LRU order, between the caller's batch tensors, fragment the C
        allocator's heap until the process holds several times the bound.
        """
        if key in self._memory:
            self._drop(key)
        nbytes = embedding.numel() * embedding.element_size()
        while self._memory and self._over(len(self._memory) + 1, self.memory_bytes + nbytes):
            self._drop(next(iter(self._memory)))
        if self._over(1, nbytes):
            return
        slot = self._slot_for(embedding)
        held = embedding if slot is None else self._slab[slot].copy_(embedding)
        self._memory[key] = (held, slot)
        self.memory_bytes += nbytes

    def _drop(self, key: str) -> None:
        held, slot = self._memory.pop(key)
        self.memory_bytes -= held.numel() * held.element_size()
        if slot is not None:
            self._free_slots.append(slot)

    def _lookup(self, key: str) -> torch.Tensor | None:
        """The entry of ``key`` from memory (a view of the slab: copy it before the next :meth:`_remember`) or
        from disk, else ``None``."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key][0]
        path = self.path(key)
        if path is not None and path.is_file():
            embedding = self._load(path, key)
            if embedding is not None:
                self._remember(key, embedding)
            return embedding
        return None

    def _to_storage(self, embedding: torch.Tensor) -> torch.Tensor:
        """A copy of one embedding in the storage dtype, owning its storage (not a view of the batch).

        Raises:
            ValueError: a finite embedding overflows the storage dtype (values beyond float16's 65504).
        """
        stored = embedding.to(self.storage_dtype, copy=True).contiguous()
        if not torch.isfinite(stored).all() and torch.isfinite(embedding).all():
            raise ValueError(
                f"embedding cache: an embedding (max |x| = {embedding.abs().max().item():.4g}) overflows "
                f"{self._storage_name}; store it as float32"
            )
        return stored

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of images, encoding only those neither in memory nor on disk.

        Args:
            images: ``(B, 1|3, H, W)`` intensities in ``[0, 1]``.

        Returns:
            ``(B, C, h, w)`` in the encoder's dtype, on the device of ``images``.

        Raises:
            ValueError: an embedding overflows ``storage_dtype``.
        """
        fingerprint = self.fingerprint  # once per call: the weights do not change during it
        keys = [self._key(img, fingerprint) for img in images]
        out: torch.Tensor | None = None  # (B, C, h, w), made at the first embedding
        dtype = self._expected()[1]

        def put(i: int, embedding: torch.Tensor) -> None:  # copied at once: a slab slot may be reused later
            nonlocal out
            if out is None:
                out = torch.empty((len(keys), *embedding.shape), dtype=dtype or torch.float32)
            out[i] = embedding

        todo = []
        for i, key in enumerate(keys):
            embedding = self._lookup(key)
            if embedding is None:
                todo.append(i)
            else:
                put(i, embedding)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            embeddings = self.backbone.encode(images[idx]).cpu()
            if self._encoded_spec is None:
                self._encoded_spec = (tuple(embeddings.shape[1:]), embeddings.dtype)
                dtype = dtype or embeddings.dtype
            for i, emb in zip(idx, embeddings):
                stored = self._to_storage(emb)
                put(i, stored)
                self._remember(keys[i], stored)
                if self.cache_dir is not None:
                    self._save(keys[i], stored)
        return out.to(images.device)

    def log_stats(self) -> str:
        """Log and return the hit/miss count and the memory held."""
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        bound = "" if self.max_memory_mb is None else f" of {self.max_memory_mb:g}"
        msg = (
            f"embedding cache: {self.hits} hits, {self.misses} misses ({rate:.0%} hit rate), "
            f"{len(self._memory)} in memory ({self.memory_bytes / _MIB:.1f}{bound} MiB, {self._storage_name})"
        )
        logger.info(msg)
        return msg
