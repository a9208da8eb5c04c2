"""Any number of multimask outputs for SAM's mask decoder (P2SAM uses 8 instead of SAM's 3).

SAM's ``MaskDecoder`` holds one learned output token per mask (token 0 is the single-mask output, tokens
``1..3`` the multimask ones), one hypernetwork MLP per token and one IoU-head output per token.
:func:`expand_multimask_outputs` resizes all three to ``num_multimask_outputs + 1`` tokens after the pretrained
weights have loaded into the standard 3-output decoder: a new multimask token ``j`` starts as a copy of
pretrained multimask token ``1 + (j - 1) % 3`` (its MLP and IoU row too), so every new output starts as a
duplicate of a pretrained one and training makes them differ.

The resized decoder does *not* reproduce the 3-output decoder's masks: the output tokens attend to each other
in the two-way transformer, so the duplicates change every token's attention weights. On the shipped
LiteMedSAM and a box-prompted ellipse, 8 outputs moved the first three multimask logits by up to 0.3 and the
single-mask logits by up to 28 (Dice 0.94 between the single masks). Resize before fine-tuning the decoder,
as P2SAM does, not as a drop-in change to a pretrained model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["expand_multimask_outputs", "multimask_token_sources"]


def multimask_token_sources(current: int, target: int) -> list[int]:
    """Which current output token each token of a decoder with ``target`` multimask outputs starts from.

    Args:
        current: the decoder's multimask outputs now (3 for a pretrained SAM).
        target: the multimask outputs wanted.

    Returns:
        ``target + 1`` token indices: ``0`` (the single-mask token) first, then ``1 + (j - 1) % current`` for
        ``j = 1..target`` (the identity for ``j <= current``; shrinking keeps the first ``target``).

    Raises:
        ValueError: when either count is below 1.
    """
    if current < 1 or target < 1:
        raise ValueError(f"a mask decoder needs at least 1 multimask output, got {current} -> {target}")
    return [0] + [1 + (j - 1) % current for j in range(1, target + 1)]


def expand_multimask_outputs(mask_decoder: nn.Module, num_multimask_outputs: int) -> nn.Module:
    """Give a segment-anything ``MaskDecoder`` ``num_multimask_outputs`` multimask outputs, in place.

    ``mask_tokens``, ``output_hypernetworks_mlps`` and the last linear layer of ``iou_prediction_head`` grow (or
    shrink) to ``num_multimask_outputs + 1`` tokens, new ones copied as :func:`multimask_token_sources` says,
    and ``num_multimask_outputs`` / ``num_mask_tokens`` are updated, so ``forward(multimask_output=True)``
    (which returns tokens ``1:``) returns ``num_multimask_outputs`` masks. The single-mask output (token 0) and
    every kept token are unchanged. With the decoder's current count this is a no-op. New parameters keep the
    old ones' device, dtype and ``requires_grad``.

    Load pretrained SAM weights before calling this (they fit the 3-output decoder); a state dict saved from the
    resized decoder loads strictly into one resized the same way.

    Args:
        mask_decoder: segment-anything ``MaskDecoder`` (modified in place).
        num_multimask_outputs: multimask outputs wanted, at least 1 (fewer than the current count keeps the
            first ones).

    Returns:
        ``mask_decoder``.

    Raises:
        ValueError: when ``num_multimask_outputs`` is below 1.
    """
    current = int(mask_decoder.num_multimask_outputs)
    sources = multimask_token_sources(current, int(num_multimask_outputs))
    if len(sources) == current + 1:
        return mask_decoder
    index = torch.tensor(sources, device=mask_decoder.mask_tokens.weight.device)
    with torch.no_grad():
        old_tokens = mask_decoder.mask_tokens
        tokens = nn.Embedding(len(sources), old_tokens.embedding_dim)
        tokens.weight = nn.Parameter(old_tokens.weight[index].clone(), requires_grad=old_tokens.weight.requires_grad)
        mask_decoder.mask_tokens = tokens

        old_mlps = mask_decoder.output_hypernetworks_mlps
        mask_decoder.output_hypernetworks_mlps = nn.ModuleList(
            old_mlps[s] if j == s else copy.deepcopy(old_mlps[s]) for j, s in enumerate(sources)
        )

        layers = mask_decoder.iou_prediction_head.layers
        old_out = layers[-1]
        out = nn.Linear(old_out.in_features, len(sources), bias=old_out.bias is not None)
        out.weight = nn.Parameter(old_out.weight[index].clone(), requires_grad=old_out.weight.requires_grad)
        if old_out.bias is not None:
            out.bias = nn.Parameter(old_out.bias[index].clone(), requires_grad=old_out.bias.requires_grad)
        layers[-1] = out
    mask_decoder.num_multimask_outputs = len(sources) - 1
    mask_decoder.num_mask_tokens = len(sources)
    return mask_decoder
