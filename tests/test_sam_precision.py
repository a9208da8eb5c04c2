"""The backbone's precision setting: parsing, ``auto``'s resolution, bf16 masks against fp32's, the embedding cache
key, and the configs' ``precision`` id. No timed assertions (speed is ``ambisam bench precision``'s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ambisam.errors import InputError
from ambisam.sam import EmbeddingCache, autocast_dtype, check_precision, resolve_precision, set_precision
from ambisam.sam import precision as precision_module
from conftest import dice

BASE = Path(__file__).resolve().parents[1] / "common" / "ambisam" / "configs"


def test_check_precision_accepts_the_three_and_names_a_bad_value():
    assert [check_precision(p) for p in ("fp32", " BF16 ", "auto")] == ["fp32", "bf16", "auto"]
    with pytest.raises(InputError, match="'half'"):
        check_precision("half")


def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected
    assert autocast_dtype("auto", "meta") == torch.float32  # neither CPU nor CUDA: float32


def test_cpuinfo_flags_are_read_when_torch_cannot_tell(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "cpu", object())  # no torch feature probes: the flags decide
    info = tmp_path / "cpuinfo"
    try:
        info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
        assert precision_module.cpu_has_native_bf16.__wrapped__(str(info))
        info.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
        assert not precision_module.cpu_has_native_bf16.__wrapped__(str(info))
        assert not precision_module.cpu_has_native_bf16.__wrapped__(str(tmp_path / "absent"))
    finally:
        precision_module.cpu_has_native_bf16.cache_clear()


def test_a_backbone_refuses_an_unknown_precision(litemedsam):
    with pytest.raises(InputError, match="'fp8'"):
        litemedsam.precision = "fp8"
    assert litemedsam.precision == "fp32"


def _bf16_mask(backbone, example, encode: bool):
    """The bf16 mask of the shared ellipse (its fp32 embedding unless ``encode``), and the fp32 one."""
    image, boxes = example["image"], example["boxes"]
    size = tuple(image.shape[-2:])
    try:
        backbone.precision = "bf16"
        with torch.no_grad():
            embeddings = backbone.encode(image) if encode else example["embeddings"]
            logits, iou = backbone.decode_boxes(embeddings, boxes)
    finally:
        backbone.precision = "fp32"
    assert embeddings.dtype == logits.dtype == iou.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # the transformer's autocast was left
    with torch.no_grad():
        reference, _ = backbone.decode_boxes(example["embeddings"], boxes)
    return backbone.postprocess(logits, size)[0, 0] > 0, backbone.postprocess(reference, size)[0, 0] > 0


def test_bf16_decoder_masks_agree_with_fp32_and_come_back_float32(litemedsam, example):
    mask, reference = _bf16_mask(litemedsam, example, encode=False)
    assert dice(mask.numpy(), reference.numpy()) >= 0.95


@pytest.mark.skipif(
    not precision_module.cpu_has_native_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16/AMX): emulated, one bf16 encode takes tens of seconds to "
    "minutes; `ambisam bench precision` measures it",
)
def test_bf16_encoder_and_decoder_masks_agree_with_fp32(litemedsam, example):
    mask, reference = _bf16_mask(litemedsam, example, encode=True)
    assert dice(mask.numpy(), reference.numpy()) >= 0.95


def test_cache_keys_differ_by_precision(litemedsam, example):
    cache = EmbeddingCache(litemedsam)
    image = example["image"][0]
    key32 = cache.key(image)
    try:
        litemedsam.precision = "bf16"
        assert cache.key(image) != key32
    finally:
        litemedsam.precision = "fp32"
    assert cache.key(image) == key32


def test_set_precision_reaches_the_backbone_inside_a_network(litemedsam):
    wrapper = torch.nn.Sequential(litemedsam)
    try:
        assert set_precision(wrapper, "auto") is wrapper and litemedsam.precision == "auto"
        with pytest.raises(InputError):
            set_precision(wrapper, "fp16")
    finally:
        litemedsam.precision = "fp32"


@pytest.mark.parametrize("name", ["inference.json", "evaluate.json", "train.json"])
def test_base_configs_and_every_bundle_carry_the_precision_id(name):
    base = json.loads((BASE / name).read_text())
    check_precision(base["precision"])
    from ambisam.registry import get_method

    bundles = sorted((BASE.parents[2] / "bundles").glob(f"*/configs/{name}"))
    if name != "inference.json":  # a training-free bundle's evaluation takes it from its inference.json; its
        # train.json (UR-SAM's localiser) runs no SAM
        bundles = [c for c in bundles if get_method(c.parents[1].name).trainable]
    assert bundles
    for config in bundles:
        assert json.loads(config.read_text())["precision"] == f"%common/ambisam/configs/{name}#precision", config


def test_the_inference_config_wires_precision_to_the_backbone_and_the_record(litemedsam):
    from ambisam.bundle import bundle_workflow

    # the session's backbone as the config's (no second build): the network must get the config's precision
    workflow = bundle_workflow("psam", ["inference"], "infer", precision="bf16", device="cpu", backbone=litemedsam)
    parser = workflow.parser
    try:
        assert parser.get_parsed_content("network").backbone.precision == "bf16"
    finally:
        litemedsam.precision = "fp32"
    writer = next(h for h in parser.get("handlers") if "SamplingOutputWriter" in h["_target_"])
    assert writer["record"]["precision"] == "@precision"


class _TwoStageEncoder(torch.nn.Module):
    """A stand-in image encoder shaped like TinyViT and SAM's ViT: a ``patch_embed`` on the image, then more."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.body = torch.nn.Conv2d(8, 256, 4, stride=4)

    def forward(self, x):
        return self.body(self.patch_embed(x))


def test_bf16_keeps_the_patch_embedding_on_the_image_in_float32(litemedsam):
    """bfloat16 autocast everywhere in the encoder but its first layers, which read the intensities themselves."""
    from ambisam.sam import SamBackbone

    encoder = _TwoStageEncoder()
    backbone = SamBackbone("stand-in", encoder, litemedsam.prompt_encoder, litemedsam.mask_decoder, 256,
                           precision="bf16")
    seen = {}
    encoder.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("patch_embed", out.dtype))
    encoder.body.register_forward_hook(lambda m, a, out: seen.__setitem__("body", out.dtype))
    with torch.no_grad():
        embedding = backbone.encode(torch.rand(1, 1, 64, 64))
    assert seen == {"patch_embed": torch.float32, "body": torch.bfloat16}
    assert embedding.dtype == torch.float32 and embedding.shape == (1, 256, 16, 16)
    assert not torch.is_autocast_enabled("cpu")  # every context entered was left
    backbone.precision = "fp32"
    with torch.no_grad():
        backbone.encode(torch.rand(1, 1, 64, 64))
    assert seen == {"patch_embed": torch.float32, "body": torch.float32}
