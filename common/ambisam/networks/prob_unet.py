"""The Probabilistic U-Net (Kohl et al., NeurIPS 2018) on MONAI building blocks: the field's reference baseline,
trained from scratch, no SAM.

It plugs into the same sampling inferer, trainer and bundle configs as the SAM-based methods: its "backbone"
is :class:`ImageGridBackbone`, whose "embedding" is the image itself resized to a square grid (nothing to
encode, nothing to cache that matters), and :class:`ProbabilisticUNet` implements the
:class:`~ambisam.networks.base.MaskSamplingNetwork` interface on that grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet
from torch import nn

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.latent import AxisAlignedGaussianEncoder, latent_kl_divergence
from ambisam.sam.backbone import SamBackbone

__all__ = ["ImageGridBackbone", "ProbabilisticUNet", "box_masks"]


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Rasterise boxes as binary masks.

    Args:
        boxes: ``(B, 4)`` ``[x_min, y_min, x_max, y_max]`` inclusive pixel coordinates on a ``size x size`` grid.
        size: the grid's side.

    Returns:
        ``(B, 1, size, size)`` float masks, 1 inside the box.
    """
    grid = torch.arange(size, device=boxes.device, dtype=torch.float32)
    b = boxes.float()
    inside_x = (grid[None] >= b[:, 0:1].floor()) & (grid[None] <= b[:, 2:3].ceil())  # (B, S)
    inside_y = (grid[None] >= b[:, 1:2].floor()) & (grid[None] <= b[:, 3:4].ceil())
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


