"""The method contract: what every method network receives, what it declares, and the one ``forward`` the
trainer, the sampling inferer, MONAI's tools and MONAI Label all go through.

A method is an ``nn.Module`` holding a backbone (:class:`~ambisam.sam.ImageBackbone`: a SAM-family
:class:`~ambisam.sam.SamBackbone`, or a grid backbone for U-Net methods) as ``backbone``. It receives the image
embeddings, computed once per image, and the batch's :class:`Conditions` (the box prompt or none, the image for
prompt nets that read it, the rater id, a mode, the seeds of its random draws), and implements two hooks:

- :meth:`MaskSamplingNetwork.draw_samples`: ``N`` mask logits per image;
- :meth:`MaskSamplingNetwork.compute_training_outputs`: what its loss needs for one training step.

It declares what it can do in ``capabilities`` (:class:`MethodCapabilities`): the trainer reads the training
target and whether the encoder trains from it, the inferer whether a prompt is needed and which conditions to
pass; nothing checks a class name. The public entry points :meth:`~MaskSamplingNetwork.sample_logits` and
:meth:`~MaskSamplingNetwork.training_outputs` check the inputs once, here, before calling the hooks.

``forward`` in eval mode returns one tensor ``(B, 1, H, W)`` (a single representative prediction), so MONAI's
``verify_net_in_out``, ``ckpt_export`` and MONAI Label work with the network alone; samples and uncertainty come
from :class:`~ambisam.inferers.SlicewiseSamplingInferer`. With ``training_outputs=True`` it runs the encoder (or the
embedding cache, for a frozen one) and the training hook, so that DDP sees the whole step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
from torch import nn

from ambisam.sam import DEFAULT_BACKBONE, SamBackbone, build_backbone

__all__ = ["MaskSamplingNetwork", "MethodCapabilities", "Conditions", "CONDITIONS", "TRAINING_TARGETS"]

#: the conditions a method may read besides the embeddings and the prompt
CONDITIONS = ("image", "rater_id", "mode")
#: what a method trains against: one rater's mask per image (``rater_mask``) or every rater's (``label``)
TRAINING_TARGETS = {"rater": "rater_mask", "raters": "label"}


class MethodCapabilities(NamedTuple):
    """What a method declares about itself.

    Attributes:
        needs_prompt: it takes a box prompt per slice (the inferer then skips slices without one).
        training_target: ``"rater"`` (one rater's mask per image), ``"raters"`` (all of them, for set losses) or
            ``None`` (training-free).
        encoder: ``"frozen"`` (trains from cached embeddings) or ``"trainable"`` (the encoder's forward runs, with
            gradients, in every training step).
        conditions: which of :data:`CONDITIONS` it reads.
        stochastic: its samples depend on random draws (``False``: deterministic given the inputs).
    """

    needs_prompt: bool = True
    training_target: str | None = "rater"
    encoder: str = "frozen"
    conditions: tuple[str, ...] = ()
    stochastic: bool = True

    @property
    def trainable(self) -> bool:
        return self.training_target is not None

    @property
    def target_key(self) -> str:
        """The batch key of the training target."""
        if self.training_target not in TRAINING_TARGETS:
            raise ValueError(f"training_target must be one of {sorted(TRAINING_TARGETS)}, got {self.training_target!r}")
        return TRAINING_TARGETS[self.training_target]


@dataclasses.dataclass
class Conditions:
    """What a method receives besides the image embeddings, for a batch of ``B`` images.

    Attributes:
        boxes: ``(B, 4)`` box prompts in backbone input coordinates, or ``None`` (prompt-free methods).
        images: ``(B, 1|3, S, S)`` the images at backbone input size, for methods whose prompt net reads them.
        rater_ids: ``(B,)`` integer rater ids (the datalist's rater table), for rater-conditioned methods.
        mode: an inference mode a method offers (e.g. ``"personalised"``), or ``None`` for its default.
        noise_seeds: ``(B,)`` integer seeds of the random draws: images with the same seed get the same standard
            normal draws (:meth:`standard_normal`), so sample ``i`` of every slice of a volume comes from one draw
            (one 3D hypothesis); ``None`` draws independently per image.
    """

    boxes: torch.Tensor | None = None
    images: torch.Tensor | None = None
    rater_ids: torch.Tensor | None = None
    mode: str | None = None
    noise_seeds: torch.Tensor | None = None

    @classmethod
    def of(cls, value: Conditions | torch.Tensor | None) -> Conditions:
        """``value`` itself, or conditions holding just the boxes ``value``."""
        return value if isinstance(value, Conditions) else cls(boxes=value)

    def standard_normal(self, batch: int, num_samples: int, *shape: int, device=None, dtype=None) -> torch.Tensor:
        """Standard normal draws ``(B, N, *shape)``, per :attr:`noise_seeds` when given.

        Without seeds the draw is ``torch.randn(N, B, *shape)`` transposed (the order of
        ``Distribution.rsample((N,))``), so a method that switches to these draws keeps its samples for a seed.
        """
        if self.noise_seeds is None:
            return torch.randn(num_samples, batch, *shape, device=device, dtype=dtype).transpose(0, 1)
        return self._seeded(torch.randn, num_samples, shape, device, dtype)

    def uniform(self, batch: int, num_samples: int, *shape: int, device=None) -> torch.Tensor:
        """Uniform draws in ``[0, 1)`` ``(B, N, *shape)``, per :attr:`noise_seeds` when given (images with the same
        seed get the same draws), else ``torch.rand(B, N, *shape)``."""
        if self.noise_seeds is None:
            return torch.rand(batch, num_samples, *shape, device=device)
        return self._seeded(torch.rand, num_samples, shape, device)

    def _seeded(self, draw, num_samples: int, shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
        """``draw(N, *shape)`` from each image's own seed, stacked ``(B, N, *shape)``."""
        draws = [draw(num_samples, *shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype)
                 for seed in self.noise_seeds.tolist()]
        return torch.stack(draws).to(device)


class MaskSamplingNetwork(nn.Module):
    """Base class of the method networks (see the module docstring).

    Args:
        backbone: a built backbone, or a registry name (``"litemedsam"``, ``"vit_b"``, ...).
        checkpoint: backbone weights for a registry name that needs them.
        freeze_encoder: freeze the image encoder; default: as ``capabilities.encoder`` declares.

    Attributes:
        capabilities: the method's :class:`MethodCapabilities` (a class attribute; an instance may narrow it).
        shared_training_outputs: the names of training outputs that are not per image (a function of the
            weights, such as a weight penalty), which a trainer splitting a batch into slice batches must not cut
            or count once per slice batch (see :mod:`ambisam.engines.trainer`).
    """

    capabilities = MethodCapabilities()
    shared_training_outputs: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        freeze_encoder: bool | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, checkpoint) if isinstance(backbone, str) else backbone
        if freeze_encoder is None:
            freeze_encoder = self.capabilities.encoder == "frozen"
        self.encoder_frozen = bool(freeze_encoder)
        if self.encoder_frozen:
            self.backbone.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> MaskSamplingNetwork:
        """Set train/eval mode; a frozen image encoder stays in eval mode (its BatchNorm statistics and cached
        attention biases must not change, and cached embeddings must stay valid)."""
        super().train(mode)
        if self.encoder_frozen:
            self.backbone.image_encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------- the checks
    def check_inputs(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int | None = None) -> None:
        """Check a call's inputs against what the method declares.

        Raises:
            ValueError: ``num_samples < 1``; a missing or malformed box for a method that needs one; a condition
                the method reads but the batch lacks, or one that does not match the batch.
        """
        b = embeddings.shape[0]
        name = type(self).__name__
        if num_samples is not None and int(num_samples) < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if self.capabilities.needs_prompt:
            if conditions.boxes is None:
                raise ValueError(f"{name} needs a box prompt")
            if tuple(conditions.boxes.shape) != (b, 4):
                raise ValueError(f"expected boxes of shape ({b}, 4), got {tuple(conditions.boxes.shape)}")
        for condition, value in (("image", conditions.images), ("rater_id", conditions.rater_ids)):
            if condition in self.capabilities.conditions:
                if value is None:
                    raise ValueError(f"{name} reads the {condition} of each image; the batch has none")
                if value.shape[0] != b:
                    raise ValueError(f"{condition} has {value.shape[0]} rows for {b} images")

    # ------------------------------------------------------------------------------------------- the hooks
    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``num_samples`` mask logits per image (inputs already checked).

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings from ``backbone.encode``.
            conditions: the batch's :class:`Conditions`.
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, h', w')`` low-resolution mask logits (``backbone.mask_size``).
        """
        raise NotImplementedError

    def compute_training_outputs(self, embeddings: torch.Tensor, conditions: Conditions, targets: torch.Tensor) -> dict:
        """What one training step needs from the network (the loss reads it; inputs already checked).

        Args:
            embeddings: ``(B, C, h, w)``.
            conditions: the batch's :class:`Conditions`.
            targets: ``(B, 1, S, S)`` one rater's mask, or ``(B, K, S, S)`` every rater's (``capabilities``).

        Returns:
            A dict with at least ``logits``.
        """
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    # ---------------------------------------------------------------------------------------- entry points
    def sample_logits(
        self, embeddings: torch.Tensor, conditions: Conditions | torch.Tensor | None, num_samples: int
    ) -> torch.Tensor:
        """Check the inputs, then :meth:`draw_samples` (``conditions`` may be just the ``(B, 4)`` boxes)."""
        conditions = Conditions.of(conditions)
        self.check_inputs(embeddings, conditions, num_samples)
        return self.draw_samples(embeddings, conditions, int(num_samples))

    def training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions | torch.Tensor | None, targets: torch.Tensor
    ) -> dict:
        """Check the inputs, then :meth:`compute_training_outputs` (``conditions`` may be just the boxes)."""
        if not self.capabilities.trainable:
            raise NotImplementedError(f"{type(self).__name__} is not trainable")
        conditions = Conditions.of(conditions)
        self.check_inputs(embeddings, conditions)
        if targets.ndim != 4 or targets.shape[0] != embeddings.shape[0]:
            raise ValueError(f"expected targets of shape ({embeddings.shape[0]}, K, H, W), got {tuple(targets.shape)}")
        return self.compute_training_outputs(embeddings, conditions, targets)

    def embed(self, images: torch.Tensor, embedding_cache=None) -> torch.Tensor:
        """Embeddings ``(B, C, h, w)`` of ``images (B, 1|3, S, S)``: through the encoder with gradients when it
        trains, else gradient-free from ``embedding_cache`` (or the encoder when there is none)."""
        if any(p.requires_grad for p in self.backbone.image_encoder.parameters()):
            return self.backbone.encode(images)
        with torch.no_grad():
            if embedding_cache is not None:
                return embedding_cache(images).to(images.device)
            return self.backbone.encode(images)

    def forward(
        self,
        images: torch.Tensor,
        conditions: Conditions | torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        training_outputs: bool = False,
        embedding_cache=None,
    ):
        """One representative prediction per image; with ``training_outputs=True`` one training step's outputs.

        Args:
            images: ``(B, 1|3, H, W)`` in ``[0, 1]`` (at backbone input size with ``training_outputs``).
            conditions: :class:`Conditions`, or the ``(B, 4)`` pixel boxes ``[x_min, y_min, x_max, y_max]``
                (backbone input coordinates with ``training_outputs``), or ``None`` for prompt-free methods. A
                method that reads the image (``"image"`` in ``capabilities.conditions``) gets ``images`` when the
                conditions carry none, so ``forward(images)`` works for MONAI's tools.
            targets: the training targets (``training_outputs`` only).
            training_outputs: embed (:meth:`embed`) and return :meth:`training_outputs`.
            embedding_cache: the frozen encoder's cache (``training_outputs`` only).

        Returns:
            ``(B, 1, H, W)`` logits, or the training outputs dict.
        """
        conditions = Conditions.of(conditions)
        if "image" in self.capabilities.conditions and conditions.images is None:
            conditions = dataclasses.replace(conditions, images=images)
        if training_outputs:
            return self.training_outputs(self.embed(images, embedding_cache), conditions, targets)
        size = tuple(images.shape[-2:])
        if conditions.boxes is not None:
            conditions = dataclasses.replace(conditions, boxes=self.backbone.boxes_to_input(conditions.boxes, size))
        logits = self.sample_logits(self.backbone.encode(images), conditions, 1)
        return self.backbone.postprocess(logits, size)
