"""The numeric precision a backbone's encoder and decoder run in: ``"fp32"``, ``"bf16"`` or ``"auto"``.

``"bf16"`` runs the image encoder (but its patch embedding, which reads the intensities) and the mask decoder's
two-way transformer under ``torch.autocast`` in bfloat16; what decides the mask's boundary stays in float32 (the
decoder's upscaling, its hypernetwork MLPs, the mask product, the IoU head, the resizing to the image, the
sigmoid), and embeddings and logits are returned as float32. ``"auto"`` is bfloat16 where the hardware computes it natively and float32 elsewhere:

- on a CPU, bfloat16 where :func:`cpu_has_native_bf16` (AVX512-BF16 or AMX-BF16 instructions); a CPU without
  them (AVX2 only) converts bfloat16 to float32 for every operation, which is slower than float32 itself;
- on a CUDA GPU, bfloat16 where the GPU supports it (``torch.cuda.is_bf16_supported()``, Ampere and later),
  else float16, autocast's own CUDA default;
- any other device: float32.

The setting lives on the backbone (:attr:`ambisam.sam.SamBackbone.precision`), set by
``build_backbone(..., precision=...)``; every method encodes and decodes through it, and the embedding cache keys
its entries by it (:meth:`ambisam.sam.SamBackbone.compute_dtype`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ambisam.errors import InputError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "PRECISIONS",
    "check_precision",
    "cpu_has_native_bf16",
    "resolve_precision",
    "autocast_dtype",
    "set_precision",
]

#: the values a ``precision`` setting takes
PRECISIONS = ("fp32", "bf16", "auto")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: /proc/cpuinfo flags of native bfloat16 arithmetic on x86 (AVX512-BF16 dot products, AMX tiles)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_precision(precision: str) -> str:
    """The ``precision`` setting, checked.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (case and surrounding spaces ignored).

    Returns:
        The normalised value.

    Raises:
        InputError: any other value, named in the message.
    """
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise InputError(None, f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return value


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str | None = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), which oneDNN uses for bfloat16
    matmuls and convolutions.

    Asks torch's own CPU feature detection (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``)
    and, where that is not available, the ``flags`` of ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``).

    Args:
        cpuinfo: the cpuinfo file to read when torch cannot tell (``None``: do not read one).

    Returns:
        ``True`` when bfloat16 runs natively; ``False`` otherwise, also when it cannot be told.
    """
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        return any(bool(p()) for p in probes)
    if cpuinfo is None:
        return False
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return any(flag in flags for flag in _BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision a setting means on a device: ``"fp32"``, ``"bf16"`` or (CUDA without bfloat16) ``"fp16"``.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.
        device: where the backbone runs.

    Returns:
        ``"fp32"``/``"bf16"`` as given; for ``"auto"`` see the module docstring.

    Raises:
        InputError: an unknown ``precision``.
    """
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype ``torch.autocast`` runs in for ``precision`` on ``device`` (``torch.float32``: no autocast).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.
        device: where the backbone runs.

    Returns:
        ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Raises:
        InputError: an unknown ``precision``.
    """
    return _DTYPES[resolve_precision(precision, device)]


def set_precision(network: nn.Module, precision: str) -> nn.Module:
    """Set ``precision`` on every backbone inside ``network`` (a method network, a snapshot ensemble, a DDP
    wrapper): what the base configs apply to the bundle's network, so bundles' ``network_def`` need not pass it.

    Args:
        network: any module; each submodule with a ``precision`` property setter (a
            :class:`~ambisam.sam.SamBackbone`) gets the value.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.

    Returns:
        ``network`` itself.

    Raises:
        InputError: an unknown ``precision``.
    """
    precision = check_precision(precision)
    for module in network.modules():
        if isinstance(getattr(type(module), "precision", None), property):
            module.precision = precision
    return network

