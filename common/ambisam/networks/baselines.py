"""Training-free baselines on the box-prompted SAM backbone, the field's usual ways of getting several masks out
of a deterministic model (the plain single-mask baseline is :class:`~ambisam.networks.BoxPromptedSam`):

- :class:`MultimaskSam`: SAM's own three multimask outputs as three hypotheses, tiled to ``N``;
- :class:`PromptJitterSam`: a prompt-jitter ensemble, ``N`` randomly perturbed boxes decoded from one embedding;
- :class:`McDropoutSam`: Monte Carlo dropout in the mask decoder, switched on at sampling time only.

Each draws all of its ``N`` samples from one image embedding in one mask decoder call per image, like every
method here, and has no trainable parameters of its own: the SAM weights are used as they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.sam import DEFAULT_BACKBONE, SamBackbone

__all__ = ["MultimaskSam", "PromptJitterSam", "McDropoutSam", "DROPOUT_SITES"]


class MultimaskSam(MaskSamplingNetwork):
    """SAM's three multimask outputs (its answer to an ambiguous prompt) as three hypotheses.

    The three masks of one box are ordered by SAM's own predicted IoU, best first, and tiled to ``N``: sample
    ``i`` is the ``(i mod 3)``-th best, so ``N = 1`` gives the mask SAM's predictor would pick, and when ``N`` is
    not a multiple of 3 the better-scored masks get the extra copies.

    Args: as :class:`~ambisam.networks.base.MaskSamplingNetwork`.
    """

    capabilities = MethodCapabilities(training_target=None, stochastic=False)
    num_hypotheses: int = 3

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """The three multimask outputs, best predicted IoU first, tiled to ``num_samples``.

        Args and shapes as :meth:`MaskSamplingNetwork.draw_samples` (``conditions.boxes`` checked by the base class).

        Returns:
            ``(B, N, 4h, 4w)`` logits; at most three distinct masks per image.

        """
        boxes = conditions.boxes
        logits, scores = self.backbone.decode_boxes(embeddings, boxes, multimask=True)  # (B, 3, s, s), (B, 3)
        order = scores.argsort(dim=1, descending=True)  # (B, 3)
        pick = order[:, torch.arange(num_samples, device=order.device) % logits.shape[1]]  # (B, N)
        return torch.gather(logits, 1, pick[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))


class PromptJitterSam(MaskSamplingNetwork):
    """A prompt-jitter ensemble: ``N`` randomly perturbed copies of the box, all decoded from one embedding.

    Each coordinate of each copy moves independently by a uniform random amount in ``[-r w, r w]`` (x) or
    ``[-r h, r h]`` (y), ``w, h`` the box's width and height and ``r = ratio``, with at least ``min_shift``
    pixels of backbone input (so a box of a few pixels still moves); the corners are then clipped to the input
    and kept ordered. This is the prompt augmentation of UR-SAM (step 2 of its Algorithm 1) as a stand-alone
    sampler; the ensemble's mean and entropy are what the inferer computes from the samples.

    In eval mode with ``N = 1`` the box is decoded as given (``forward`` stays deterministic and equals the
    baseline).

    Args:
        backbone: a built backbone or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        ratio: the largest shift as a fraction of the box's side.
        min_shift: the largest shift is at least this many pixels of backbone input.

    Raises:
        ValueError: on a negative ``ratio`` or ``min_shift``.
    """

    capabilities = MethodCapabilities(training_target=None)

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        ratio: float = 0.1,
        min_shift: float = 2.0,
    ) -> None:
        super().__init__(backbone, checkpoint)
        if ratio < 0 or min_shift < 0:
            raise ValueError(f"ratio and min_shift must be non-negative, got {ratio}, {min_shift}")
        self.ratio = float(ratio)
        self.min_shift = float(min_shift)

    def shift_limit(self, boxes: torch.Tensor) -> torch.Tensor:
        """The largest shift of each coordinate: ``ratio`` times the box's width (x) or height (y), at least
        ``min_shift``.

        Args:
            boxes: ``(B, 4)`` float boxes.

        Returns:
            ``(B, 4)`` in pixels of backbone input.
        """
        size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)  # (B, 2): w, h
        return (self.ratio * size).clamp(min=self.min_shift).repeat(1, 2)  # (B, 4): w, h, w, h

    def jitter_boxes(self, boxes: torch.Tensor, num_samples: int, conditions: Conditions | None = None) -> torch.Tensor:
        """``num_samples`` perturbed copies of each box.

        Args:
            boxes: ``(B, 4)`` ``[x_min, y_min, x_max, y_max]`` in backbone input coordinates.
            num_samples: ``N``.
            conditions: the batch's conditions: with ``noise_seeds`` each image's shifts come from its seed (the
                slices of one volume and structure share a seed: the same shifts, a whole case reproducible in
                any order or rank); without, from torch's global generator.

        Returns:
            ``(B, N, 4)`` boxes inside ``[0, S - 1]``, ``min <= max`` on both axes.
        """
        boxes = boxes.float()
        limit = self.shift_limit(boxes)  # (B, 4)
        draws = (conditions or Conditions()).uniform(boxes.shape[0], num_samples, 4, device=boxes.device)
        noise = (draws * 2 - 1) * limit[:, None]
        moved = (boxes[:, None] + noise).clamp(0, self.backbone.image_size - 1)
        low = torch.minimum(moved[..., :2], moved[..., 2:])
        high = torch.maximum(moved[..., :2], moved[..., 2:])
        return torch.cat([low, high], dim=-1)

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """One mask per perturbed box, every box of an image decoded from its one embedding.

        Args and shapes as :meth:`MaskSamplingNetwork.draw_samples` (``conditions.boxes`` checked by the base class).

        Returns:
            ``(B, N, 4h, 4w)`` logits.

        """
        boxes = conditions.boxes
        if num_samples == 1 and not self.training:
            prompts = boxes.float()[:, None]
        else:
            prompts = self.jitter_boxes(boxes, num_samples, conditions)
        b, n = prompts.shape[:2]
        logits, _ = self.backbone.decode_boxes(embeddings, prompts.reshape(b * n, 4))  # (B * N, 1, s, s)
        return logits.view(b, n, *logits.shape[-2:])


#: where :class:`McDropoutSam` can drop units in SAM's mask decoder (module paths inside ``mask_decoder``)
DROPOUT_SITES = {
    # the hidden units of the token MLP of each two-way attention block (MLPBlock: lin1 -> act -> lin2)
    "mlp": lambda decoder: [block.mlp.act for block in decoder.transformer.layers],
    # the hidden layers of the hypernetwork MLPs that turn the mask tokens into the mask's dynamic weights
    # (their output enters a ReLU; dropout before a ReLU is dropout after it, since ReLU(0) = 0)
    "hypernetwork": lambda decoder: [layer for mlp in decoder.output_hypernetworks_mlps for layer in mlp.layers[:-1]],
    # the outputs of the token-side attention layers (self-attention, token-to-image cross-attention)
    "attention": lambda decoder: [
        attn
        for block in decoder.transformer.layers
        for attn in (block.self_attn, block.cross_attn_token_to_image)
    ]
    + [decoder.transformer.final_attn_token_to_image],
}


class McDropoutSam(MaskSamplingNetwork):
    """Monte Carlo dropout in SAM's mask decoder (Gal & Ghahramani, 2016), at sampling time only.

    SAM's decoder has no dropout layers; this network drops units of chosen decoder layers by forward hooks
    that apply :func:`torch.nn.functional.dropout` to those modules' outputs (:data:`DROPOUT_SITES`), so
    SAM's code and weights stay as they are. The hooks exist only during a sampling call and act only on it:
    the box prompt is repeated ``N`` times, grouped by image, and decoded together per image; every copy gets
    its own dropout mask, hence its own mask sample.

    With ``dropout_at_sampling = False``, or in eval mode with ``N = 1`` (``forward``), no unit is dropped and
    the output is the deterministic baseline's.

    Args:
        backbone: a built backbone or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        dropout: the probability of dropping a unit.
        sites: names in :data:`DROPOUT_SITES`.

    Raises:
        ValueError: on ``dropout`` outside ``[0, 1)`` or an unknown site.
    """

    capabilities = MethodCapabilities(training_target=None)

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        dropout: float = 0.1,
        sites: Sequence[str] = ("mlp", "hypernetwork"),
    ) -> None:
        super().__init__(backbone, checkpoint)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        unknown = sorted(set(sites) - set(DROPOUT_SITES))
        if unknown or not sites:
            raise ValueError(f"sites must be a non-empty subset of {sorted(DROPOUT_SITES)}, got {list(sites)}")
        self.dropout = float(dropout)
        self.sites = tuple(sites)
        self.dropout_at_sampling = True

    def dropout_modules(self) -> list[nn.Module]:
        """The decoder modules whose outputs are dropped."""
        decoder = self.backbone.mask_decoder
        return [m for site in self.sites for m in DROPOUT_SITES[site](decoder)]

    @contextlib.contextmanager
    def dropout_enabled(self) -> Iterator[None]:
        """Within the block, the chosen decoder modules' outputs go through dropout."""

        def drop(_module: nn.Module, _inputs, output):
            if isinstance(output, torch.Tensor):
                return F.dropout(output, self.dropout, training=True)
            return output

        handles = [m.register_forward_hook(drop) for m in self.dropout_modules()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``N`` decodings of the box under independent dropout masks, decoded together per image.

        Args and shapes as :meth:`MaskSamplingNetwork.draw_samples` (``conditions.boxes`` checked by the base class).

        Returns:
            ``(B, N, 4h, 4w)`` logits (identical along ``N`` when dropout is off).

        """
        boxes = conditions.boxes
        b = embeddings.shape[0]
        stochastic = self.dropout_at_sampling and self.dropout > 0 and (num_samples > 1 or self.training)
        if not stochastic:
            logits, _ = self.backbone.decode_boxes(embeddings, boxes)
            return logits.expand(-1, num_samples, -1, -1)
        sparse, dense = self.backbone.embed_prompts(boxes=boxes.float())
        sparse = sparse.repeat_interleave(num_samples, dim=0)  # (B * N, T, C), grouped by image
        dense = dense.repeat_interleave(num_samples, dim=0)
        with self.dropout_enabled():
            logits, _ = self.backbone.decode(embeddings, sparse, dense)  # (B * N, 1, s, s)
        return logits.view(b, num_samples, *logits.shape[-2:])
