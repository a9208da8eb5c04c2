"""SeqSAM (Towle, Chen & Zhou, 2025; reference code BenjaminTowle/SeqSAM): SAM made autoregressive. Each step
decodes one mask from the same box, with the previous step's mask as SAM's mask prompt and a recurrent module
between the prompt encoder and the mask decoder, so that one image embedding gives a sequence of different
masks, as many as asked for."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.sam import DEFAULT_BACKBONE, DensePromptFactors, SamBackbone

__all__ = ["RecurrentPromptCell", "FoldedPromptCell", "SequentialSam"]


class FoldedPromptCell(NamedTuple):
    """:class:`RecurrentPromptCell`'s two convolutions folded onto one kind of dense prompt
    (:meth:`RecurrentPromptCell.fold`): ``2C`` outputs, ``to_dense``'s first, and ``C + c`` inputs, the hidden
    state's first, then the prompt's ``c`` feature channels (``c = 0`` for a prompt without features).

    The prompt's offset and the convolutions' biases give a constant map: one value per channel inside the
    grid (``interior``), another within ``k // 2`` of its edges, where the zero padding cuts the offset off
    (``interior + border``).

    Attributes:
        weight: ``(2C, C + c, k, k)`` on ``[h_m ; features]``.
        interior: ``(2C,)`` the constant map away from the edges.
        border: ``(1, 2C, h, w)`` the constant map minus ``interior`` (zero away from the edges).
    """

    weight: torch.Tensor
    interior: torch.Tensor
    border: torch.Tensor


class RecurrentPromptCell(nn.Module):
    """SeqSAM's recurrent module: ``[dense ; h_m] -> (dense'_m, h_{m+1})`` by two 3x3 convolutions.

    Both convolutions read the ``2C`` channels of the step's dense prompt embedding concatenated with the hidden
    state (``512 -> 256`` for the SAM family); one gives the dense prompt embedding the mask decoder uses at this
    step, the other the next hidden state. As in the reference code there is no activation: the non-linearity
    of the recurrence is SAM's own prompt encoder and mask decoder (the next step's mask prompt is this step's
    mask). ``h_0 = 0``: a first step (``hidden=None``) reads only the dense half of the weights, which gives the
    same result at half the cost.

    :meth:`forward` takes the dense embedding itself (the paper's formulation); :meth:`forward_factored` takes it
    in SAM's factored form and gives the same result at a fraction of the cost (what :class:`SequentialSam` runs).

    Args:
        channels: ``C``, the channels of the dense prompt embedding (``backbone.embedding_dim``, 256).
        kernel_size: odd spatial size of both convolutions (3).
        identity_init: initialise the dense output to pass the dense embedding through unchanged (centre tap
            identity on the dense channels, zero on the hidden channels, zero bias), so that an untrained cell
            leaves the pretrained SAM's behaviour intact; ``False`` keeps PyTorch's default initialisation (the
            reference code's). The hidden-state convolution keeps PyTorch's default initialisation either way.

    Raises:
        ValueError: on a non-positive ``channels`` or an even ``kernel_size``.
    """

    def __init__(self, channels: int = 256, kernel_size: int = 3, identity_init: bool = True) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"channels must be positive and kernel_size odd, got {channels}, {kernel_size}")
        self.channels = int(channels)
        self.to_dense = nn.Conv2d(2 * self.channels, self.channels, kernel_size, padding=kernel_size // 2)
        self.to_hidden = nn.Conv2d(2 * self.channels, self.channels, kernel_size, padding=kernel_size // 2)
        if identity_init:
            with torch.no_grad():
                self.to_dense.weight.zero_()
                self.to_dense.bias.zero_()
                centre = kernel_size // 2
                self.to_dense.weight[:, :, centre, centre][:, : self.channels] = torch.eye(self.channels)

    @staticmethod
    def _conv(conv: nn.Conv2d, dense: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is None:  # h = 0: only the dense half of the input channels contributes
            return F.conv2d(dense, conv.weight[:, : dense.shape[1]], conv.bias, padding=conv.padding)
        return conv(torch.cat([dense, hidden], dim=1))

    def forward(
        self, dense: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step.

        Args:
            dense: ``(B, C, h, w)`` the step's dense prompt embedding (SAM's prompt encoder output).
            hidden: ``(B, C, h, w)`` the hidden state ``h_m``, or ``None`` for ``h_0 = 0``.

        Returns:
            ``dense' (B, C, h, w)`` for the mask decoder and the next hidden state ``(B, C, h, w)``.

        Raises:
            ValueError: when ``dense`` does not have ``C`` channels or ``hidden`` does not match it.
        """
        if dense.ndim != 4 or dense.shape[1] != self.channels:
            raise ValueError(f"expected dense of shape (B, {self.channels}, h, w), got {tuple(dense.shape)}")
        if hidden is not None and hidden.shape != dense.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} must have the shape of dense {tuple(dense.shape)}")
        return self._conv(self.to_dense, dense, hidden), self._conv(self.to_hidden, dense, hidden)

    def fold(self, prompt: DensePromptFactors) -> FoldedPromptCell:
        """Both convolutions stacked (``to_dense`` then ``to_hidden``) and folded onto one kind of dense prompt.

        The convolutions are linear, so their dense half can act on the factors of the embedding
        (``projection @ features + offset``, see :class:`~ambisam.sam.DensePromptFactors`): its weight times the
        ``1 x 1`` projection reads the ``c = 16`` feature channels instead of ``C = 256``, and the offset, repeated
        over the grid and zero-padded like the embedding, becomes a constant map computed here once. The fold
        depends on the prompt's projection and offset, not on its features, so one fold serves every step whose
        mask prompt goes through the same layer (every step after the first).

        Args:
            prompt: a dense prompt of the kind to fold onto.

        Returns:
            :class:`FoldedPromptCell` for :meth:`forward_factored`.

        Raises:
            ValueError: when the prompt does not have ``C`` channels.
        """
        if prompt.offset.shape != (self.channels,):
            raise ValueError(f"expected a dense prompt of {self.channels} channels, got {tuple(prompt.offset.shape)}")
        weight = torch.cat([self.to_dense.weight, self.to_hidden.weight])  # (2C, 2C, k, k): [dense ; h] inputs
        bias = torch.cat([self.to_dense.bias, self.to_hidden.bias])
        on_dense, on_hidden = weight[:, : self.channels], weight[:, self.channels :]
        inside = prompt.offset.new_ones(1, 1, *prompt.size)  # the grid's indicator: zero padding outside it
        on_offset = torch.einsum("oikl,i->okl", on_dense, prompt.offset)  # (2C, k, k)
        constant = F.conv2d(inside, on_offset[:, None], bias, padding=self.to_dense.padding)
        interior = bias + on_offset.sum(dim=(1, 2))
        if prompt.features is None:
            folded = on_hidden.contiguous()
        elif prompt.projection is None:
            folded = torch.cat([on_hidden, on_dense], dim=1)
        else:
            folded = torch.cat([on_hidden, torch.einsum("oikl,if->ofkl", on_dense, prompt.projection)], dim=1)
        return FoldedPromptCell(folded, interior, constant - interior.view(1, -1, 1, 1))

    @staticmethod
    def _add_border(out: torch.Tensor, border: torch.Tensor, width: int) -> torch.Tensor:
        """``out += border`` where ``border`` can be non-zero: the strips ``width`` wide along the grid's edges."""
        h, w = out.shape[-2:]
        if h <= 2 * width or w <= 2 * width:
            return out.add_(border)
        for rows, cols in ((slice(None, width), slice(None)), (slice(h - width, None), slice(None)),
                           (slice(width, h - width), slice(None, width)), (slice(width, h - width), slice(w - width, None))):
            out[..., rows, cols] += border[..., rows, cols]
        return out

    def forward_factored(
        self,
        prompt: DensePromptFactors,
        hidden: torch.Tensor | None = None,
        next_hidden: bool = True,
        folded: FoldedPromptCell | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step on SAM's dense prompt embedding in factored form: :meth:`forward`'s result at a fraction of
        its cost.

        Only the hidden half of the convolutions runs on ``C`` channels (and not at all at the first step,
        ``h_1 = 0``); the dense half runs on the prompt's thin features (:meth:`fold`). Equal to
        ``forward(prompt.materialize(), hidden)`` up to float rounding, gradients included.

        Args:
            prompt: the step's dense prompt embedding, from :meth:`SamBackbone.dense_prompt_factors`.
            hidden: ``(B, C, h, w)`` the hidden state ``h_m``, or ``None`` for ``h_0 = 0``.
            next_hidden: compute ``h_{m+1}``; ``False`` at the last step, where it would go unused.
            folded: ``fold(p)`` of a prompt ``p`` of the same kind (same projection and offset, features or none
                alike), to reuse over steps; folded here when ``None``.

        Returns:
            ``dense' (B, C, h, w)`` and the next hidden state ``(B, C, h, w)`` (``None`` without ``next_hidden``).

        Raises:
            ValueError: when the prompt does not have ``C`` channels or ``hidden`` does not match it.
        """
        folded = self.fold(prompt) if folded is None else folded
        shape = (prompt.batch_size, self.channels, *prompt.size)
        if hidden is not None and tuple(hidden.shape) != shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} must have the shape of the dense prompt {shape}")
        outputs = 2 * self.channels if next_hidden else self.channels
        weight, interior = folded.weight[:outputs], folded.interior[:outputs]
        if hidden is None and prompt.features is None:
            out = (interior.view(1, -1, 1, 1) + folded.border[:, :outputs]).expand(prompt.batch_size, -1, -1, -1)
        else:
            # one convolution over [h_m ; features] (or whichever there is), the interior value as its bias
            if hidden is None:
                inputs, weight = prompt.features, weight[:, self.channels :]
            elif prompt.features is None:
                inputs, weight = hidden, weight[:, : self.channels]
            else:
                inputs = torch.cat([hidden, prompt.features], dim=1)
            out = F.conv2d(inputs, weight, interior, padding=self.to_dense.padding)
            out = self._add_border(out, folded.border[:, :outputs], self.to_dense.padding[0])
        return out[:, : self.channels], (out[:, self.channels :] if next_hidden else None)


class SequentialSam(MaskSamplingNetwork):
    """Box-prompted SAM that decodes a sequence of masks, step ``m`` conditioned on step ``m - 1``.

    Step ``m = 1 .. M`` of :meth:`decode_steps`, for every image of the batch at once:

    1. SAM's prompt encoder embeds the box (the same at every step) and the mask prompt: step ``m - 1``'s
       low-resolution logits (``backbone.mask_size``; none at step 1, i.e. SAM's learned no-mask embedding);
    2. the :class:`RecurrentPromptCell` maps ``[dense ; h_m]`` to this step's dense embedding and ``h_{m+1}``
       (``h_1 = 0``);
    3. one mask decoder call (``backbone.decode``, SAM's single-mask output) gives step ``m``'s logits.

    How it is computed (the same result, a third less time per step on a CPU): the box is embedded once, and
    the cell runs on the dense embedding in factored form (:meth:`RecurrentPromptCell.forward_factored`), so
    that only its hidden-state half works on all 256 channels and the last step skips the unused ``h_{M+1}``.

    The steps are deterministic given the embedding: the sequence itself is the set of hypotheses, and any
    ``M`` can be asked for at inference without retraining. The image encoder is frozen (training runs from
    cached embeddings); the prompt encoder, the mask decoder and the recurrent module are trained with a set loss
    against all raters (:class:`~ambisam.losses.HungarianSetLoss`, ``M = max(K, num_train_steps)`` steps per
    image, as SeqSAM trains with ``M = max(K, 4)``).

    **Departure from the reference code: the recurrent module starts as the identity on the dense embedding**
    (``identity_init``), so that training starts from the pretrained SAM rather than from a randomly projected
    dense prompt; the architecture is the reference's. Gradients flow through the mask-prompt chain, as in the
    reference (``detach_mask_prompt=True`` is its "stop gradients" ablation).

    Args:
        backbone: a built :class:`~ambisam.sam.SamBackbone` or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        num_train_steps: the minimum number of steps in training (4); ``max(K, num_train_steps)`` are decoded.
        identity_init: see :class:`RecurrentPromptCell`.
        detach_mask_prompt: stop gradients through the mask prompt from one step to the next.

    Raises:
        ValueError: on ``num_train_steps < 1``.
    """

    capabilities = MethodCapabilities(training_target="raters", stochastic=False)

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        num_train_steps: int = 4,
        identity_init: bool = True,
        detach_mask_prompt: bool = False,
    ) -> None:
        super().__init__(backbone, checkpoint)
        if num_train_steps < 1:
            raise ValueError(f"num_train_steps must be at least 1, got {num_train_steps}")
        self.num_train_steps = int(num_train_steps)
        self.detach_mask_prompt = bool(detach_mask_prompt)
        self.recurrent = RecurrentPromptCell(self.backbone.embedding_dim, 3, identity_init=identity_init)

    def decode_steps(self, embeddings: torch.Tensor, boxes: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Decode ``num_steps`` masks per image, in order, one mask decoder call per step for the whole batch.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            boxes: ``(B, 4)`` boxes in backbone input coordinates.
            num_steps: ``M >= 1``.

        Returns:
            ``(B, M, 4h, 4w)`` low-resolution mask logits, step 1 first.

        Raises:
            ValueError: when ``boxes`` is not ``(B, 4)`` or ``num_steps < 1``.
        """
        b = embeddings.shape[0]
        if boxes is None or tuple(boxes.shape) != (b, 4):
            raise ValueError(f"expected boxes of shape ({b}, 4), got {None if boxes is None else tuple(boxes.shape)}")
        if num_steps < 1:
            raise ValueError(f"the number of steps must be at least 1, got {num_steps}")
        sparse, _ = self.backbone.embed_prompts(boxes=boxes)  # (B, T, C): the box tokens, the same at every step
        steps: list[torch.Tensor] = []
        hidden = None
        mask_prompt = None
        folds: dict[bool, FoldedPromptCell] = {}  # the cell folded onto "no mask" (step 1) and onto a mask prompt
        for m in range(num_steps):
            prompt = self.backbone.dense_prompt_factors(mask_prompt, batch_size=b)  # step m - 1's logits, or none
            kind = mask_prompt is not None
            if kind not in folds:
                folds[kind] = self.recurrent.fold(prompt)
            dense, hidden = self.recurrent.forward_factored(prompt, hidden, m < num_steps - 1, folds[kind])
            logits, _ = self.backbone.decode(embeddings, sparse, dense, multimask=False)  # (B, 1, 4h, 4w)
            steps.append(logits)
            mask_prompt = logits.detach() if self.detach_mask_prompt else logits
        return torch.cat(steps, dim=1)

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """The first ``num_samples`` steps of the sequence (deterministic given the embedding and the box).

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            conditions: ``boxes (B, 4)`` in backbone input coordinates.
            num_samples: ``M >= 1``.

        Returns:
            ``(B, M, 4h, 4w)`` low-resolution mask logits, step 1 first.
        """
        return self.decode_steps(embeddings, conditions.boxes, num_samples)

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``M = max(K, num_train_steps)`` steps per image for the set loss.

        Args (as :meth:`MaskSamplingNetwork.compute_training_outputs`, ``conditions.boxes`` the prompt):
            targets: ``(B, K, S, S)`` every rater's mask (only ``K`` is read here).

        Returns:
            ``{"logits": (B, M, 4h, 4w)}``, step 1 first.

        """
        num_steps = max(int(targets.shape[1]), self.num_train_steps)
        return {"logits": self.decode_steps(embeddings, conditions.boxes, num_steps)}
