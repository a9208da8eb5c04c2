"""Writing outputs safely: every file is written under a temporary name and renamed when complete, so a run
that dies leaves no half-written file; and every run records what it did beside its outputs."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["atomic_path", "write_json", "write_nifti", "run_record", "versions"]


#: what ``open`` gives a new file before the umask (``mkstemp`` gives 0600)
_FILE_MODE = 0o666


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block completes.

    The temporary name keeps the final suffixes (``x.nii.gz`` -> ``.x.<random>.nii.gz``) so that writers that
    choose a format by extension still work.

    Args:
        path: the final file path. Its parent folder is created.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Returns:
        The final path.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def versions() -> dict[str, str]:
    """The versions of ambisam, MONAI, PyTorch, NumPy and Python, for a run's record."""
    import monai
    import numpy
    import torch

    import ambisam

    return {
        "ambisam": ambisam.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
    }


def run_record(**fields: Any) -> dict:
    """What a run did, for the JSON written beside its outputs: the given fields plus versions and platform.

    Args:
        fields: anything the caller wants recorded (config, seed, backbone, the weights' sha256
            (:func:`ambisam.weights.weights_record`), timings, ...).

    Returns:
        A JSON-serialisable dict.
    """
    from ambisam.allocator import allocator_settings

    record = dict(fields)
    record["versions"] = versions()
    record["platform"] = platform.platform()
    record["allocator"] = allocator_settings()  # the speed of a CPU run depends on it (ambisam.allocator)
    record["command"] = " ".join(sys.argv)
    return record


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write an array as NIfTI atomically, exactly as given (no reorientation, no scaling).

    The affine goes in both the qform and sform (code 1, scanner), units are millimetres, and the file's data
    type is the array's (``uint8`` for masks, ``int16``/``float32`` for images).

    Args:
        path: the ``.nii.gz`` (or ``.nii``) file to write.
        array: the voxel array, indexed ``a[i, j, k]`` (a 2D image is ``(H, W, 1)``; channels go last:
            ``(H, W, D, C)``).
        affine: the 4x4 voxel-to-world (RAS) matrix.

    Returns:
        The final path.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
