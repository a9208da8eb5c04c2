"""The embedding cache follows the encoder's weights at lookup time, and never serves a corrupt disk entry."""

from __future__ import annotations

import logging

import pytest
import torch

import ambisam.sam.cache as cache_module
from ambisam.sam import EmbeddingCache, add_qv_lora, encoder_state_token, lora_parameters
from ambisam.sam.cache import STORAGE_DTYPES
from test_sam_qkv_lora import tiny_sam_backbone


@pytest.fixture
def images():
    return torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def count_hashes(monkeypatch):
    """How often the cache hashes the encoder's weights."""
    calls = []
    real = cache_module.encoder_fingerprint

    def counting(backbone):
        calls.append(backbone.name)
        return real(backbone)

    monkeypatch.setattr(cache_module, "encoder_fingerprint", counting)
    return calls


def test_an_untouched_encoder_hits_and_is_hashed_once(images, count_hashes):
    backbone = tiny_sam_backbone()
    cache = EmbeddingCache(backbone)
    first = cache(images)
    for _ in range(3):
        assert torch.equal(cache(images), first)
    backbone.train().eval()  # a mode switch is no change of weights
    assert torch.equal(cache(images), first)
    assert (cache.hits, cache.misses) == (8, 2)
    assert len(count_hashes) == 1


def test_a_lora_step_between_calls_gives_fresh_embeddings(images, count_hashes):
    backbone = add_qv_lora(tiny_sam_backbone(), rank=2)
    cache = EmbeddingCache(backbone)
    before = cache(images)
    token = encoder_state_token(backbone.image_encoder)
    optimizer = torch.optim.SGD(lora_parameters(backbone), lr=1.0)
    backbone.encode(images).mul(torch.randn_like(before)).sum().backward()
    optimizer.step()
    assert encoder_state_token(backbone.image_encoder) != token
    after = cache(images)
    assert (cache.hits, cache.misses) == (0, 4)
    with torch.no_grad():
        assert torch.allclose(after, backbone.encode(images), atol=1e-6)
    assert not torch.allclose(after, before, atol=1e-4)
    assert len(count_hashes) == 2
    assert torch.equal(cache(images), after) and cache.hits == 2  # and the new weights hit again


def test_weights_loaded_after_the_cache_exists_are_followed_on_disk_too(tmp_path, images):
    backbone, other = tiny_sam_backbone(seed=0), tiny_sam_backbone(seed=1)
    first_run = EmbeddingCache(backbone, cache_dir=tmp_path)
    old = first_run(images)
    second_run = EmbeddingCache(backbone, cache_dir=tmp_path)  # made while the old weights are in
    assert torch.equal(second_run(images), old) and second_run.hits == 2
    backbone.load_state_dict(other.state_dict())  # e.g. MONAI's CheckpointLoader, after the cache was built
    with torch.no_grad():
        expected = other.encode(images)
    assert not torch.allclose(expected, old, atol=1e-3)
    assert torch.allclose(second_run(images), expected, atol=1e-6) and second_run.misses == 2
    # the first cache's memory and both caches' disk entries of the old weights are not served
    assert torch.allclose(first_run(images), expected, atol=1e-6) and first_run.hits == 2  # second_run wrote them
    assert len(list(tmp_path.glob("*.pt"))) == 4


def _rewrite(path, **changes):
    """Save the entry in ``path`` again with some of its fields changed."""
    record = torch.load(path, weights_only=True)
    torch.save({**record, **changes}, path)


