"""The one definition of the sampling output's layout, used by the inferer that writes it and by everything that
reads it: the post-processing transform (:class:`ambisam.data.SplitSamplingOutputd`), the writers
(:mod:`ambisam.outputs`), the engines' handlers and the MONAI Label app.

The inferer returns one tensor per batch, so that MONAI engines, post-transforms and MONAI Label handle it like
any prediction: ``(B, S * (3 + N), *spatial)`` for ``S`` structures (organs; 1 for a single-structure method) and
``N`` samples, structure-major. Per structure ``s`` its ``3 + N`` channels are

- ``mean``: the fraction of samples marking each voxel (the mean prediction);
- ``uncertainty``: the binary entropy of the mean, in bits (0 where every sample agrees, 1 at a 50/50 split);
- ``variance``: the variance over samples of each sample's probability (a second, softer map);
- the ``N`` binary samples, in the order the method drew them;
- only with ``probabilities=True`` (the evaluation's ``keep_probabilities``): the ``N`` samples' sigmoid
  probability maps, in the same order, so a block is ``3 + 2N`` channels (``(B, S * (3 + 2N), *spatial)``).

Split (:func:`split_sampling_output`), a case has ``pred`` (the final mask, ``mean > threshold``), ``mean``,
``uncertainty``, ``variance`` (each ``(S, *spatial)``) and ``samples (S * N, *spatial)``: with one structure,
exactly the single maps and the ``N`` samples; with probabilities also ``probabilities (S * N, *spatial)``.

The same layout may come as a region, only the slab of sampled slices (:mod:`ambisam.inferers.region`, the
inferer's ``region_output``); the split and the writers take either form.
"""

from __future__ import annotations

import torch

__all__ = [
    "SAMPLING_CHANNELS",
    "OUTPUT_NAMES",
    "OUTPUT_SUFFIXES",
    "OPTIONAL_OUTPUT_SUFFIXES",
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
#: outputs a method's post-processing may add (UR-SAM's), written when a case has them: output name -> suffix
OPTIONAL_OUTPUT_SUFFIXES = {
    "uncertain": "_uncertain.nii.gz",  # the high-uncertainty masks, (S, ...) 0/1
    "labels": "_labels.nii.gz",  # one multi-label volume of every structure's final mask, (1, ...)
}


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli with probability ``p`` (0 where ``p`` is 0 or 1)."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, device=p.device))


def sampling_maps(probs: torch.Tensor, threshold: float = 0.5, probabilities: bool = False) -> torch.Tensor:
    """One structure's block of channels from its samples' probabilities.

    Args:
        probs: ``(..., N, *spatial)`` per-sample foreground probabilities, samples on dimension ``-3`` of a 2D
            slice batch ``(S, N, H, W)``.
        threshold: a sample's pixel is foreground above it.
        probabilities: append ``probs`` itself (the N probability maps) after the binary samples.

    Returns:
        ``(S, 3 + N, H, W)``: mean, uncertainty, variance, the N binary samples; ``(S, 3 + 2N, H, W)`` with the N
        probability maps appended when ``probabilities``.
    """
    samples = (probs > threshold).float()
    mean = samples.mean(dim=1, keepdim=True)
    maps = [mean, binary_entropy(mean), probs.var(dim=1, unbiased=False, keepdim=True), samples]
    return torch.cat(maps + [probs.float()] if probabilities else maps, 1)


def _block(num_samples: int, probabilities: bool) -> int:
    """The channels of one structure: ``3 + N``, or ``3 + 2N`` with the probability maps."""
    return 3 + int(num_samples) * (2 if probabilities else 1)


def num_structures(channels: int, num_samples: int, probabilities: bool = False) -> int:
    """``S`` for an output of ``channels = S * (3 + N)`` channels (``S * (3 + 2N)`` with ``probabilities``).

    Raises:
        ValueError: ``channels`` is not a positive multiple of the block.
    """
    block = _block(num_samples, probabilities)
    if channels < block or channels % block:
        what = "3 + 2N" if probabilities else "3 + N"
        raise ValueError(
            f"{channels} channels are not S * ({what}) with N = {num_samples} (mean, entropy, variance, samples"
            + (", probabilities)" if probabilities else ")"))
    return channels // block


def split_sampling_output(
    output: torch.Tensor, threshold: float = 0.5, num_samples: int | None = None, probabilities: bool = False
) -> dict[str, torch.Tensor]:
    """Split one case's inferer output into named maps.

    Args:
        output: ``(S * (3 + N), *spatial)``, or ``(S * (3 + 2N), *spatial)`` with ``probabilities``.
        threshold: the final mask is ``mean > threshold``.
        num_samples: ``N``; ``None`` for one structure and any ``N``.
        probabilities: the output holds each sample's probability map after the binary samples (the inferer's
            ``keep_probabilities``).

    Returns:
        ``pred``, ``mean``, ``uncertainty``, ``variance`` (each ``(S, *spatial)``) and ``samples (S * N, *spatial)``;
        with ``probabilities`` also ``probabilities (S * N, *spatial)``.

    Raises:
        ValueError: the channels do not fit the layout.
    """
    channels = int(output.shape[0])
    if num_samples is None:
        n = (channels - 3) // 2 if probabilities else channels - 3
    else:
        n = int(num_samples)
    s = num_structures(channels, n, probabilities)
    blocks = output.reshape(s, _block(n, probabilities), *output.shape[1:])
    mean = blocks[:, 0]
    maps = {
        "pred": (mean > threshold).to(output.dtype),
        "mean": mean,
        "uncertainty": blocks[:, 1],
        "variance": blocks[:, 2],
        "samples": blocks[:, 3 : 3 + n].reshape(s * n, *output.shape[1:]),
    }
    if probabilities:
        maps["probabilities"] = blocks[:, 3 + n :].reshape(s * n, *output.shape[1:])
    return maps
