"""LoRA on the query and value projections alone of an image encoder's fused ``qkv`` layers.

SAM's ViT and LiteMedSAM's TinyViT compute each attention block's query, key and value with one
``nn.Linear`` named ``qkv``; LoRA as most SAM adaptations use it (and P2SAM's stage 1) adapts q and v only,
which ``peft`` cannot do to a fused layer. :class:`FusedQKVLoRA` wraps the frozen fused layer and adds a
low-rank update to exactly its q rows and its v rows. Where those rows are depends on the encoder
(:func:`qkv_rows`):

- SAM's ViT reshapes the output to ``(B, N, 3, heads, head_dim)``: q is the first third, v the last;
- TinyViT views it as ``(B, N, heads, key_dim + key_dim + d)`` and splits the last axis: the rows interleave
  per head, ``[q_h, k_h, v_h]`` for each head ``h``.

:func:`add_qv_lora` adapts every ``qkv`` layer of ``backbone.image_encoder``; :func:`merge_lora` folds the
adapters (these and ``peft``'s) back into plain frozen ``nn.Linear`` layers with the encoder's original
state-dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ambisam.sam.backbone import SamBackbone
from ambisam.sam.lora import train_only_lora

__all__ = ["FusedQKVLoRA", "qkv_rows", "add_qv_lora", "merge_lora"]


def qkv_rows(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The output rows of ``attention.qkv`` that hold the query and the value projections.

    Args:
        attention: an attention block with a fused ``qkv`` linear layer: TinyViT's (recognised by its
            ``num_heads``, ``key_dim`` and ``d`` attributes, per-head interleaved rows) or one that splits the
            output into three equal parts q, k, v in that order (SAM's ViT, timm's ViT).

    Returns:
        ``q_rows, v_rows``: 1D long tensors of row indices into ``qkv.weight``.

    Raises:
        ValueError: when the layer's output size fits neither layout.
    """
    out = attention.qkv.out_features
    if all(hasattr(attention, a) for a in ("num_heads", "key_dim", "d")):
        heads, key_dim, d = int(attention.num_heads), int(attention.key_dim), int(attention.d)
        per_head = 2 * key_dim + d
        if heads * per_head != out:
            raise ValueError(f"qkv has {out} outputs, not {heads} heads x (2 x {key_dim} + {d}) as TinyViT splits them")
        starts = torch.arange(heads)[:, None] * per_head
        q_rows = (starts + torch.arange(key_dim)).flatten()
        v_rows = (starts + 2 * key_dim + torch.arange(d)).flatten()
        return q_rows, v_rows
    if out % 3:
        raise ValueError(f"qkv has {out} outputs, not three equal q, k, v parts")
    third = out // 3
    return torch.arange(third), torch.arange(2 * third, out)


