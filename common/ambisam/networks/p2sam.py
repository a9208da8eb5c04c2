"""P2SAM, Probabilistic Prompt generation for SAM (seed 001; reference code yu2hi13/P2SAM, built on SAMed): a
prompt-free SAM adapted in a first stage, then made stochastic in a second by a learned distribution over its
dense prompt embedding.

- :class:`DiversityAwareAssembling`: the learned convex-ish combination (weights summing to 1) of the decoder's
  8 multimask logits into one;
- :class:`PromptGenerationNetwork`: image -> axis-aligned Gaussian over a 256-d prompt code;
- :class:`DensePromptMapping`: (SAM's default dense prompt, a prompt code) -> the dense prompt embedding that
  replaces it;
- :class:`P2Sam`: the method network, stage 1 or stage 2.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn
from torch.utils.checkpoint import checkpoint

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.latent import AxisAlignedGaussianEncoder
from ambisam.sam import (
    DEFAULT_BACKBONE,
    FusedQKVLoRA,
    SamBackbone,
    add_qv_lora,
    build_backbone,
    expand_multimask_outputs,
    merge_lora,
    qkv_rows,
)

__all__ = ["P2Sam", "DiversityAwareAssembling", "PromptGenerationNetwork", "DensePromptMapping",
           "set_block_checkpointing"]


class DiversityAwareAssembling(nn.Module):
    """``M = sum_i w_i M_i`` over ``num_masks`` mask logits, with weights that sum to 1.

    As in the reference code, ``num_masks - 1`` weights are free parameters initialised to ``1 / num_masks``
    and the **first** weight is ``1 - sum(free)`` (no positivity constraint), so the weights start uniform.

    Args:
        num_masks: masks to combine (8 for P2SAM), at least 1.

    Raises:
        ValueError: when ``num_masks`` is below 1.
    """

    def __init__(self, num_masks: int = 8) -> None:
        super().__init__()
        if num_masks < 1:
            raise ValueError(f"num_masks must be at least 1, got {num_masks}")
        self.num_masks = int(num_masks)
        self.free_weights = nn.Parameter(torch.full((self.num_masks - 1,), 1.0 / self.num_masks))

    @property
    def weights(self) -> torch.Tensor:
        """``(num_masks,)`` the combination weights, ``weights.sum() == 1``."""
        return torch.cat([1 - self.free_weights.sum().unsqueeze(0), self.free_weights])

    def forward(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Combine the masks.

        Args:
            mask_logits: ``(B, num_masks, H, W)``.

        Returns:
            ``(B, 1, H, W)``.

        Raises:
            ValueError: when dimension 1 is not ``num_masks``.
        """
        if mask_logits.ndim < 2 or mask_logits.shape[1] != self.num_masks:
            raise ValueError(f"expected (B, {self.num_masks}, ...) masks, got {tuple(mask_logits.shape)}")
        weights = self.weights.to(mask_logits.dtype).view(1, -1, *([1] * (mask_logits.ndim - 2)))
        return (mask_logits * weights).sum(dim=1, keepdim=True)


