"""Keeping freed memory in the process: glibc's ``malloc`` tuned so that the encoder does not fault its pages in
again for every slice.

By default glibc serves large blocks with ``mmap`` and hands freed memory back to the system (``munmap``, and
``trim`` of the heap's top), so every slice the image encoder processes maps, zero-fills and faults in its
activations anew: on this project's CPU that doubled LiteMedSAM's encoder time (docs/benchmarks.md, "the encoder's
time depends on the memory allocator"). :func:`keep_freed_memory` raises the three thresholds through ``mallopt``
(the C library's own call, through :mod:`ctypes`) so that freed blocks stay in the process and are reused:

- ``M_MMAP_THRESHOLD``: blocks up to this size come from the heap, not from ``mmap`` (glibc accepts at most
  32 MiB on a 64-bit system; larger blocks are still mapped and unmapped);
- ``M_TRIM_THRESHOLD``: the heap's free top is returned to the system only above this;
- ``M_TOP_PAD``: extra memory asked for at each heap growth.

The price is that the process keeps its peak memory instead of returning it. It is applied where it is safe: on
glibc only (musl, macOS and Windows allocators are left alone), never over an allocator setting the user chose
(any ``MALLOC_*_`` variable, or ``GLIBC_TUNABLES``, in the environment), and not at all with
``AMBISAM_KEEP_FREED_MEMORY=0``. The ``ambisam`` command line and every bundle config's ``initialize`` call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["keep_freed_memory", "allocator_settings", "ALLOCATOR_SETTINGS", "OPT_OUT_VARIABLE"]

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers (glibc's ``malloc.h``) and the values set
ALLOCATOR_SETTINGS = {
    "M_MMAP_THRESHOLD": (-3, 32 * 2**20),  # glibc's maximum on 64-bit systems
    "M_TRIM_THRESHOLD": (-1, 2**30),
    "M_TOP_PAD": (-2, 256 * 2**20),
}
#: set to ``0`` to leave the allocator as it is
OPT_OUT_VARIABLE = "AMBISAM_KEEP_FREED_MEMORY"

_applied: dict[str, int] | None = None  # what this process set, once


def _user_tuned() -> str | None:
    """The environment variable through which the user already tuned glibc's allocator, if any."""
    for name in os.environ:
        if name == "GLIBC_TUNABLES" or (name.startswith("MALLOC_") and name.endswith("_")):
            return name
    return None


def keep_freed_memory() -> dict[str, int]:
    """Tell glibc's ``malloc`` to keep freed memory for reuse (see the module docstring). Idempotent.

    Returns:
        The settings applied, ``{name: value}`` (empty where nothing was applied: not glibc, opted out, or the
        allocator tuned by the user's environment); a setting glibc refused is left out and logged.
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    applied: dict[str, int] = {}
    reason = None
    user_setting = _user_tuned()
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip() == "0":
        reason = f"{OPT_OUT_VARIABLE}=0"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        reason = "not glibc"
    elif user_setting:
        reason = f"the environment sets {user_setting}"
    if reason is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for name, (param, value) in ALLOCATOR_SETTINGS.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
                applied[name] = value
            else:
                logger.warning("allocator: glibc refused mallopt(%s, %d)", name, value)
    else:
        logger.debug("allocator: left as it is (%s)", reason)
    _applied = applied
    return dict(applied)


def allocator_settings() -> dict[str, int]:
    """What :func:`keep_freed_memory` applied in this process (empty when it applied nothing or was not called):
    for the records of runs whose speed depends on it."""
    return dict(_applied or {})
