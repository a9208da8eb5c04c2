"""The one bundle locator: a bundle by name or folder, for the CLI, the benchmark, ``export`` and the MONAI Label
app alike.

A bundle is a folder with ``configs/metadata.json`` and ``configs/inference.json``. By name it is looked up in
``./bundles`` (the working directory's, so a user's own bundles folder wins), then in the repository's
``bundles/`` beside the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

from ambisam.errors import InputError

__all__ = ["BUNDLES_DIR", "bundle_dir", "find_bundle", "available_bundles", "config_path"]

#: the repository's bundles folder (an editable install runs from the repository: ``common/ambisam/bundle``)
BUNDLES_DIR = Path(__file__).resolve().parents[3] / "bundles"


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file() and (path / "configs" / "inference.json").is_file()


def _search_dirs() -> list[Path]:
    return list(dict.fromkeys([(Path.cwd() / "bundles").resolve(), BUNDLES_DIR]))


def available_bundles(bundles_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Every bundle in ``bundles_dir`` (default: ``./bundles`` and the repository's, the first one found wins).

    Args:
        bundles_dir: a folder holding one folder per bundle.

    Returns:
        Bundle name -> its folder, sorted by name.

    Raises:
        InputError: a given ``bundles_dir`` is not a folder.
    """
    if bundles_dir is not None and not Path(bundles_dir).is_dir():
        raise InputError(bundles_dir, "bundles folder not found")
    found: dict[str, Path] = {}
    for root in [Path(bundles_dir)] if bundles_dir is not None else _search_dirs():
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if path.name not in found and _is_bundle(path):
                    found[path.name] = path.resolve()
    return dict(sorted(found.items()))


def find_bundle(bundle: str | os.PathLike) -> Path:
    """A bundle folder from a path, or from a name (see the module docstring).

    Raises:
        InputError: no bundle folder found; the message lists the known bundles.
    """
    for path in [Path(bundle)] + [d / str(bundle) for d in _search_dirs()]:
        if _is_bundle(path):
            return path.resolve()
    known = ", ".join(available_bundles()) or "none found"
    raise InputError(bundle, f"not a bundle (no configs/metadata.json and configs/inference.json); bundles: {known}")


def bundle_dir(name: str | os.PathLike) -> Path:
    """The folder bundle ``name`` has or would have (no check that it exists: see :func:`find_bundle`)."""
    for path in [Path(name)] + [d / str(name) for d in _search_dirs()]:
        if _is_bundle(path):
            return path.resolve()
    return BUNDLES_DIR / str(name)


def config_path(bundle: str | os.PathLike, name: str) -> Path:
    """``<bundle>/configs/<name>.json`` (``name`` may carry its ``.json``)."""
    return bundle_dir(bundle) / "configs" / (name if name.endswith(".json") else f"{name}.json")