class FusedQKVLoRA(nn.Module):
    """A frozen fused ``qkv`` linear layer plus LoRA updates of its q rows and its v rows.

    ``y = base(x)``, then ``y[..., q_rows] += scale * B_q A_q x'`` and ``y[..., v_rows] += scale * B_v A_v x'``
    with ``x' = dropout(x)`` (one dropout mask shared by both) and ``scale = alpha / rank``. ``A`` starts as
    ``nn.Linear``'s default (Kaiming-uniform) initialisation, as in ``peft``, and ``B`` at zero, so the layer
    starts equal to ``base``.

    Args:
        base: the fused layer, ``in -> out`` (frozen here: its ``requires_grad`` is turned off).
        q_rows: ``(n_q,)`` output rows of the query projection.
        v_rows: ``(n_v,)`` output rows of the value projection.
        rank: LoRA rank ``r``.
        alpha: scaling numerator; ``None`` for ``rank`` (scale 1).
        dropout: dropout probability on the LoRA branch's input.

    Raises:
        ValueError: ``rank`` below 1, or rows outside ``base``'s outputs.
    """

    def __init__(
        self,
        base: nn.Linear,
        q_rows: torch.Tensor,
        v_rows: torch.Tensor,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        for rows in (q_rows, v_rows):
            if rows.numel() and (rows.min() < 0 or rows.max() >= base.out_features):
                raise ValueError(f"rows {rows.min().item()}..{rows.max().item()} outside {base.out_features} outputs")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.scale = (alpha if alpha is not None else rank) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A_q = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B_q = nn.Linear(rank, len(q_rows), bias=False, **factory)
        self.lora_A_v = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B_v = nn.Linear(rank, len(v_rows), bias=False, **factory)
        nn.init.zeros_(self.lora_B_q.weight)
        nn.init.zeros_(self.lora_B_v.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # derived from the encoder's layout, not state: rebuilt by add_qv_lora, so not saved
        self.register_buffer("q_rows", q_rows.to(base.weight.device, torch.long), persistent=False)
        self.register_buffer("v_rows", v_rows.to(base.weight.device, torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        out = self.base(x)
        x = self.dropout(x)
        out = out.index_add(-1, self.q_rows, self.lora_B_q(self.lora_A_q(x)), alpha=self.scale)
        return out.index_add(-1, self.v_rows, self.lora_B_v(self.lora_A_v(x)), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """The adapters as one ``(out, in)`` update of ``base.weight`` (zero outside the q and v rows)."""
        delta = torch.zeros_like(self.base.weight)
        delta = delta.index_add(0, self.q_rows, self.lora_B_q.weight @ self.lora_A_q.weight, alpha=self.scale)
        return delta.index_add(0, self.v_rows, self.lora_B_v.weight @ self.lora_A_v.weight, alpha=self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` computing what this layer computes (without dropout)."""
        base = self.base
        linear = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None,
            device=base.weight.device, dtype=base.weight.dtype,
        )
        linear.weight.copy_(base.weight + self.delta_weight())
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, q_rows={len(self.q_rows)}, v_rows={len(self.v_rows)}"


def add_qv_lora(backbone: SamBackbone, rank: int = 4, alpha: float | None = None, dropout: float = 0.0) -> SamBackbone:
    """Replace every ``qkv`` linear layer of ``backbone.image_encoder`` by a :class:`FusedQKVLoRA`, in place.

    Every other parameter of the encoder is frozen; only the adapters (``lora_`` parameters, which
    :func:`~ambisam.sam.lora.lora_parameters` returns) train. The adapted encoder starts equal to the
    pretrained one.

    Args:
        backbone: the backbone to adapt (any object with an ``image_encoder`` module).
        rank: LoRA rank ``r``.
        alpha: scaling numerator; ``None`` for ``rank``.
        dropout: dropout on the LoRA branch.

    Returns:
        ``backbone``.

    Raises:
        ValueError: when the encoder has no plain ``nn.Linear`` named ``qkv`` (none at all, or already adapted),
            or one whose layout :func:`qkv_rows` does not know.
    """
    encoder = backbone.image_encoder
    blocks = [m for m in encoder.modules() if type(getattr(m, "qkv", None)) is nn.Linear]
    if not blocks:
        raise ValueError(f"{type(encoder).__name__} has no plain nn.Linear 'qkv' layer to adapt (already adapted?)")
    for block in blocks:
        q_rows, v_rows = qkv_rows(block)
        block.qkv = FusedQKVLoRA(block.qkv, q_rows, v_rows, rank=rank, alpha=alpha, dropout=dropout)
    train_only_lora(encoder)
    return backbone


def merge_lora(backbone: SamBackbone) -> SamBackbone:
    """Fold every LoRA adapter of ``backbone.image_encoder`` into its base layer, in place.

    Both :class:`FusedQKVLoRA` (from :func:`add_qv_lora`) and ``peft``'s LoRA layers (from
    :func:`~ambisam.sam.lora.add_encoder_lora`) become the plain layers they wrap, frozen, holding the merged
    weights, so the encoder's state-dict keys are those of the unadapted encoder again and it computes what the
    adapted one computed (without dropout). Other parameters keep their ``requires_grad``.

    Args:
        backbone: the backbone whose encoder to merge (any object with an ``image_encoder`` module).

    Returns:
        ``backbone``; unchanged when its encoder has no adapters.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(backbone.image_encoder.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FusedQKVLoRA):
                setattr(parent, child_name, child.merged())
            elif isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer().requires_grad_(False))
    return backbone
