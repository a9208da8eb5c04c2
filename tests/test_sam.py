"""The backbone interface, registry, checkpoint errors, LoRA, the embedding cache and the box predictor."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ambisam.errors import InputError
from ambisam.sam import (
    BoxPredictor,
    EmbeddingCache,
    add_encoder_lora,
    backbone_registry,
    build_backbone,
    lora_parameters,
    segment_with_box,
)
from conftest import dice, noisy_ellipse, pickled_checkpoint


def test_registry_names():
    assert set(backbone_registry) == {"litemedsam", "vit_b", "vit_l", "vit_h", "medsam"}


def test_litemedsam_shapes(litemedsam):
    assert litemedsam.image_size == 256
    assert litemedsam.embedding_size == (64, 64)
    assert litemedsam.mask_size == (256, 256)
    assert not litemedsam.training
    with torch.no_grad():
        emb = litemedsam.encode(torch.rand(2, 1, 100, 120))
    assert emb.shape == (2, 256, 64, 64)


def test_segment_with_box_reaches_dice_095_on_noisy_ellipse(litemedsam):
    image, mask, box = noisy_ellipse()
    pred = segment_with_box(image, box, backbone=litemedsam)
    assert pred.dtype == bool and pred.shape == mask.shape
    assert dice(pred, mask) >= 0.95


def test_segment_with_box_by_name_matches_instance(litemedsam):
    image, mask, box = noisy_ellipse(h=96, w=96, center=(50, 45), radii=(18, 14), seed=3)
    by_name = segment_with_box(image * 40 - 7, box, backbone="litemedsam")  # any intensity range
    assert np.array_equal(by_name, segment_with_box(image, box, backbone=litemedsam))
    assert dice(by_name, mask) >= 0.9


def test_boxes_to_input_scales_x_by_width_and_y_by_height(litemedsam):
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    out = litemedsam.boxes_to_input(box, (128, 64))  # H=128, W=64 -> x * 4, y * 2
    assert torch.allclose(out, torch.tensor([[40.0, 40.0, 200.0, 80.0]]))


def test_decode_groups_prompts_by_image(litemedsam):
    torch.manual_seed(0)
    with torch.no_grad():
        emb = litemedsam.encode(torch.rand(2, 1, 64, 64))
        boxes = torch.tensor([[10, 10, 100, 100], [50, 60, 200, 220], [0, 0, 255, 255]] * 2, dtype=torch.float32)
        grouped, iou = litemedsam.decode_boxes(emb, boxes)
        one_by_one = torch.cat([litemedsam.decode_boxes(emb[i // 3 : i // 3 + 1], boxes[i : i + 1])[0] for i in range(6)])
        multi, multi_iou = litemedsam.decode_boxes(emb, boxes, multimask=True)
    assert grouped.shape == (6, 1, 256, 256) and iou.shape == (6, 1)
    assert torch.allclose(grouped, one_by_one, atol=1e-4)
    assert multi.shape == (6, 3, 256, 256) and multi_iou.shape == (6, 3)
    with pytest.raises(ValueError, match="do not split evenly"):
        litemedsam.decode_boxes(emb, boxes[:5])


def test_decode_in_chunks_of_prompts_gives_the_same_masks(litemedsam):
    """prompts_per_call only changes how many prompts go to the decoder at once (3 prompts per image here)."""
    torch.manual_seed(0)
    with torch.no_grad():
        emb = litemedsam.encode(torch.rand(2, 1, 64, 64))
        boxes = torch.tensor([[10, 10, 100, 100], [50, 60, 200, 220], [0, 0, 255, 255]] * 2, dtype=torch.float32)
        results = {}
        for per_call in (1, 2, 3, None):
            litemedsam.prompts_per_call = per_call
            results[per_call] = litemedsam.decode_boxes(emb, boxes)[0]
        litemedsam.prompts_per_call = None
    for per_call in (1, 2, None):
        assert torch.allclose(results[per_call], results[3], atol=1e-4), per_call
    with pytest.raises(ValueError, match="prompts_per_call"):
        type(litemedsam)("x", litemedsam.image_encoder, litemedsam.prompt_encoder, litemedsam.mask_decoder, 256,
                         prompts_per_call=0)


def test_dense_pe_is_computed_once_and_follows_the_encoding_matrix(litemedsam):
    backbone = copy.deepcopy(litemedsam)
    first = backbone.dense_pe()
    assert first.shape == (1, 256, 64, 64)
    assert torch.equal(first, backbone.prompt_encoder.get_dense_pe())
    assert backbone.dense_pe() is first  # kept between decoder calls
    with torch.no_grad():
        backbone.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2)  # new values, same tensor
    changed = backbone.dense_pe()
    assert not torch.equal(changed, first) and torch.equal(changed, backbone.prompt_encoder.get_dense_pe())


def test_unknown_backbone_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unknown backbone 'vit_x'"):
        build_backbone("vit_x")
    with pytest.raises(InputError, match="needs a checkpoint file.*sam_vit_b_01ec64.pth"):
        build_backbone("vit_b")
    missing = tmp_path / "nowhere" / "medsam_vit_b.pth"
    with pytest.raises(InputError, match="checkpoint not found") as err:
        build_backbone("medsam", missing)
    assert str(missing) in str(err.value)


def test_wrong_checkpoints_name_the_file_and_the_problem(tmp_path, litemedsam):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read as a PyTorch state dict") as err:
        build_backbone("litemedsam", garbage)
    assert str(garbage) in str(err.value)

    partial = tmp_path / "partial.pth"
    state = litemedsam.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("mask_decoder.")}, partial)
    with pytest.raises(InputError, match=r"is not a LiteMedSAM checkpoint.*missing key\(s\), e.g. mask_decoder"):
        build_backbone("litemedsam", partial)

    lite = tmp_path / "lite.pth"
    torch.save({"model": state}, lite)  # nested under "model", as training scripts save it
    with pytest.raises(InputError, match="is not a vit_b checkpoint"):
        build_backbone("vit_b", lite)


def test_a_checkpoint_that_needs_pickle_is_refused_with_one_message(tmp_path, litemedsam):
    path = pickled_checkpoint(tmp_path / "pickled.pth", litemedsam.state_dict())
    with pytest.raises(InputError) as err:
        build_backbone("litemedsam", checkpoint=path)
    assert err.value.path == str(path)
    assert "needs pickle to load (it holds conftest.NotAWeight)" in str(err.value) and "is refused" in str(err.value)
    assert "weights_only=True" in str(err.value) and "Traceback" not in str(err.value)


def test_checkpoint_round_trip_loads_strictly(tmp_path, litemedsam):
    path = tmp_path / "tuned.pth"
    state = {k: v.clone() for k, v in litemedsam.state_dict().items()}
    state["mask_decoder.iou_token.weight"] += 1.0
    torch.save(state, path)
    tuned = build_backbone("litemedsam", path)
    assert torch.equal(tuned.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    assert not tuned.training


def test_encoder_lora_trains_only_adapters_and_starts_as_identity():
    backbone = build_backbone("litemedsam")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before = backbone.encode(x)
    add_encoder_lora(backbone, rank=4)
    trainable = [n for n, p in backbone.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_parameters(backbone)) == len(trainable)
    with torch.no_grad():
        assert torch.allclose(backbone.encode(x), before, atol=1e-5)  # LoRA's B starts at zero
        for p in lora_parameters(backbone):
            p.add_(0.05)
        assert not torch.allclose(backbone.encode(x), before, atol=1e-3)
    with pytest.raises(ValueError):
        add_encoder_lora(build_backbone("litemedsam"), target_modules=["no_such_layer"])


def test_embedding_cache_hits_misses_and_disk(tmp_path, litemedsam):
    images = torch.rand(3, 1, 48, 48)
    cache = EmbeddingCache(litemedsam, cache_dir=tmp_path)
    first = cache(images[:2])
    assert (cache.hits, cache.misses) == (0, 2)
    again = cache(images)
    assert (cache.hits, cache.misses) == (2, 3)
    assert torch.equal(again[:2], first)
    with torch.no_grad():
        assert torch.allclose(again, litemedsam.encode(images), atol=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    fresh = EmbeddingCache(litemedsam, cache_dir=tmp_path)  # a new run finds the entries on disk
    assert torch.equal(fresh(images), again) and (fresh.hits, fresh.misses) == (3, 0)
    assert "3 hits, 0 misses" in fresh.log_stats()


def test_cache_key_depends_on_encoder_weights(tmp_path, litemedsam):
    other = build_backbone("litemedsam")
    with torch.no_grad():
        other.image_encoder.neck[0].weight.mul_(1.01)
    image = torch.rand(1, 48, 48)
    assert EmbeddingCache(litemedsam).key(image) != EmbeddingCache(other).key(image)


def test_predictor_encodes_once_and_checks_boxes(litemedsam):
    image, mask, box = noisy_ellipse(h=120, w=120, center=(60, 60), radii=(25, 20))
    predictor = BoxPredictor(litemedsam)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box)
    predictor.set_image(image, scaled=True)
    logits, iou = predictor.predict([box, [0, 0, 30, 30]], multimask=True)
    assert logits.shape == (2, 3, 120, 120) and iou.shape == (2, 3)
    with pytest.raises(ValueError, match="outside the 120x120 image"):
        predictor.predict([0, 0, 130, 50])
    with pytest.raises(ValueError, match="min exceeds max"):
        predictor.predict([50, 10, 20, 40])
    with pytest.raises(ValueError, match="NaN"):
        predictor.set_image(np.full((10, 10), np.nan))
