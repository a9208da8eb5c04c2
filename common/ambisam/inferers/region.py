"""A sampling output held as the region that can be nonzero, instead of the whole volume.

The sampling inferer writes nothing outside the slices it samples: every map (mean, uncertainty, variance, the
samples, the probabilities) is exactly 0 on a slice no structure prompts. With ``region_output=True``
(:class:`~ambisam.inferers.SlicewiseSamplingInferer`; the inference bundles' setting) it returns only the
**slab** of sampled slices, so that inference memory grows with the prompted region, not with the volume:

``{"values": (B, C, H, W, d), "start": (B, 3), "shape": (B, 3)}``

a plain dict (so that MONAI's ``decollate_batch``, which the evaluators apply to ``pred``, splits it per case into
``{"values": (C, H, W, d), "start": (3,), "shape": (3,)}``; a dataclass would not decollate). ``values`` is the
block of :mod:`ambisam.inferers.layout` on the slab (a MetaTensor with the input's metadata when the input is
one), ``start`` the slab's first voxel in the full volume (``(0, 0, k0)``: the region spans whole slices, since a
method may mark any pixel of a slice it samples) and ``shape`` the full spatial shape ``(H, W, D)``; the full
output is ``values`` pasted at ``start`` on zeros of ``shape``. A 2D image's region is the whole image
(``start (B, 2)`` of zeros). The region of a batch is the union of its cases' (one ``start`` per case, equal).

Every reader understands both forms: :class:`~ambisam.data.SplitSamplingOutputd` splits a region into regions
(``pred`` and ``samples`` as ``uint8``), :func:`~ambisam.outputs.write_case_outputs` streams each NIfTI file plane
by plane (:func:`region_planes`: background planes are zeros of the file's dtype, never a full volume), the MONAI
Label app summarises the slab. What needs full tensors (``Invertd``, the metrics) gets them from :func:`dense`
(``SplitSamplingOutputd(dense=True)``), at the dense output's cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["REGION_KEYS", "sampling_region", "is_region", "region_parts", "region_like", "dense", "region_planes"]

#: the keys of a region output, exactly
REGION_KEYS = frozenset({"values", "start", "shape"})


def sampling_region(values: torch.Tensor, start: Sequence[int] | torch.Tensor,
                    shape: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """A region output.

    Args:
        values: ``(C, *slab)`` for one case, ``(B, C, *slab)`` for a batch.
        start: the slab's first voxel in the full volume, ``(ndim,)`` (``(B, ndim)`` for a batch).
        shape: the full spatial shape, ``(ndim,)`` (``(B, ndim)`` for a batch).

    Returns:
        ``{"values", "start", "shape"}`` (``start``, ``shape`` as ``int64`` tensors).

    Raises:
        ValueError: the slab does not fit inside ``shape`` at ``start``.
    """
    start_t = torch.as_tensor(start, dtype=torch.int64)
    shape_t = torch.as_tensor(shape, dtype=torch.int64)
    slab = torch.as_tensor(values.shape[-start_t.shape[-1]:])
    if start_t.shape != shape_t.shape or (start_t < 0).any() or (start_t + slab > shape_t).any():
        raise ValueError(f"a slab of {tuple(slab.tolist())} at {start_t.tolist()} does not fit in {shape_t.tolist()}")
    return {"values": values, "start": start_t, "shape": shape_t}


def is_region(x: Any) -> bool:
    """Whether ``x`` is a region output (a mapping with exactly ``values``, ``start``, ``shape``)."""
    return isinstance(x, Mapping) and set(x) == REGION_KEYS


def region_parts(x: Any) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """One case's ``(values (C, *slab), start, full spatial shape)``; a dense ``(C, *spatial)`` tensor or array is
    its own region (start 0).

    Raises:
        ValueError: ``x`` is a batch region (``start`` of two dimensions).
    """
    if not is_region(x):
        values = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
        return values, (0,) * (values.ndim - 1), tuple(values.shape[1:])
    start = torch.as_tensor(x["start"])
    if start.ndim != 1:
        raise ValueError(f"a region per case was expected, got a batch's (start {tuple(start.shape)})")
    values = x["values"] if torch.is_tensor(x["values"]) else torch.as_tensor(np.asarray(x["values"]))
    return values, tuple(int(v) for v in start), tuple(int(v) for v in torch.as_tensor(x["shape"]))


def region_like(x: Mapping, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` (the same slab) with ``x``'s ``start`` and ``shape``."""
    return {"values": values, "start": torch.as_tensor(x["start"]).clone(), "shape": torch.as_tensor(x["shape"]).clone()}


def dense(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full ``(C, *shape)`` tensor of one case's region (zeros outside the slab); a dense tensor as it is.

    This materialises the whole volume (``C`` channels of it): for what cannot work on the slab (``Invertd``
    resampling the maps back, the metrics). A MetaTensor slab gives a MetaTensor with its metadata.

    Args:
        x: a region (:func:`sampling_region`, one case) or a tensor.
        dtype: the result's dtype (default: the values').

    Returns:
        ``(C, *shape)``.
    """
    if not is_region(x):
        return x if dtype is None else x.to(dtype)
    values, start, shape = region_parts(x)
    out = values.new_zeros((values.shape[0], *shape), dtype=dtype or values.dtype)
    index = (slice(None), *(slice(s, s + n) for s, n in zip(start, values.shape[1:])))
    out[index] = values.to(out.dtype)
    return out


def region_planes(x: Any, dtype: np.dtype | type) -> Iterator[np.ndarray]:
    """The ``(H, W)`` planes of one case's output in the order a NIfTI file of shape ``(H, W, D[, C])`` stores them
    (Fortran order: for each channel, each slice), each in ``dtype``; planes outside the slab are one shared
    read-only array of zeros, so no more than one plane of the output is ever built.

    Args:
        x: a region (one case) or a dense ``(C, H, W[, D])`` tensor or array.
        dtype: the file's dtype (``uint8`` for masks and samples, ``float32`` for the maps).

    Yields:
        ``(H, W)`` arrays of ``dtype``: ``C * D`` of them (``C`` for 2D).

    Raises:
        ValueError: the output is not 2D or 3D.
    """
    values, start, shape = region_parts(x)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a (C, H, W[, D]) output, got spatial shape {shape}")
    dtype = np.dtype(dtype)
    zeros = np.zeros(shape[:2], dtype)
    zeros.flags.writeable = False
    depth = shape[2] if len(shape) == 3 else 1
    k0 = start[2] if len(shape) == 3 else 0
    slab = values.detach()
    if len(shape) == 2:
        slab = slab[..., None]
    (y0, x0), (h, w), d = start[:2], slab.shape[1:3], slab.shape[3]
    for c in range(slab.shape[0]):
        for k in range(depth):
            if not k0 <= k < k0 + d:
                yield zeros
                continue
            part = slab[c, :, :, k - k0]
            part = (part.as_tensor() if hasattr(part, "as_tensor") else part).cpu().numpy().astype(dtype, copy=False)
            if (h, w) == shape[:2]:
                yield part
                continue
            plane = np.zeros(shape[:2], dtype)
            plane[y0 : y0 + h, x0 : x0 + w] = part
            yield plane
