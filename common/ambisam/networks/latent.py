"""Reusable pieces of latent-variable segmentation methods: a convolutional encoder to an axis-aligned Gaussian
over a global latent code, and the KL divergence between two latent distributions.

The encoder follows the prior and posterior nets of the Probabilistic U-Net (Kohl et al., 2018) and of pSAM:
strided convolutions, global average pooling, and a 1x1 convolution to the mean and the log standard deviation
of a diagonal Gaussian, the log standard deviation clamped so that the distribution can neither collapse nor
explode. It returns a ``torch.distributions`` object, so a method samples it (``rsample``), takes its mean, and
compares two of them with :func:`latent_kl_divergence`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

__all__ = ["AxisAlignedGaussianEncoder", "latent_kl_divergence"]


class AxisAlignedGaussianEncoder(nn.Module):
    """Image (or feature map) -> ``N(mu, diag(sigma^2))`` over a ``latent_dim``-dimensional code.

    Every stage is one MONAI :class:`~monai.networks.blocks.Convolution` (kernel 3, stride 2, ReLU), so the
    input is halved from the first layer on: a ``256 x 256`` image is ``128 x 128`` after one stage, and with the
    default channels the whole encoder costs about 0.2 GMAC per image (a few milliseconds on a CPU). The last feature map is averaged over space, and a 1x1
    convolution gives ``2 * latent_dim`` channels: ``mu`` and ``log sigma``. ``log sigma`` is clamped to
    ``log_sigma_clamp`` (``[-5, 5]`` as in pSAM's reference code).

    Args:
        in_channels: channels of the input (e.g. 1 for an image, 2 for an image and a mask, 256 for a SAM
            image embedding).
        latent_dim: dimension ``L`` of the latent code.
        channels: output channels of the strided stages; the number of stages is ``len(channels)``.
        log_sigma_clamp: ``(min, max)`` of ``log sigma``.
        spatial_dims: 2 for images, 3 for volumes.
        act: activation after every stage (MONAI name or ``(name, args)``).
        norm: normalisation in every stage (MONAI name), or ``None`` (the default, as in the reference nets;
            batch statistics are unreliable at the small batch sizes these methods train with).

    Raises:
        ValueError: when ``latent_dim`` or ``channels`` is empty/non-positive, or the clamp is not
            ``min < max``.

    Example::

        prior_net = AxisAlignedGaussianEncoder(in_channels=1, latent_dim=6)
        prior = prior_net(images)        # images (B, 1, 256, 256)
        z = prior.rsample()              # (B, 6)
    """

    def __init__(
        self,
        in_channels: int,
        latent_dim: int = 6,
        channels: Sequence[int] = (32, 64, 128, 192),
        log_sigma_clamp: tuple[float, float] = (-5.0, 5.0),
        *,
        spatial_dims: int = 2,
        act: str | tuple = "RELU",
        norm: str | tuple | None = None,
    ) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {tuple(channels)}")
        low, high = (float(v) for v in log_sigma_clamp)
        if not low < high:
            raise ValueError(f"log_sigma_clamp must be (min, max) with min < max, got {tuple(log_sigma_clamp)}")
        self.in_channels = int(in_channels)
        self.latent_dim = int(latent_dim)
        self.spatial_dims = int(spatial_dims)
        self.log_sigma_clamp = (low, high)

        stages = []
        previous = self.in_channels
        for out in channels:
            stages.append(
                Convolution(
                    spatial_dims=spatial_dims,
                    in_channels=previous,
                    out_channels=int(out),
                    strides=2,
                    kernel_size=3,
                    act=act,
                    norm=norm,
                )
            )
            previous = int(out)
        self.features = nn.Sequential(*stages)
        # 1x1 convolution on the globally pooled features: mu and log sigma
        self.head = Convolution(
            spatial_dims=spatial_dims,
            in_channels=previous,
            out_channels=2 * self.latent_dim,
            kernel_size=1,
            conv_only=True,
        )

    def forward(self, x: torch.Tensor) -> Independent:
        """The latent distribution of each input.

        Args:
            x: ``(B, in_channels, *spatial)`` with ``len(spatial) == spatial_dims``.

        Returns:
            ``Independent(Normal(mu, sigma), 1)`` with ``batch_shape (B,)`` and ``event_shape (latent_dim,)``;
            ``mu`` and ``sigma`` are ``(B, latent_dim)``.

        Raises:
            ValueError: when ``x`` does not have ``spatial_dims + 2`` dimensions or ``in_channels`` channels.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.spatial_dims)}), "
                f"got {tuple(x.shape)}"
            )
        features = self.features(x)
        pooled = features.mean(dim=tuple(range(2, features.ndim)), keepdim=True)  # global average pooling
        params = self.head(pooled).flatten(1)  # (B, 2L)
        mu, log_sigma = params.split(self.latent_dim, dim=1)
        log_sigma = log_sigma.clamp(*self.log_sigma_clamp)
        return Independent(Normal(loc=mu, scale=torch.exp(log_sigma)), 1)


def latent_kl_divergence(posterior: Distribution, prior: Distribution) -> torch.Tensor:
    """``KL(posterior || prior)`` per batch element, by :func:`torch.distributions.kl_divergence`.

    Works for every pair of distributions PyTorch registers a KL for (two :class:`AxisAlignedGaussianEncoder`
    outputs, two Dirichlets, ...). For ``Independent`` distributions it sums over the event dimensions.

    Args:
        posterior: ``q``, e.g. ``q(z | x, y)``, with ``batch_shape (B,)``.
        prior: ``p``, e.g. ``p(z | x)``, with the same batch and event shapes.

    Returns:
        ``(B,)`` (the common ``batch_shape``) non-negative KL values.

    Raises:
        ValueError: when the two distributions' batch or event shapes differ.
        NotImplementedError: when PyTorch has no KL registered for the pair of types.
    """
    if posterior.batch_shape != prior.batch_shape or posterior.event_shape != prior.event_shape:
        raise ValueError(
            "posterior and prior must have the same batch and event shapes, got "
            f"{tuple(posterior.batch_shape)}/{tuple(posterior.event_shape)} and "
            f"{tuple(prior.batch_shape)}/{tuple(prior.event_shape)}"
        )
    return kl_divergence(posterior, prior)