class ImageGridBackbone(nn.Module):
    """The backbone interface for a method without an image encoder: the image resized to ``S x S`` is the
    "embedding".

    It has what the inferer, the trainer and the embedding cache use of a backbone (``name``,
    ``image_encoder`` (an identity), ``image_size``, ``encode``, ``boxes_to_input``, ``postprocess``), so a
    U-Net-style method is sampled, trained and evaluated by the same code as the SAM methods.

    Args:
        image_size: the side ``S`` of the square grid the network works on.

    Raises:
        ValueError: on ``image_size < 16``.
    """

    def __init__(self, image_size: int = 128) -> None:
        super().__init__()
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.image_size = int(image_size)
        self.name = f"image_grid{self.image_size}"
        self.image_encoder = nn.Identity()

    @property
    def mask_size(self) -> tuple[int, int]:
        """Size of the logits the network returns: the grid itself."""
        return (self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The image on the grid.

        Args:
            images: ``(B, 1|3, H, W)`` intensities in ``[0, 1]`` (three channels are averaged).

        Returns:
            ``(B, 1, S, S)``.

        Raises:
            ValueError: when ``images`` is not 4D with 1 or 3 channels.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = (images.as_tensor() if hasattr(images, "as_tensor") else images).float().mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != self.mask_size:
            x = F.interpolate(x, size=self.mask_size, mode="bilinear", align_corners=False)
        return x

    # the same box mapping and logit resizing as the SAM backbones
    boxes_to_input = SamBackbone.boxes_to_input
    postprocess = staticmethod(SamBackbone.postprocess)


class ProbabilisticUNet(MaskSamplingNetwork):
    """Kohl et al.'s Probabilistic U-Net: a U-Net whose last feature map is combined with a global latent code
    ``z`` drawn from a prior net ``p(z | x)``; trained as a conditional VAE with a posterior net ``q(z | x, y)``.

    - the U-Net: MONAI :class:`~monai.networks.nets.BasicUNet` (its ``out_channels`` are the feature map the
      latent is combined with, ``features[-1]`` channels by default);
    - prior and posterior nets: :class:`~ambisam.networks.latent.AxisAlignedGaussianEncoder` (strided MONAI
      convolutions, global average pooling, ``mu`` and ``log sigma``); the posterior sees the rater mask as one
      more input channel;
    - ``fcomb``: ``z`` tiled over the grid, concatenated with the features, three 1x1 convolutions with ReLU and
      a 1x1 convolution to one logit channel, as in the paper;
    - loss (stated in the method registry, ``ambisam.registry``): the paper's pixel-summed cross-entropy plus
      ``beta * KL(q || p)``, both divided by the number of pixels (the same minimiser;
      :class:`~ambisam.losses.LatentSegmentationLoss` with a mean BCE, no Dice, and ``beta / S^2``).

    **Departure from the paper: the box prompt is an input.** With ``use_box=True`` (the default) the network
    reads the image and the box as a binary mask (a second input channel), so that it gets the same prompt as
    every SAM method it is compared with; the paper's LIDC setting gets the same information from lesion-centred
    128 x 128 crops. ``use_box=False`` is the paper's image-only network (it then samples every slice it is
    given).

    Sampling computes the U-Net features and the prior once per image and decodes all ``N`` codes with
    ``fcomb`` in one batch. In eval mode with ``N = 1`` the prior mean is decoded (``forward`` is
    deterministic).

    Args:
        image_size: the grid side ``S`` the network works on (128, LIDC's crop size, by default).
        latent_dim: dimension of ``z`` (6 in the paper's LIDC experiments).
        features: :class:`~monai.networks.nets.BasicUNet` features (five encoder levels and the output level).
        prior_channels: channels of the strided stages of the prior and posterior nets.
        fcomb_channels: channels of the three 1x1 convolutions of ``fcomb``.
        use_box: read the box prompt as an input channel.

    Raises:
        ValueError: on a non-positive ``latent_dim`` or ``fcomb_channels``.
    """

    capabilities = MethodCapabilities(training_target="rater")

    def __init__(
        self,
        image_size: int = 128,
        latent_dim: int = 6,
        features: Sequence[int] = (32, 32, 64, 128, 192, 32),
        prior_channels: Sequence[int] = (32, 64, 128, 192),
        fcomb_channels: int = 32,
        use_box: bool = True,
    ) -> None:
        super().__init__(backbone=ImageGridBackbone(image_size))
        if latent_dim < 1 or fcomb_channels < 1:
            raise ValueError(f"latent_dim and fcomb_channels must be positive, got {latent_dim}, {fcomb_channels}")
        self.latent_dim = int(latent_dim)
        self.use_box = bool(use_box)
        self.capabilities = self.capabilities._replace(needs_prompt=self.use_box)
        in_channels = 2 if self.use_box else 1
        feature_channels = int(features[-1])
        self.unet = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=feature_channels, features=features)
        self.prior_net = AxisAlignedGaussianEncoder(in_channels, self.latent_dim, prior_channels)
        self.posterior_net = AxisAlignedGaussianEncoder(in_channels + 1, self.latent_dim, prior_channels)
        layers: list[nn.Module] = []
        previous = feature_channels + self.latent_dim
        for _ in range(3):
            layers.append(Convolution(2, previous, fcomb_channels, kernel_size=1, act="RELU", norm=None))
            previous = fcomb_channels
        layers.append(Convolution(2, previous, 1, kernel_size=1, conv_only=True))
        self.fcomb = nn.Sequential(*layers)

    def network_inputs(self, images: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's input: the image, and the box as a mask when ``use_box``.

        Args:
            images: ``(B, 1, S, S)`` from :meth:`ImageGridBackbone.encode`.
            boxes: ``(B, 4)`` on the grid, or ``None`` when ``use_box`` is off.

        Returns:
            ``(B, 2, S, S)`` (``(B, 1, S, S)`` without the box).

        Raises:
            ValueError: when the images are not ``(B, 1, S, S)``, or a needed box is missing or malformed.
        """
        s = self.backbone.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, s, s):
            raise ValueError(f"expected images of shape (B, 1, {s}, {s}), got {tuple(images.shape)}")
        if not self.use_box:
            return images
        if boxes is None or tuple(boxes.shape) != (images.shape[0], 4):
            got = None if boxes is None else tuple(boxes.shape)
            raise ValueError(f"ProbabilisticUNet(use_box=True) needs boxes of shape ({images.shape[0]}, 4), got {got}")
        return torch.cat([images, box_masks(boxes, s).to(images.dtype)], dim=1)

    def combine(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``fcomb``: decode ``N`` latent codes per image against the image's U-Net features.

        Args:
            features: ``(B, F, S, S)``.
            latents: ``(B, N, latent_dim)``.

        Returns:
            ``(B, N, S, S)`` logits.
        """
        b, n = latents.shape[:2]
        spatial = features.shape[-2:]
        tiled = latents[..., None, None].expand(-1, -1, -1, *spatial)  # (B, N, L, S, S)
        stacked = features[:, None].expand(-1, n, -1, -1, -1)  # (B, N, F, S, S)
        logits = self.fcomb(torch.cat([stacked, tiled], dim=2).flatten(0, 1))  # (B * N, 1, S, S)
        return logits.view(b, n, *spatial)

    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``N`` masks per image from the prior.

        Args:
            embeddings: ``(B, 1, S, S)`` images on the grid (the backbone's "embeddings").
            conditions: ``boxes (B, 4)`` on the grid (ignored without ``use_box``).
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, S, S)`` logits.

        Raises:
            ValueError: on inputs of the wrong shape.
        """
        x = self.network_inputs(embeddings, conditions.boxes)
        prior = self.prior_net(x)
        if num_samples == 1 and not self.training:
            latents = prior.mean.unsqueeze(1)
        else:
            eps = conditions.standard_normal(x.shape[0], num_samples, self.latent_dim, device=x.device, dtype=x.dtype)
            latents = prior.mean.unsqueeze(1) + prior.stddev.unsqueeze(1) * eps  # (B, N, L), as rsample
        return self.combine(self.unet(x), latents)

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, rater_masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The prediction from a posterior sample and ``KL(q || p)``.

        Args:
            embeddings: ``(B, 1, S, S)`` images on the grid.
            conditions: ``boxes (B, 4)`` on the grid.
            rater_masks: ``(B, 1, H, W)`` one rater's mask per image (resized to the grid, nearest, if needed).

        Returns:
            ``{"logits": (B, 1, S, S), "kl": (B,)}``.

        Raises:
            ValueError: on inputs of the wrong shape.
        """
        x = self.network_inputs(embeddings, conditions.boxes)
        if rater_masks.ndim != 4 or rater_masks.shape[:2] != (x.shape[0], 1):
            raise ValueError(f"expected rater_masks of shape ({x.shape[0]}, 1, H, W), got {tuple(rater_masks.shape)}")
        masks = rater_masks.to(x.dtype)
        if masks.shape[-2:] != x.shape[-2:]:
            masks = F.interpolate(masks, size=tuple(x.shape[-2:]), mode="nearest")
        prior = self.prior_net(x)
        posterior = self.posterior_net(torch.cat([x, masks], dim=1))
        logits = self.combine(self.unet(x), posterior.rsample().unsqueeze(1))
        return {"logits": logits, "kl": latent_kl_divergence(posterior, prior)}
