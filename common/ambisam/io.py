"""Writing outputs safely: every file is written under a temporary name and renamed when complete, so a run
that dies leaves no half-written file; and every run records what it did beside its outputs."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["atomic_path", "write_json", "write_nifti", "write_nifti_planes", "run_record", "versions"]


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


def _nifti_image(data, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` (an array, or anything with ``shape`` and ``dtype``) with ``affine`` as the qform
    and sform (code 1, scanner) and millimetre units: the one header every written volume gets."""
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


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
    image = _nifti_image(np.asarray(array), affine)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


class _Shape:
    """What ``nibabel`` needs of a data object to make a header (``shape``, ``dtype``), with no data."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __array__(self, *args, **kwargs):  # pragma: no cover - nibabel never reads it on this path
        raise TypeError("a streamed NIfTI file has no array")


def write_nifti_planes(
    path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | type, affine: np.ndarray,
    planes: Iterable[np.ndarray],
) -> Path:
    """Write a NIfTI file atomically from its ``(H, W)`` planes, never holding more than one plane.

    The file is the one :func:`write_nifti` writes for the array the planes make up (same header, same bytes
    once decompressed): ``nibabel`` writes the header (as its own ``to_file_map`` does, unscaled since the planes
    are in the file's dtype) and each plane follows in the file's Fortran order.

    Args:
        path: the ``.nii.gz`` (or ``.nii``) file to write.
        shape: the volume's shape ``(H, W[, D[, C]])``.
        dtype: the file's data type; every plane must have it.
        affine: the 4x4 voxel-to-world (RAS) matrix.
        planes: ``prod(shape[2:])`` arrays ``(H, W)`` of ``dtype``: for ``(H, W, D, C)``, each channel's slices
            in order (``k`` fastest), as :func:`ambisam.inferers.region.region_planes` yields them.

    Returns:
        The final path.

    Raises:
        OSError: writing failed (the message names the file; nothing is left at ``path``).
        ValueError: a plane of another shape or dtype, or not ``prod(shape[2:])`` planes (naming the file).
    """
    from nibabel.arraywriters import get_slope_inter, make_array_writer
    from nibabel.openers import ImageOpener
    from nibabel.volumeutils import seek_tell

    dtype = np.dtype(dtype)
    image = _nifti_image(_Shape(shape, dtype), affine)
    image.update_header()
    header = image.header
    # what to_file_map records for data already in the file's dtype: no scaling (slope 1, intercept 0)
    writer = make_array_writer(np.zeros(1, dtype), dtype, header.has_data_slope, header.has_data_intercept)
    header.set_slope_inter(*get_slope_inter(writer))
    expected = int(np.prod(shape[2:], dtype=np.int64))
    try:
        with atomic_path(path) as tmp:
            with ImageOpener(str(tmp), "wb") as f:
                header.write_to(f)
                seek_tell(f, header.get_data_offset(), write0=True)
                count = 0
                for plane in planes:
                    if plane.shape != tuple(shape[:2]) or plane.dtype != dtype:
                        raise ValueError(f"plane {count} is {plane.dtype} {plane.shape}, not {dtype} {tuple(shape[:2])}")
                    f.write(plane.tobytes(order="F"))
                    count += 1
                if count != expected:
                    raise ValueError(f"{count} planes given for a {tuple(shape)} volume ({expected} expected)")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except OSError as e:
        raise OSError(f"{path}: could not write the file: {e}") from e
    return Path(path)
