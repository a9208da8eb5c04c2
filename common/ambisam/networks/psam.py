"""pSAM, the Probabilistic Segment Anything Model (Ward & Imran, 2025; reference code tbwa233/Probabilistic-SAM):
a global latent code, drawn from a learned prior, shifts SAM's box prompt tokens, so that one box gives a
distribution of masks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.latent import AxisAlignedGaussianEncoder, latent_kl_divergence
from ambisam.sam import DEFAULT_BACKBONE, SamBackbone

__all__ = ["ProbabilisticSam", "PRIOR_INPUTS"]

#: what pSAM's prior and posterior nets may read
PRIOR_INPUTS = ("image", "embedding")


class ProbabilisticSam(MaskSamplingNetwork):
    """Box-prompted SAM whose prompt is modulated by a latent code ``z``, trained as a conditional VAE.

    - ``prior_net``: ``p(z | x)``, an :class:`~ambisam.networks.latent.AxisAlignedGaussianEncoder`;
    - ``posterior_net``: ``q(z | x, y)``, the same architecture with the rater mask ``y`` as one more input
      channel (training only);
    - ``latent_to_prompt``: an MLP ``latent_dim -> latent_hidden -> C`` (``C = backbone.embedding_dim = 256``)
      whose output is added to every sparse prompt token of the box (both corner tokens);
    - the image encoder is frozen, the prompt encoder and the mask decoder are trained (SAM's single-mask
      output).

    Training (:meth:`training_outputs`) decodes one posterior sample per image, and the loss is BCE + soft Dice
    against that rater plus ``beta * KL(q || p)`` (:class:`~ambisam.losses.LatentSegmentationLoss`).
    Sampling (:meth:`sample_logits`) draws ``N`` codes from the prior and decodes all of them from the one
    image embedding (``SamBackbone.decode``: all in one mask decoder call on a GPU, two at a time on a CPU).

    **What the prior and the posterior read** (``prior_input``):

    - ``"image"`` (default, as the reference code): the image itself, ``(B, 1, S, S)`` at backbone input size
      (the channel mean of a 3-channel input), for the prior, and the image with the rater mask as a second
      channel for the posterior: four stride-2 stages of ``image_channels``. The mask is then half of the
      posterior's input. Training still needs no encoder pass: the image is in the batch, the embedding cached.
    - ``"embedding"``: SAM's frozen image embedding ``(B, C, h, w)`` (``(B, 256, 64, 64)`` for LiteMedSAM), and for
      the posterior the rater mask average-pooled to ``(h, w)`` as channel ``C + 1``: three stride-2 stages of
      ``prior_channels``. Cheaper, but the mask is one channel of 257.

    With beta = 10 the trained posterior collapsed onto the prior with either input on the LIDC sample (KL(q || p)
    below 0.003 nats; docs/benchmarks.md, "Why trained methods lost the ambiguity").

    Args:
        backbone: a built :class:`~ambisam.sam.SamBackbone` or a registry name.
        checkpoint: backbone weights for a registry name that needs them.
        latent_dim: dimension of ``z`` (6 in the reference code).
        prior_channels: channels of the strided stages of ``prior_net`` and ``posterior_net`` with
            ``prior_input="embedding"`` (on the ``h x w`` embedding grid: three stages take 64 x 64 to 8 x 8).
        latent_hidden: hidden width of ``latent_to_prompt`` (256 in the reference code).
        prior_input: ``"image"`` or ``"embedding"`` (see above).
        image_channels: channels of the strided stages with ``prior_input="image"`` (four stages take 256 x 256
            to 16 x 16).

    Raises:
        ValueError: on a non-positive ``latent_dim`` or ``latent_hidden``, or an unknown ``prior_input``.
    """

    capabilities = MethodCapabilities(training_target="rater")

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        latent_dim: int = 6,
        prior_channels: Sequence[int] = (64, 128, 192),
        latent_hidden: int = 256,
        prior_input: str = "image",
        image_channels: Sequence[int] = (32, 64, 128, 192),
    ) -> None:
        super().__init__(backbone, checkpoint)
        if latent_dim < 1 or latent_hidden < 1:
            raise ValueError(f"latent_dim and latent_hidden must be positive, got {latent_dim}, {latent_hidden}")
        if prior_input not in PRIOR_INPUTS:
            raise ValueError(f"prior_input must be one of {', '.join(PRIOR_INPUTS)}, got {prior_input!r}")
        self.prior_input = prior_input
        if prior_input == "image":  # the prior and posterior read the image: the trainer and inferer hand it over
            self.capabilities = MethodCapabilities(training_target="rater", conditions=("image",))
        self.latent_dim = int(latent_dim)
        embedding_dim = self.backbone.embedding_dim
        inputs, channels = (1, image_channels) if prior_input == "image" else (embedding_dim, prior_channels)
        self.prior_net = AxisAlignedGaussianEncoder(inputs, self.latent_dim, channels)
        self.posterior_net = AxisAlignedGaussianEncoder(inputs + 1, self.latent_dim, channels)
        self.latent_to_prompt = nn.Sequential(
            nn.Linear(self.latent_dim, latent_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(latent_hidden, embedding_dim),
        )

    def prior_inputs(self, embeddings: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """What the prior and posterior read: ``(B, 1, S, S)`` the image (its channel mean, resized to the backbone
        input size ``S`` when it is not) with ``prior_input="image"``, else the ``(B, C, h, w)`` embeddings.

        Raises:
            ValueError: ``prior_input="image"`` and the conditions carry no images.
        """
        if self.prior_input == "embedding":
            return embeddings
        if conditions.images is None:
            raise ValueError("pSAM with prior_input='image' needs conditions.images (B, 1|3, H, W)")
        images = conditions.images.mean(dim=1, keepdim=True).to(embeddings.dtype)
        size = (self.backbone.image_size, self.backbone.image_size)
        if tuple(images.shape[-2:]) != size:  # a slice at its own size (inference): as the training pipeline does
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images

    def prior(self, inputs: torch.Tensor) -> torch.distributions.Independent:
        """``p(z | x)``.

        Args:
            inputs: :meth:`prior_inputs`: ``(B, 1, S, S)`` images or ``(B, C, h, w)`` embeddings.

        Returns:
            a distribution with ``batch_shape (B,)``, ``event_shape (latent_dim,)``.
        """
        return self.prior_net(inputs)

    def posterior(self, inputs: torch.Tensor, rater_masks: torch.Tensor) -> torch.distributions.Independent:
        """``q(z | x, y)``.

        Args:
            inputs: :meth:`prior_inputs`: ``(B, 1, S, S)`` images or ``(B, C, h, w)`` embeddings.
            rater_masks: ``(B, 1, H, W)`` one rater's binary mask per image, any ``H, W`` (normally the backbone
                input size ``S x S``); resized to the inputs' grid by area averaging.

        Returns:
            a distribution with ``batch_shape (B,)``, ``event_shape (latent_dim,)``.

        Raises:
            ValueError: when ``rater_masks`` is not ``(B, 1, H, W)`` with the embeddings' ``B``.
        """
        if rater_masks.ndim != 4 or rater_masks.shape[1] != 1 or rater_masks.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"expected rater_masks of shape ({inputs.shape[0]}, 1, H, W), got {tuple(rater_masks.shape)}"
            )
        masks = F.adaptive_avg_pool2d(rater_masks.to(inputs.dtype), tuple(inputs.shape[-2:]))
        return self.posterior_net(torch.cat([inputs, masks], dim=1))

    def decode_latents(self, embeddings: torch.Tensor, boxes: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``N`` latent codes per image with its box, from the one embedding of each image (``SamBackbone.decode``).

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            boxes: ``(B, 4)`` boxes in backbone input coordinates.
            latents: ``(B, N, latent_dim)``.

        Returns:
            ``(B, N, 4h, 4w)`` low-resolution mask logits.

        Raises:
            ValueError: when ``boxes`` or ``latents`` do not match the embeddings' batch.
        """
        b = embeddings.shape[0]
        if boxes is None or boxes.shape != (b, 4):
            raise ValueError(f"expected boxes of shape ({b}, 4), got {None if boxes is None else tuple(boxes.shape)}")
        if latents.ndim != 3 or latents.shape[0] != b or latents.shape[2] != self.latent_dim:
            raise ValueError(f"expected latents of shape ({b}, N, {self.latent_dim}), got {tuple(latents.shape)}")
        n = latents.shape[1]
        sparse, dense = self.backbone.embed_prompts(boxes=boxes)  # (B, T, C), (B, C, h, w)
        shift = self.latent_to_prompt(latents)  # (B, N, C)
        sparse = (sparse.unsqueeze(1) + shift.unsqueeze(2)).flatten(0, 1)  # (B * N, T, C), grouped by image
        dense = dense.unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)  # (B * N, C, h, w)
        logits, _ = self.backbone.decode(embeddings, sparse, dense, multimask=False)  # (B * N, 1, 4h, 4w)
        return logits.view(b, n, *logits.shape[-2:])

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``num_samples`` masks per image, ``z_i = mu(x) + sigma(x) * eps_i`` from the prior ``p(z | x)``.

        The standard normal draws ``eps_i`` come from ``conditions.standard_normal``: with the inferer's per-volume
        seeds, sample ``i`` of every slice of a volume shares ``eps_i`` (one 3D hypothesis, each slice through its
        own prior). In eval mode with ``num_samples == 1`` the prior mean is decoded instead, so that ``forward``
        (the network's one representative prediction) is deterministic. The samples are reparameterised, so
        gradients reach the prior net when this is called with autograd on.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            conditions: ``boxes (B, 4)`` in backbone input coordinates (checked by the base class).
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, 4h, 4w)`` low-resolution mask logits.
        """
        prior = self.prior(self.prior_inputs(embeddings, conditions))
        if num_samples == 1 and not self.training:
            latents = prior.mean.unsqueeze(1)  # (B, 1, L)
        else:
            eps = conditions.standard_normal(
                embeddings.shape[0], num_samples, self.latent_dim, device=prior.mean.device, dtype=prior.mean.dtype
            )
            latents = prior.mean.unsqueeze(1) + prior.stddev.unsqueeze(1) * eps  # (B, N, L)
        return self.decode_latents(embeddings, conditions.boxes, latents)

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, rater_masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What one training step needs: the prediction from a posterior sample and ``KL(q || p)``.

        Args (as :meth:`MaskSamplingNetwork.compute_training_outputs`, ``conditions.boxes`` the prompt):
            rater_masks: ``(B, 1, S, S)`` the chosen rater's binary mask at backbone input size (any ``H, W`` is
                accepted: the posterior pools it to the embedding grid).

        Returns:
            ``{"logits": (B, 1, 4h, 4w)`` low-resolution logits decoded from ``z ~ q(z | x, y)`` (``rsample``),
            ``"kl": (B,)`` ``KL(q(z | x, y) || p(z | x))``\\ ``}``.

        Raises:
            ValueError: on shapes that do not match (see :meth:`posterior` and :meth:`decode_latents`).
        """
        inputs = self.prior_inputs(embeddings, conditions)
        prior = self.prior(inputs)
        posterior = self.posterior(inputs, rater_masks)
        latents = posterior.rsample().unsqueeze(1)  # (B, 1, L)
        logits = self.decode_latents(embeddings, conditions.boxes, latents)
        return {"logits": logits, "kl": latent_kl_divergence(posterior, prior)}
