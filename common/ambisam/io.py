"""Writing outputs safely: every file is written under a temporary name and renamed when complete, so a run
that dies leaves no half-written file; and every run records what it did beside its outputs.

A temporary file is hidden and named for the process writing it (``.<stem>.tmp-<pid>-<host>-<random><suffix>``).
A process killed outright (SIGKILL, out of memory, power) cannot remove its temporary files; the next process that
writes into the same folder on the same host removes those whose process is gone. :func:`atomic_group` renames
several files together, so that a case's outputs appear all at once or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ambisam.errors import OutputError

__all__ = ["atomic_path", "atomic_group", "remove_stale_temporaries", "write_json", "write_text", "write_nifti",
           "write_nifti_planes", "run_record", "versions"]


#: what ``open`` gives a new file before the umask (``mkstemp`` gives 0600)
_FILE_MODE = 0o666


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: this host, as it appears in a temporary file's name (letters, digits and ``_`` only)
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
#: a temporary file's name: the writing process and host between the final stem and suffix
_TEMPORARY = re.compile(r"^\..*\.tmp-(\d+)-([A-Za-z0-9_]+)-[^.]*")
#: folders whose stale temporary files this process has already removed
_swept: set[Path] = set()
#: the commits of the :func:`atomic_group` blocks open in this thread (innermost last)
_groups = threading.local()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files left in ``folder`` by processes of this host that no longer run.

    Only names that :func:`atomic_path` makes are considered; a file of a process that still runs, or of another
    host (a shared file system), is left alone.

    Args:
        folder: the folder to clean.

    Returns:
        The files removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match.group(2) != _HOST or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_group() -> Iterator[None]:
    """Rename every file that :func:`atomic_path` writes inside the block only when the whole block completes.

    Files are renamed in the order written. If the block fails, none of them appears and their temporary files are
    removed. Groups nest: an inner group's files are renamed with the outermost group's.
    """
    stack = getattr(_groups, "stack", None)
    if stack is None:
        stack = _groups.stack = []
    pending: list[tuple[Path, Path]] = []
    stack.append(pending)
    try:
        yield
        stack.pop()
        if stack:  # nested: the outer group renames them
            stack[-1].extend(pending)
            pending = []
        else:
            for tmp, path in pending:
                os.replace(tmp, path)
    finally:
        if stack and stack[-1] is pending:
            stack.pop()
        for tmp, _ in pending:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block completes.

    The temporary name keeps the final suffixes (``x.nii.gz`` -> ``.x.tmp-<pid>-<host>-<random>.nii.gz``) so that
    writers that choose a format by extension still work. The first write into a folder removes the temporary
    files that killed processes left there (:func:`remove_stale_temporaries`). Inside :func:`atomic_group`, the
    rename waits for the group.

    Args:
        path: the final file path. Its parent folder is created.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _swept:
        remove_stale_temporaries(folder)
        _swept.add(folder)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.tmp-{os.getpid()}-{_HOST}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    stack = getattr(_groups, "stack", None)
    try:
        yield tmp_path
        if stack:
            stack[-1].append((tmp_path, path))  # renamed (or removed) with its group
        else:
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Returns:
        The final path.

    Raises:
        OutputError: the file could not be written (naming it; nothing is left at ``path``).
    """
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Returns:
        The final path.

    Raises:
        OutputError: the file could not be written (naming it; nothing is left at ``path``).
    """
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise _output_error(path, e) from e
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
    try:
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
    except OSError as e:
        raise _output_error(path, e) from e
    return Path(path)


def _output_error(path: str | os.PathLike, error: OSError) -> OSError:
    """``error`` while writing ``path``, as one :class:`~ambisam.errors.OutputError` naming the file."""
    if isinstance(error, OutputError):
        return error
    return OutputError(path, f"could not write the file: {error.strerror or error}")


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
        OutputError: writing failed, e.g. a full disk (an ``OSError`` naming the file; nothing is left at
            ``path``).
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
        raise _output_error(path, e) from e
    return Path(path)