class PromptGenerationNetwork(AxisAlignedGaussianEncoder):
    """P2SAM's Prompt Generation Network: a one-channel image -> ``N(mu, diag sigma^2)`` over a prompt code.

    The architecture of the reference code's prior (Probabilistic U-Net style): blocks of ``convs_per_block``
    3x3 convolutions (ReLU) with ``channels`` filters, 2x2 average pooling before every block but the first,
    then (from :class:`~ambisam.networks.latent.AxisAlignedGaussianEncoder`) a global mean, a 1x1 convolution to
    ``2 * latent_dim`` channels (mean and log sigma) and ``log sigma`` clamped to ``log_sigma_clamp``.

    The image is first resized (bilinear, antialiased) to ``image_size x image_size`` (128: the reference code's
    input, LIDC's lesion crops); a 3-channel image is averaged to one channel.

    Args:
        latent_dim: dimension of the prompt code (256, SAM's embedding dimension).
        channels: filters of the blocks.
        convs_per_block: 3x3 convolutions per block.
        image_size: the grid the image is resized to.
        log_sigma_clamp: ``(min, max)`` of ``log sigma``.

    Raises:
        ValueError: as :class:`~ambisam.networks.latent.AxisAlignedGaussianEncoder`, or when ``convs_per_block``
            or ``image_size`` is below 1.
    """

    def __init__(
        self,
        latent_dim: int = 256,
        channels: Sequence[int] = (32, 64, 128, 192),
        convs_per_block: int = 3,
        image_size: int = 128,
        log_sigma_clamp: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        super().__init__(1, latent_dim, channels, log_sigma_clamp)
        if convs_per_block < 1 or image_size < 1:
            raise ValueError(f"convs_per_block and image_size must be positive, got {convs_per_block}, {image_size}")
        self.image_size = int(image_size)
        layers: list[nn.Module] = []
        previous = 1
        for i, out in enumerate(int(c) for c in channels):
            if i:
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True))
            for _ in range(convs_per_block):
                layers.append(Convolution(2, previous, out, kernel_size=3, act="RELU", norm=None))
                previous = out
        self.features = nn.Sequential(*layers)  # replaces the strided stages of the parent

    def forward(self, images: torch.Tensor) -> torch.distributions.Independent:
        """The prompt distribution of each image.

        Args:
            images: ``(B, 1 | 3, H, W)`` in ``[0, 1]``, any ``H, W``.

        Returns:
            ``Independent(Normal(mu, sigma), 1)``, ``mu`` and ``sigma`` ``(B, latent_dim)``.

        Raises:
            ValueError: when ``images`` is not ``(B, 1 | 3, H, W)``.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = (images.as_tensor() if hasattr(images, "as_tensor") else images).float().mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return super().forward(x)


class DensePromptMapping(nn.Module):
    """``1x1`` convolutions from SAM's default dense prompt and a tiled prompt code to a new dense prompt.

    The input at every grid cell is ``concat(dense, z)`` (``C + L`` channels, 512 for SAM), mapped by
    ``num_convs`` 1x1 convolutions (``C + L -> C``, then ``C -> C``, ReLU between them, none after the last).
    SAM's default dense prompt (the no-mask embedding) and the tiled code are the same at every cell, so the
    convolutions run on one ``1 x 1`` cell per prompt and the result is expanded over the grid: the same values
    as on the full grid, without ``h * w`` times the work.

    With ``residual`` (default) the result is **added** to the default dense prompt and the last convolution
    starts at ``residual_init_scale`` times PyTorch's default initialisation, so stage 2 starts close to stage 1's
    masks, each prompt draw moving them a little, and learns from there; without, the result **replaces** the
    default prompt (the reference code, orthogonally initialised there), and stage 2 starts from whatever masks
    the untrained mapping gives (on LiteMedSAM: none, every logit below zero), which its learning rate of 1e-5 takes
    many epochs to undo. Both map ``(dense, z)`` to a dense prompt: the residual form is a re-parameterisation.

    Args:
        embedding_dim: ``C``.
        latent_dim: ``L``.
        num_convs: convolutions, at least 2 (3 in the paper's description; the reference code's default is 4).
        residual: add to the default dense prompt (default) instead of replacing it.
        residual_init_scale: with ``residual``, the factor on the last convolution's initial weights and bias.

    Raises:
        ValueError: when ``num_convs`` is below 2.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        latent_dim: int = 256,
        num_convs: int = 3,
        residual: bool = True,
        residual_init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if num_convs < 2:
            raise ValueError(f"num_convs must be at least 2, got {num_convs}")
        self.embedding_dim = int(embedding_dim)
        self.latent_dim = int(latent_dim)
        self.residual = bool(residual)
        sizes = [self.embedding_dim + self.latent_dim] + [self.embedding_dim] * num_convs
        self.layers = nn.Sequential(*(
            Convolution(2, sizes[i], sizes[i + 1], kernel_size=1, act="RELU", norm=None, conv_only=i == num_convs - 1)
            for i in range(num_convs)
        ))
        if self.residual:
            last = self.layers[-1].conv
            with torch.no_grad():
                last.weight.mul_(residual_init_scale)
                last.bias.mul_(residual_init_scale)

    def forward(self, dense: torch.Tensor, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The dense prompt embeddings.

        Args:
            dense: ``(C,)`` or ``(P, C)`` the dense prompt at every cell (SAM's no-mask embedding).
            latents: ``(P, L)`` one prompt code per prompt.
            size: ``(h, w)`` of the embedding grid.

        Returns:
            ``(P, C, h, w)``.
        """
        dense = dense.expand(latents.shape[0], -1) if dense.ndim == 1 else dense
        cell = torch.cat([dense.to(latents.dtype), latents], dim=1)[:, :, None, None]  # (P, C + L, 1, 1)
        mapped = self.layers(cell)
        if self.residual:
            mapped = mapped + dense.to(mapped.dtype)[:, :, None, None]
        return mapped.expand(-1, -1, *size)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward.__get__(block)
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def set_block_checkpointing(encoder: nn.Module, enabled: bool = True) -> int:
    """Turn gradient checkpointing of an image encoder's blocks on or off, in place.

    Every module in a ``blocks`` ``nn.ModuleList`` (SAM ViT's ``blocks``, each TinyViT stage's ``blocks``) gets a
    forward that, in training mode with autograd on, runs under ``torch.utils.checkpoint`` (non-reentrant, so
    adapters inside a block get gradients even when the block's input needs none): its activations are recomputed
    in the backward pass instead of kept. State-dict keys do not change.

    Args:
        encoder: the image encoder.
        enabled: on or off.

    Returns:
        the number of blocks changed.
    """
    count = 0
    for module in encoder.modules():
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for block in blocks:
            if enabled:
                block.forward = functools.partial(_checkpointed_forward, block)
            else:
                block.__dict__.pop("forward", None)
            count += 1
    return count


class P2Sam(MaskSamplingNetwork):
    """P2SAM on a SAM-family backbone, in one of its two training stages.

    **Stage 1** (``stage=1``, adapt SAM): LoRA (``lora_rank``, on q and v of every fused ``qkv`` layer of the image
    encoder, :func:`~ambisam.sam.add_qv_lora`); the prompt encoder and the mask decoder train; the decoder has
    ``num_masks`` multimask outputs (:func:`~ambisam.sam.expand_multimask_outputs`), fused by
    ``assembling_weights`` (:class:`DiversityAwareAssembling`). The prompt is SAM's default prompt (no points, no
    box, the learned no-mask dense embedding). Deterministic: ``N`` samples are ``N`` copies of the fused mask.

    **Stage 2** (``stage=2``, probabilistic prompt): everything of stage 1 is frozen and the LoRA is merged into
    the encoder (:func:`~ambisam.sam.merge_lora`; the encoder is a plain frozen one, so the embedding cache
    applies); ``prompt_generator`` (:class:`PromptGenerationNetwork`) reads the image and gives
    ``N(mu_I, diag sigma_I^2)`` over a 256-d code; a reparameterised draw ``z = mu + sigma * eps`` (``eps`` from
    ``conditions.standard_normal``) goes with SAM's default dense prompt through ``dense_prompt_mapping``
    (:class:`DensePromptMapping`) to the dense prompt embedding that replaces the default one; the 8 masks are
    fused by the frozen ``assembling_weights``. ``N`` samples are ``N`` draws decoded from one image embedding.

    **Stage 2 from stage 1**: ``P2Sam(backbone_name, stage=2).load_state_dict(stage1.state_dict(), strict=False)``
    (what the stage runner does). A load pre-hook merges a stage-1 encoder's LoRA keys (``...qkv.base.weight``,
    ``...qkv.lora_*``) into the plain ``...qkv.weight`` / ``...qkv.bias`` of the stage-2 encoder, so every
    stage-1 weight arrives (the adapters merged); the stage-2-only layers are reported missing. A stage-2 state
    dict loads strictly into a stage-2 network. Passing a stage-1 network's backbone to a stage-2 constructor
    merges its adapters in place.

    Departures from the paper and the reference code:

    - the backbone is any SAM-family one (LiteMedSAM by default, 256 x 256 input, 64 x 64 embedding grid); the
      reference runs SAM ViT-B at 128 x 128 (an 8 x 8 grid);
    - the new mask tokens start as copies of the pretrained multimask tokens (``expand_multimask_outputs``); the
      reference code builds its 8 tokens with SAMed's ``num_classes=8`` (they are not loaded from the checkpoint);
    - ``log sigma`` of the prompt distribution is clamped (``log_sigma_clamp``; the reference does not clamp);
    - the layers use PyTorch's / MONAI's default initialisation (the reference: He-normal for the prompt
      generator, orthogonal for the mapping);
    - ``dense_prompt_mapping`` adds to SAM's default dense prompt, its last convolution starting small, so stage 2
      starts near stage 1's masks (``dense_residual=False``: it replaces the default prompt, as the reference);
    - ``dense_prompt_mapping`` has 3 convolutions by default as the paper says (``dense_convs=4`` is the
      reference code's default);
    - in eval mode with ``N = 1`` the Gaussian's mean is decoded (a deterministic ``forward``); the reference
      evaluates with random draws;
    - the prompt generator reads the image resized to ``prompt_image_size`` (128, the reference's input);
    - the reference ensembles 4 stage-2 snapshots at inference; this network is one snapshot
      (:class:`~ambisam.networks.SnapshotEnsemble` ensembles several).

    Args:
        backbone: a built :class:`~ambisam.sam.SamBackbone` (modified in place: adapters added in stage 1,
            merged in stage 2, multimask outputs resized) or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        stage: 1 or 2.
        num_masks: the decoder's multimask outputs and the assembled masks (8).
        lora_rank: LoRA rank (4).
        lora_alpha: LoRA scaling numerator (``None``: the rank, scale 1); stage 2 needs it to merge stage-1 keys.
        latent_dim: dimension of the prompt code (256; stage 2).
        prompt_channels: filters of the prompt generator's blocks.
        prompt_image_size: the grid the prompt generator reads the image on.
        log_sigma_clamp: ``(min, max)`` of the prompt distribution's ``log sigma``.
        dense_convs: 1x1 convolutions of ``dense_prompt_mapping``.
        dense_residual: ``dense_prompt_mapping`` adds to the default dense prompt, starting near stage 1 (default),
            instead of replacing it as the reference code does (see :class:`DensePromptMapping`).
        gradient_checkpointing: checkpoint the encoder blocks in training (stage 1; saves activation memory at
            about one more encoder forward per step).

    Raises:
        ValueError: on a stage other than 1 or 2.
    """

    #: stage 1's; an instance declares its own stage's (stage 2: frozen encoder, reads the image, stochastic)
    capabilities = MethodCapabilities(needs_prompt=False, training_target="rater", encoder="trainable", stochastic=False)
    shared_training_outputs = ("assembling_weights", "l2")

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        stage: int = 1,
        num_masks: int = 8,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        latent_dim: int = 256,
        prompt_channels: Sequence[int] = (32, 64, 128, 192),
        prompt_image_size: int = 128,
        log_sigma_clamp: tuple[float, float] = (-5.0, 5.0),
        dense_convs: int = 3,
        dense_residual: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, checkpoint, num_multimask_outputs=num_masks)
        expand_multimask_outputs(backbone.mask_decoder, num_masks)
        super().__init__(backbone, freeze_encoder=stage == 2)
        self.stage = int(stage)
        self.lora_alpha = lora_alpha
        self.assembling_weights = DiversityAwareAssembling(num_masks)
        if self.stage == 1:
            add_qv_lora(self.backbone, rank=lora_rank, alpha=lora_alpha)
            self.backbone.prompt_encoder.requires_grad_(True)
            self.backbone.mask_decoder.requires_grad_(True)
            set_block_checkpointing(self.backbone.image_encoder, gradient_checkpointing)
            self.capabilities = type(self).capabilities
        else:
            merge_lora(self.backbone)
            self.backbone.requires_grad_(False)
            self.assembling_weights.requires_grad_(False)
            embedding_dim = self.backbone.embedding_dim
            self.prompt_generator = PromptGenerationNetwork(
                latent_dim, prompt_channels, image_size=prompt_image_size, log_sigma_clamp=log_sigma_clamp
            )
            self.dense_prompt_mapping = DensePromptMapping(embedding_dim, latent_dim, dense_convs, dense_residual)
            self.capabilities = MethodCapabilities(
                needs_prompt=False, training_target="rater", encoder="frozen", conditions=("image",), stochastic=True
            )
        self.register_load_state_dict_pre_hook(self._merge_stage1_lora_keys)

    # ------------------------------------------------------------------------------------------ stage 1 -> 2
    def _merge_stage1_lora_keys(self, module, state_dict, prefix, *args) -> None:
        """Load pre-hook: fold a stage-1 state dict's LoRA keys into this (merged) encoder's plain ``qkv`` keys."""
        encoder_prefix = f"{prefix}backbone.image_encoder."
        for name, block in self.backbone.image_encoder.named_modules():
            qkv = getattr(block, "qkv", None)
            key = f"{encoder_prefix}{name}.qkv." if name else f"{encoder_prefix}qkv."
            if type(qkv) is not nn.Linear or f"{key}base.weight" not in state_dict:
                continue
            rank = state_dict[f"{key}lora_A_q.weight"].shape[0]
            base = nn.Linear(qkv.in_features, qkv.out_features, bias=qkv.bias is not None)
            adapted = FusedQKVLoRA(base, *qkv_rows(block), rank=rank, alpha=self.lora_alpha)
            parts = {k: state_dict.pop(key + k) for k in adapted.state_dict()}
            adapted.load_state_dict(parts)
            for k, v in adapted.merged().state_dict().items():
                state_dict[key + k] = v

    def l2_parameters(self) -> list[nn.Parameter]:
        """The parameters of the L2 term (stage 2: the prompt generator and the dense prompt mapping; stage 1:
        none)."""
        if self.stage == 1:
            return []
        return [*self.prompt_generator.parameters(), *self.dense_prompt_mapping.parameters()]

    # ---------------------------------------------------------------------------------------------- decoding
    def prompt_distribution(self, images: torch.Tensor) -> torch.distributions.Independent:
        """Stage 2's ``N(mu_I, diag sigma_I^2)`` over the prompt code.

        Args:
            images: ``(B, 1 | 3, H, W)`` in ``[0, 1]``.

        Returns:
            a distribution with ``batch_shape (B,)``, ``event_shape (latent_dim,)``.

        Raises:
            RuntimeError: in stage 1.
        """
        if self.stage == 1:
            raise RuntimeError("stage 1 of P2SAM has no prompt distribution")
        return self.prompt_generator(images)

    def decode_mask_logits(self, embeddings: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's ``num_masks`` logits for SAM's default prompt, or for ``N`` prompt codes per image.

        Args:
            embeddings: ``(B, C, h, w)``.
            latents: ``(B, N, L)`` prompt codes (stage 2), or ``None`` for SAM's default dense prompt (``N = 1``).

        Returns:
            ``(B, N, num_masks, 4h, 4w)`` mask logits.
        """
        b = embeddings.shape[0]
        n = 1 if latents is None else latents.shape[1]
        sparse, dense = self.backbone.embed_prompts(batch_size=b * n)
        if latents is not None:
            default = self.backbone.dense_prompt_factors(None, b * n).offset  # SAM's no-mask embedding (C,)
            dense = self.dense_prompt_mapping(default, latents.flatten(0, 1), self.backbone.embedding_size)
        logits, _ = self.backbone.decode(embeddings, sparse, dense, multimask=True)  # (B * N, M, 4h, 4w)
        return logits.view(b, n, *logits.shape[1:])

    def fuse(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``(B, N, M, H, W)`` -> ``(B, N, H, W)`` by ``assembling_weights``."""
        b, n = mask_logits.shape[:2]
        return self.assembling_weights(mask_logits.flatten(0, 1)).view(b, n, *mask_logits.shape[-2:])

    def draw_latents(self, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``(B, N, L)`` reparameterised prompt codes (stage 2); the mean in eval mode with ``N = 1``."""
        prompt = self.prompt_distribution(conditions.images)
        mean = prompt.mean
        if num_samples == 1 and not self.training:
            return mean.unsqueeze(1)
        eps = conditions.standard_normal(mean.shape[0], num_samples, mean.shape[1], device=mean.device, dtype=mean.dtype)
        return mean.unsqueeze(1) + prompt.stddev.unsqueeze(1) * eps

    # ------------------------------------------------------------------------------------------------ hooks
    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``num_samples`` fused masks per image: stage 1 repeats its one mask, stage 2 decodes ``N`` prompt draws
        (sample ``i`` of images with the same ``noise_seeds`` shares ``eps_i``).

        Args:
            embeddings: ``(B, C, h, w)``.
            conditions: stage 2: ``images (B, 1 | 3, H, W)`` (checked by the base class).
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, 4h, 4w)`` low-resolution logits.
        """
        if self.stage == 1:
            return self.fuse(self.decode_mask_logits(embeddings)).expand(-1, num_samples, -1, -1)
        return self.fuse(self.decode_mask_logits(embeddings, self.draw_latents(conditions, num_samples)))

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, rater_masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One training step's outputs (stage 2: one prompt draw per image).

        Args:
            embeddings: ``(B, C, h, w)`` (stage 1: from the adapted encoder, with gradients).
            conditions: as :meth:`draw_samples`.
            rater_masks: ``(B, 1, S, S)`` the chosen rater's mask (the loss reads it; unused here).

        Returns:
            ``{"logits": (B, 1, 4h, 4w)`` the fused logits, ``"mask_logits": (B, M, 4h, 4w)``,
            ``"assembling_weights": (M,)``, ``"l2": ()`` the sum of squares of :meth:`l2_parameters`\\ ``}``.
        """
        latents = None if self.stage == 1 else self.draw_latents(conditions, 1)
        mask_logits = self.decode_mask_logits(embeddings, latents)[:, 0]  # (B, M, 4h, 4w)
        l2 = sum((p.pow(2).sum() for p in self.l2_parameters()), embeddings.new_zeros(()))
        return {
            "logits": self.assembling_weights(mask_logits),
            "mask_logits": mask_logits,
            "assembling_weights": self.assembling_weights.weights,
            "l2": l2,
        }
