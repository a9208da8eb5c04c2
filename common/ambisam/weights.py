"""Weights files as untrusted input: loaded only with ``torch.load(weights_only=True)``, and named in run records
by their sha256.

A checkpoint that needs pickle to load (a ``torch.save`` of a model object, or of a dict holding any object of
a custom class) can run any code when unpickled; ambisam refuses it with one :class:`~ambisam.errors.InputError`
instead of falling back to ``weights_only=False``. Save a plain state dict instead
(``torch.save(model.state_dict(), PATH)``, or MONAI's ``CheckpointSaver``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ambisam.errors import InputError

__all__ = ["load_weights", "file_digest", "file_sha256", "weights_record"]


def _unsafe_globals(path: Path) -> list[str]:
    """The globals (classes, functions) a checkpoint's pickle names beyond what ``weights_only`` allows (PyTorch
    2.5 on; with 2.4 a file that needs pickle is still refused, reported as unreadable)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all: it is unreadable, not unsafe
        return []


def load_weights(path: str | os.PathLike, expected: str | None = None, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with one clear error for a file that is missing, unreadable or
    needs pickle.

    Args:
        path: a ``.pt`` / ``.pth`` file.
        expected: what the file should be, added to the error message (e.g. ``"a SAM vit_b checkpoint"``).
        map_location: where tensors load (``torch.load``'s).

    Returns:
        What the file holds (tensors, dicts, lists and other types ``weights_only`` allows).

    Raises:
        InputError: naming the file: it is missing; it needs pickle to load (it names classes beyond tensors and
            containers), and is refused; or it is not a PyTorch file.
    """
    path = Path(path).expanduser()
    hint = f"; expected {expected}" if expected else ""
    if not path.is_file():
        raise InputError(path, f"checkpoint not found{hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - sorted below into the two things it can mean to the user
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise InputError(
                path,
                f"needs pickle to load (it holds {', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''}), "
                "which can run any code, and is refused: weights load with torch.load(weights_only=True) only; "
                f"save a plain state dict instead (torch.save(model.state_dict(), PATH)){hint}",
            ) from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise InputError(path, f"cannot be read as a PyTorch state dict ({type(e).__name__}: {first}){hint}") from None


def file_digest(source: str | os.PathLike | BinaryIO, algorithm: str = "sha256") -> str:
    """A hash of a file's bytes, as lowercase hex.

    Args:
        source: a file path, or a binary file object read to its end (e.g. a zip member's ``ZipFile.open``).
        algorithm: a :mod:`hashlib` name (``sha256`` for run records and exported zips; ``md5`` for the model
            zoo's ``large_files.yml``).

    Raises:
        InputError: the path does not exist.
    """
    if not isinstance(source, (str, os.PathLike)):
        digest = hashlib.new(algorithm)
        for block in iter(lambda: source.read(1 << 20), b""):  # hashlib.file_digest is Python 3.11+
            digest.update(block)
        return digest.hexdigest()
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(path, "file not found")
    with open(path, "rb") as f:
        return file_digest(f, algorithm)


def file_sha256(source: str | os.PathLike | BinaryIO) -> str:
    """:func:`file_digest` with sha256."""
    return file_digest(source, "sha256")


def weights_record(*files: str | os.PathLike | None) -> dict[str, str]:
    """The sha256 of every weights file a run uses, for its JSON record (``weights_sha256``).

    Args:
        files: the files (the trained checkpoint or each snapshot, the backbone's weights, initial weights);
            ``None`` and ``""`` (a file a run does without) are left out.

    Returns:
        Absolute path -> sha256, in the order given.

    Raises:
        InputError: a named file that does not exist.
    """
    return {str(Path(f).expanduser().resolve()): file_sha256(f) for f in files if f not in (None, "")}
