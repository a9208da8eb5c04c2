"""The embedding cache follows the encoder's weights at lookup time, and never serves a corrupt disk entry."""

from __future__ import annotations

import logging

import pytest
import torch

import ambisam.sam.cache as cache_module
from ambisam.sam import EmbeddingCache, add_qv_lora, encoder_state_token, lora_parameters
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


def test_corrupt_disk_entries_are_recomputed_with_a_warning(tmp_path, images, caplog):
    backbone = tiny_sam_backbone()
    images = torch.cat([images, images.flip(-1)])  # 4 images: 3 to spoil, 1 left intact
    good = EmbeddingCache(backbone, cache_dir=tmp_path)(images)
    paths = [tmp_path / f"{EmbeddingCache(backbone).key(img)}.pt" for img in images]
    paths[0].write_bytes(paths[0].read_bytes()[:100])  # truncated
    torch.save(torch.zeros(3, 3), paths[1])  # wrong shape
    torch.save(good[2].double(), paths[2])  # wrong dtype
    cache = EmbeddingCache(backbone, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ambisam.sam.cache"):
        again = cache(images)
    assert torch.equal(again, good)
    assert (cache.hits, cache.misses) == (1, 3)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and all("encoding again" in m for m in warned)
    assert str(paths[0]) in warned[0] and "(3, 3)" in warned[1] and "float64" in warned[2]
    repaired = EmbeddingCache(backbone, cache_dir=tmp_path)  # the entries were written again
    assert torch.equal(repaired(images), good) and repaired.hits == 4


def test_a_backbone_without_declared_shapes_learns_them_from_its_first_encoding(tmp_path):
    class Grid(torch.nn.Module):  # like the U-Net grid backbone: an identity encoder, no shape attributes
        name = "grid"

        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Identity()

        def encode(self, images):
            return images.float()

    images = torch.rand(2, 1, 8, 8)
    EmbeddingCache(Grid(), cache_dir=tmp_path)(images[:1])
    cache = EmbeddingCache(Grid(), cache_dir=tmp_path)
    assert torch.equal(cache(images[1:]), images[1:])  # a miss: learns (1, 8, 8) float32
    torch.save(torch.zeros(2, 8, 8), tmp_path / f"{cache.key(images[0])}.pt")
    assert torch.equal(cache(images[:1]), images[:1]) and cache.misses == 2
