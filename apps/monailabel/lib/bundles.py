"""Which bundles the app serves, and the working copy of each that MONAI Label's bundle tasks run from.

Bundles are found by :func:`ambisam.bundle.available_bundles`, the package's one locator. MONAI Label's
``BundleInferTask``/``BundleTrainTask`` take a bundle folder with ``configs/`` and
``models/model.pt``. The app copies each served bundle into ``<app>/model/<name>/`` (the folder MONAI Label
creates for models, as its own ``monaibundle`` app does for zoo bundles): the configs and docs are copied anew
at every start, and ``models/model.pt`` comes from, in order, ``--conf weights DIR`` (``DIR/<name>/model.pt`` or
``DIR/<name>.pt``) or the bundle's own ``models/model.pt``. Weights trained from MONAI Label land in the working
copy and survive restarts; a source file newer than the working copy replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from ambisam.bundle import available_bundles
from ambisam.errors import InputError
from ambisam.export import flattened_config_text
from ambisam.weights import load_weights

__all__ = [
    "WORKING_COPY_ITEMS",
    "default_bundles_dir",
    "available_bundles",
    "selected_bundles",
    "find_weights",
    "make_working_copy",
]

logger = logging.getLogger(__name__)

#: what a working copy takes from the bundle (``models/`` is handled on its own)
WORKING_COPY_ITEMS = ("configs", "docs", "scripts", "LICENSE")


def default_bundles_dir(app_dir: str | os.PathLike) -> Path:
    """The repository's ``bundles/`` beside ``apps/`` (``<app>/../../bundles``), else ``./bundles``."""
    in_repo = Path(app_dir).resolve().parent.parent / "bundles"
    return in_repo if in_repo.is_dir() else Path("bundles").resolve()


def selected_bundles(conf: Mapping[str, str], bundles_dir: str | os.PathLike) -> dict[str, Path]:
    """The bundles named by ``--conf models a,b`` (``all``, the default, serves every bundle found).

    Args:
        conf: the app's ``--conf`` pairs.
        bundles_dir: where the bundles are.

    Returns:
        Bundle name -> its folder, in the order asked for.

    Raises:
        InputError: a name that is not a bundle in ``bundles_dir``, or no bundle at all.
    """
    available = available_bundles(bundles_dir)
    asked = [n.strip() for n in str(conf.get("models", "all")).split(",") if n.strip()]
    if not asked or asked == ["all"]:
        if not available:
            raise InputError(bundles_dir, "no bundle here (a bundle has configs/inference.json and metadata.json)")
        return available
    unknown = [n for n in asked if n not in available]
    if unknown:
        raise InputError(
            bundles_dir,
            f"no bundle named {', '.join(unknown)} (bundles here: {', '.join(available) or 'none'}; "
            "use --conf models all or a comma-separated list of these)",
        )
    return {n: available[n] for n in asked}


def find_weights(name: str, bundle_dir: str | os.PathLike, weights_dir: str | os.PathLike | None) -> Path | None:
    """The trained weights to serve for a bundle, if any.

    Args:
        name: the bundle's name.
        bundle_dir: the bundle's folder (its own ``models/model.pt`` is the fallback).
        weights_dir: ``--conf weights DIR``, holding ``<name>/model.pt`` or ``<name>.pt``; ``None`` if not given.

    Returns:
        The weights file, or ``None`` when there are none.

    Raises:
        InputError: ``weights_dir`` was given but is not a folder.
    """
    candidates = []
    if weights_dir:
        weights_dir = Path(weights_dir)
        if not weights_dir.is_dir():
            raise InputError(weights_dir, "weights folder not found (--conf weights DIR)")
        candidates += [weights_dir / name / "model.pt", weights_dir / f"{name}.pt"]
    candidates.append(Path(bundle_dir) / "models" / "model.pt")
    return next((p for p in candidates if p.is_file()), None)


def make_working_copy(bundle_dir: str | os.PathLike, dest: str | os.PathLike, weights: Path | None) -> Path:
    """Copy a bundle to the folder MONAI Label's bundle tasks run from.

    ``configs/``, ``docs/``, ``scripts/`` and ``LICENSE`` are replaced by the bundle's, each config flattened
    (:func:`ambisam.export.flattened_config_text`: the shared base configs' macros resolved, so that MONAI Label's
    nested overrides such as ``train#trainer#max_epochs`` reach into them); ``models/model.pt`` is
    copied from ``weights`` when the working copy has none or an older one; training checkpoints and outputs
    already in the working copy are kept.

    Args:
        bundle_dir: the bundle.
        dest: the working copy (``<app>/model/<name>``).
        weights: the weights to serve (:func:`find_weights`), or ``None``.

    Returns:
        ``dest``.

    Raises:
        InputError: ``weights`` need pickle to load or are not PyTorch weights (:func:`ambisam.weights.load_weights`;
            MONAI Label loads them with plain ``torch.load``, whose default is ``weights_only=True`` only from
            PyTorch 2.6).
    """
    src, dest = Path(bundle_dir), Path(dest)
    if weights is not None:
        load_weights(weights, f"the {src.name} weights to serve")
    dest.mkdir(parents=True, exist_ok=True)
    for item in WORKING_COPY_ITEMS:
        source, target = src / item, dest / item
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, target)
    for config in sorted((dest / "configs").glob("*.json")):  # self-contained, and open to nested overrides
        config.write_text(flattened_config_text(src / "configs" / config.name))
    served = dest / "models" / "model.pt"
    if weights is not None and (not served.is_file() or weights.stat().st_mtime > served.stat().st_mtime):
        served.parent.mkdir(parents=True, exist_ok=True)
        tmp = served.with_name(".model.pt.copying")
        shutil.copy2(weights, tmp)
        os.replace(tmp, served)
        logger.info(f"{src.name}: serving weights {weights}")
    return dest
