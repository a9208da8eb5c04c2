"""LoRA on the image encoder through ``peft``: the encoder's own weights stay frozen, only the low-rank adapters
train. (For LoRA on the query and value parts alone of the fused ``qkv`` layers, which ``peft`` cannot split,
see :mod:`ambisam.sam.qkv_lora`.)"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ambisam.sam.backbone import SamBackbone

__all__ = ["add_encoder_lora", "lora_parameters", "train_only_lora"]


def add_encoder_lora(
    backbone: SamBackbone,
    rank: int = 4,
    target_modules: Sequence[str] | str = ("qkv",),
    alpha: int | None = None,
    dropout: float = 0.0,
) -> SamBackbone:
    """Inject LoRA adapters into ``backbone.image_encoder`` in place and freeze everything else in it.

    SAM's ViT and LiteMedSAM's TinyViT both compute attention with one fused ``qkv`` linear layer, so the
    default target adapts the query, key and value projections of every block together.

    Args:
        backbone: the backbone to adapt (modified in place).
        rank: LoRA rank ``r``.
        target_modules: names (or a regex) of the encoder's linear layers to adapt, as ``peft`` takes them.
        alpha: LoRA scaling numerator; defaults to ``rank`` (scale 1).
        dropout: dropout on the LoRA branch.

    Returns:
        ``backbone``, whose image encoder now trains only its ``lora_`` parameters.

    Raises:
        ValueError: when ``target_modules`` matches no layer of the encoder (raised by ``peft``).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        bias="none",
    )
    inject_adapter_in_model(config, backbone.image_encoder)
    train_only_lora(backbone.image_encoder)
    return backbone


def train_only_lora(module: nn.Module) -> nn.Module:
    """Freeze every parameter of ``module`` but the LoRA adapters' (names containing ``lora_``), in place."""
    for name, param in module.named_parameters():
        param.requires_grad = "lora_" in name
    return module


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter parameters of ``module``, ``peft``'s and :class:`~ambisam.sam.qkv_lora.FusedQKVLoRA`'s
    (for an optimizer's parameter group)."""
    return [p for n, p in module.named_parameters() if "lora_" in n]