def test_stale_and_truncated_disk_entries_are_recomputed_with_a_warning_never_served(tmp_path, caplog):
    backbone = tiny_sam_backbone()
    images = torch.rand(7, 1, 32, 32, generator=torch.Generator().manual_seed(1))  # 6 to spoil, 1 left intact
    good = EmbeddingCache(backbone, cache_dir=tmp_path)(images)
    keys = [EmbeddingCache(backbone).key(img) for img in images]
    paths = [tmp_path / f"{k}.pt" for k in keys]
    foreign = tmp_path / "other"  # the same slices under another encoder's weights: same shape, other values
    EmbeddingCache(tiny_sam_backbone(seed=1), cache_dir=foreign)(images)
    foreign_path = foreign / f"{EmbeddingCache(tiny_sam_backbone(seed=1)).key(images[3])}.pt"

    paths[0].write_bytes(paths[0].read_bytes()[:100])  # truncated
    _rewrite(paths[1], embedding=torch.zeros(3, 3))  # wrong shape
    _rewrite(paths[2], embedding=good[2].double())  # wrong dtype
    paths[3].write_bytes(foreign_path.read_bytes())  # another encoder's entry copied under this key's name
    _rewrite(paths[4], embedding=good[4] + 1e-3)  # content changed behind its checksum
    torch.save(good[5], paths[5])  # a bare tensor (the format before entries were records)
    cache = EmbeddingCache(backbone, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ambisam.sam.cache"):
        again = cache(images)
    assert torch.equal(again, good)
    assert (cache.hits, cache.misses) == (1, 6)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 6 and all("encoding again" in m for m in warned)
    assert all(str(path) in m for path, m in zip(paths, warned))
    assert "cannot be read" in warned[0] and "(3, 3)" in warned[1] and "torch.float64" in warned[2]
    assert "not of its own name's" in warned[3] and "checksum" in warned[4]
    assert "not an embedding cache entry" in warned[5]
    repaired = EmbeddingCache(backbone, cache_dir=tmp_path)  # the entries were written again
    assert torch.equal(repaired(images), good) and repaired.hits == 7


class Grid(torch.nn.Module):
    """Like the U-Net grid backbone: an identity encoder (times ``scale``), no shape attributes."""

    name = "grid"

    def __init__(self, scale=1.0):
        super().__init__()
        self.image_encoder = torch.nn.Identity()
        self.scale = scale

    def encode(self, images):
        return images.float() * self.scale


def test_a_backbone_without_declared_shapes_learns_them_from_its_first_encoding(tmp_path):
    images = torch.rand(2, 1, 8, 8)
    bounded = EmbeddingCache(Grid(), cache_dir=tmp_path, max_memory_mb=1)
    assert bounded.capacity is None  # the entry's size is not known before the first encoding
    bounded(images[:1])
    assert bounded.capacity == 2**20 // (8 * 8 * 4)
    cache = EmbeddingCache(Grid(), cache_dir=tmp_path)
    assert torch.equal(cache(images[1:]), images[1:])  # a miss: learns (1, 8, 8) float32
    torch.save(torch.zeros(2, 8, 8), tmp_path / f"{cache.key(images[0])}.pt")
    assert torch.equal(cache(images[:1]), images[:1]) and cache.misses == 2


#: bytes of one tiny backbone embedding, (8, 4, 4) float32
TINY_BYTES = 8 * 4 * 4 * 4


def test_the_ram_bound_holds_the_most_recent_entries_and_evicted_ones_come_back(tmp_path):
    backbone = tiny_sam_backbone()
    images = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    for cache_dir in (None, tmp_path):
        cache = EmbeddingCache(backbone, cache_dir=cache_dir, max_memory_mb=3 * TINY_BYTES / 2**20)
        assert cache.capacity == 3  # from the backbone's declared shape, before any encoding
        first = cache(images)
        assert len(cache._memory) == 3 and cache.memory_bytes == 3 * TINY_BYTES
        assert list(cache._memory) == [cache.key(img) for img in images[-3:]]  # the most recently used
        assert len({held.untyped_storage().data_ptr() for held, _ in cache._memory.values()}) == 1  # in one slab
        assert torch.equal(cache(images[-3:]), first[-3:]) and (cache.hits, cache.misses) == (3, 10)
        again = cache(images[:1])  # evicted: encoded again (alone, so equal to float rounding), or read from disk
        assert torch.allclose(again, first[:1], atol=1e-6) if cache_dir is None else torch.equal(again, first[:1])
        assert (cache.hits, cache.misses) == ((3, 11) if cache_dir is None else (4, 10))
        assert cache.memory_bytes == 3 * TINY_BYTES
    assert EmbeddingCache(backbone, max_items=2, max_memory_mb=1).capacity == 2  # max_items still bounds
    disk_only = EmbeddingCache(backbone, cache_dir=tmp_path, max_memory_mb=0)
    assert torch.equal(disk_only(images), first) and disk_only.hits == 10 and disk_only.memory_bytes == 0
    with pytest.raises(ValueError, match="max_memory_mb"):
        EmbeddingCache(backbone, max_memory_mb=-1)


def test_fp16_storage_halves_the_bytes_and_gives_the_same_masks(tmp_path, litemedsam):
    from conftest import dice, noisy_ellipse

    assert EmbeddingCache(litemedsam, max_memory_mb=1024).capacity == 256  # 4 MiB a LiteMedSAM embedding
    assert EmbeddingCache(litemedsam, max_memory_mb=1024, storage_dtype="float16").capacity == 512
    image, mask, box = noisy_ellipse()
    image = torch.from_numpy(image)[None, None]
    size = tuple(image.shape[-2:])
    boxes = litemedsam.boxes_to_input(torch.tensor([box], dtype=torch.float32), size)
    caches = {name: EmbeddingCache(litemedsam, cache_dir=tmp_path, storage_dtype=name) for name in STORAGE_DTYPES}
    masks = {}
    for name, cache in caches.items():
        embedding = cache(image)
        assert embedding.dtype == torch.float32 and embedding.shape == (1, 256, 64, 64)
        with torch.no_grad():
            logits, _ = litemedsam.decode_boxes(embedding, boxes)
        masks[name] = (litemedsam.postprocess(logits, size) > 0)[0, 0].numpy()
    assert dice(masks["float32"], mask) > 0.8
    assert dice(masks["float16"], masks["float32"]) >= 0.99
    assert caches["float32"].memory_bytes == 4 * 2**20 and caches["float16"].memory_bytes == 2 * 2**20
    files = {name: caches[name].path(caches[name].key(image[0])) for name in caches}
    assert files["float32"] != files["float16"]
    assert files["float16"].stat().st_size < 0.6 * files["float32"].stat().st_size
    again = EmbeddingCache(litemedsam, cache_dir=tmp_path, storage_dtype=torch.float16)
    assert torch.equal(again(image), caches["float16"](image)) and again.hits == 1  # a miss returned the rounded one


def test_an_entry_of_another_storage_dtype_is_never_served(tmp_path, images, caplog):
    backbone = tiny_sam_backbone()
    half = EmbeddingCache(backbone, cache_dir=tmp_path, storage_dtype="float16")
    full = EmbeddingCache(backbone, cache_dir=tmp_path)
    assert half.key(images[0]) != full.key(images[0])
    half(images)
    expected = full(images)
    assert expected.dtype == torch.float32 and full.misses == 2  # the float16 files are not its entries
    _rewrite(half.path(half.key(images[0])), key=full.key(images[0]))
    full.path(full.key(images[0])).write_bytes(half.path(half.key(images[0])).read_bytes())  # a float16 entry renamed
    fresh = EmbeddingCache(backbone, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ambisam.sam.cache"):
        assert torch.allclose(fresh(images[:1]), expected[:1], atol=1e-6) and fresh.misses == 1
    assert "torch.float16" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="storage_dtype"):
        EmbeddingCache(backbone, storage_dtype="int8")


def test_a_write_that_dies_leaves_no_file_and_the_slice_is_encoded_next_time(tmp_path, images, monkeypatch):
    backbone = tiny_sam_backbone()

    def dies_halfway(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half an entry")
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(cache_module.torch, "save", dies_halfway)
        with pytest.raises(OSError, match="No space"):
            EmbeddingCache(backbone, cache_dir=tmp_path)(images)
    assert list(tmp_path.iterdir()) == []  # neither a partial entry nor a temporary file
    cache = EmbeddingCache(backbone, cache_dir=tmp_path)
    cache(images)
    assert cache.misses == 2 and len(list(tmp_path.iterdir())) == 2


def _encode_into(cache_dir, images, out, barrier):
    """One rank: encode ``images`` through a cache on the shared ``cache_dir``, starting with the other rank."""
    torch.set_num_threads(1)
    cache = EmbeddingCache(tiny_sam_backbone(), cache_dir=cache_dir, batch_size=1)
    barrier.wait()
    torch.save(cache(images), out)


def test_two_processes_sharing_one_folder_write_complete_entries_and_agree(tmp_path):
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    folder = tmp_path / "embeddings"
    context = torch.multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    ranks = [
        context.Process(target=_encode_into, args=(folder, images, tmp_path / f"rank{r}.pt", barrier)) for r in range(2)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert [rank.exitcode for rank in ranks] == [0, 0]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(first, second)
    keys = [EmbeddingCache(tiny_sam_backbone()).key(img) for img in images]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{k}.pt" for k in keys)  # no temporary leftovers
    reader = EmbeddingCache(tiny_sam_backbone(), cache_dir=folder)
    assert torch.equal(reader(images), first) and (reader.hits, reader.misses) == (6, 0)


def test_an_embedding_that_overflows_float16_is_an_error_not_an_inf():
    cache = EmbeddingCache(Grid(scale=1e5), storage_dtype="float16")
    with pytest.raises(ValueError, match="overflows float16"):
        cache(torch.rand(1, 1, 8, 8) + 0.5)
    assert torch.equal(EmbeddingCache(Grid(scale=1e5))(torch.ones(1, 1, 8, 8)), torch.full((1, 1, 8, 8), 1e5))


def test_a_bound_beyond_the_address_space_holds_entries_one_by_one(images, caplog):
    cache = EmbeddingCache(tiny_sam_backbone(), max_memory_mb=2**30)  # a PiB buffer cannot be mapped
    with caplog.at_level(logging.WARNING, logger="ambisam.sam.cache"):
        first = cache(images)
    assert "holding entries one by one" in caplog.records[0].getMessage()
    assert torch.equal(cache(images), first) and cache.hits == 2 and cache.memory_bytes == 2 * TINY_BYTES
