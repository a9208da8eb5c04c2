"""The one definition of the sampling output's layout, used by the inferer that writes it and by everything that
reads it: the post-processing transform (:class:`ambisam.data.SplitSamplingOutputd`), the writers
(:mod:`ambisam.outputs`), the engines' handlers and the MONAI Label app.

The inferer returns one tensor per batch, so that MONAI engines, post-transforms and MONAI Label handle it like
any prediction: ``(B, S * (3 + N), *spatial)`` for ``S`` structures (organs; 1 for a single-structure method) and
``N`` samples, structure-major. Per structure ``s`` its ``3 + N`` channels are

- ``mean``: the fraction of samples marking each voxel (the mean prediction);
- ``uncertainty``: the binary entropy of the mean, in bits (0 where every sample agrees, 1 at a 50/50 split);
- ``variance``: the variance over samples of each sample's probability (a second, softer map);
- the ``N`` binary samples, in the order the method drew them.

Split (:func:`split_sampling_output`), a case has ``pred`` (the final mask, ``mean > threshold``), ``mean``,
``uncertainty``, ``variance`` (each ``(S, *spatial)``) and ``samples (S * N, *spatial)``: with one structure,
exactly the single maps and the ``N`` samples.
"""

from __future__ import annotations

import torch

__all__ = [
    "SAMPLING_CHANNELS",
    "OUTPUT_NAMES",
    "OUTPUT_SUFFIXES",
    "binary_entropy",
    "sampling_maps",
    "split_sampling_output",
    "num_structures",
]

#: the leading channels of each structure's block
SAMPLING_CHANNELS = ("mean", "uncertainty", "variance")
#: the names of a split output, in file order
OUTPUT_NAMES = ("pred", "mean", "uncertainty", "variance", "samples")
#: output name -> file suffix of the per-case NIfTI files
OUTPUT_SUFFIXES = {
    "pred": "_mask.nii.gz",
    "mean": "_mean.nii.gz",
    "uncertainty": "_uncertainty.nii.gz",
    "variance": "_variance.nii.gz",
    "samples": "_samples.nii.gz",
}


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli with probability ``p`` (0 where ``p`` is 0 or 1)."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, device=p.device))


def sampling_maps(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """One structure's block of channels from its samples' probabilities.

    Args:
        probs: ``(..., N, *spatial)`` per-sample foreground probabilities, samples on dimension ``-3`` of a 2D
            slice batch ``(S, N, H, W)``.
        threshold: a sample's pixel is foreground above it.

    Returns:
        ``(S, 3 + N, H, W)``: mean, uncertainty, variance, the N binary samples.
    """
    samples = (probs > threshold).float()
    mean = samples.mean(dim=1, keepdim=True)
    return torch.cat([mean, binary_entropy(mean), probs.var(dim=1, unbiased=False, keepdim=True), samples], 1)


def num_structures(channels: int, num_samples: int) -> int:
    """``S`` for an output of ``channels = S * (3 + N)`` channels.

    Raises:
        ValueError: ``channels`` is not a positive multiple of ``3 + N``.
    """
    block = 3 + int(num_samples)
    if channels < block or channels % block:
        raise ValueError(f"{channels} channels are not S * (3 + N) with N = {num_samples} (mean, entropy, variance, samples)")
    return channels // block


def split_sampling_output(
    output: torch.Tensor, threshold: float = 0.5, num_samples: int | None = None
) -> dict[str, torch.Tensor]:
    """Split one case's inferer output into named maps.

    Args:
        output: ``(S * (3 + N), *spatial)``.
        threshold: the final mask is ``mean > threshold``.
        num_samples: ``N``; ``None`` for one structure and any ``N``.

    Returns:
        ``pred``, ``mean``, ``uncertainty``, ``variance`` (each ``(S, *spatial)``) and ``samples (S * N, *spatial)``.

    Raises:
        ValueError: the channels do not fit the layout.
    """
    channels = int(output.shape[0])
    n = channels - 3 if num_samples is None else int(num_samples)
    s = num_structures(channels, n)
    blocks = output.reshape(s, 3 + n, *output.shape[1:])
    mean = blocks[:, 0]
    return {
        "pred": (mean > threshold).to(output.dtype),
        "mean": mean,
        "uncertainty": blocks[:, 1],
        "variance": blocks[:, 2],
        "samples": blocks[:, 3:].reshape(s * n, *output.shape[1:]),
    }
