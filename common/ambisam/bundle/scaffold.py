"""A new bundle's config folder, written as every bundle's is: what the method states, then the shared base's ids
by macro (see :mod:`ambisam.bundle.config`).

``write_bundle_configs(folder, train={...}, inference={...})`` writes ``configs/train.json``,
``inference.json``, ``evaluate.json``, ``multi_gpu_train.json``, ``multi_gpu_evaluate.json`` and ``logging.conf`` (a link to the base's);
``metadata.json`` and the model card are the method's own and written by hand.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ambisam.bundle.config import BASE_CONFIG_DIR, MACRO, MACRO_ROOT

__all__ = ["BASE_CONFIGS", "base_macros", "write_bundle_configs"]

#: the base configs a bundle takes, by file name (without ``.json``)
BASE_CONFIGS = ("train", "inference", "evaluate", "multi_gpu_train", "multi_gpu_evaluate")


def base_macros(config: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{id: "%common/ambisam/configs/<config>.json#id"}`` for every top-level id of a base config.

    Args:
        config: one of :data:`BASE_CONFIGS`.
        skip: ids the bundle states itself.

    Returns:
        The macros, in the base's order.
    """
    path = BASE_CONFIG_DIR / f"{config}.json"
    relative = path.relative_to(MACRO_ROOT).as_posix()
    base = json.loads(path.read_text())
    return {k: f"{MACRO}{relative}#{k}" for k in base if not k.startswith("_") and k not in skip}


def _write(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


def write_bundle_configs(
    bundle_dir: str | os.PathLike,
    train: Mapping[str, Any],
    inference: Mapping[str, Any],
    link_logging: bool = True,
    evaluate: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write a bundle's configs: the method's ids first, then the base's by macro.

    Args:
        bundle_dir: the bundle folder (``configs/`` is created in it).
        train: what the method states in ``train.json``: ``bundle_name``, ``method``, ``network_def``, ``loss``,
            ``optimizer``, ``hyper_parameters`` and the hyper-parameters they reference (``learning_rate``,
            ``max_epochs``, ``batch_size``, ...).
        inference: what it states in ``inference.json``: ``bundle_name``, ``method``, ``network_def``.
        link_logging: ``logging.conf`` as a link to the base's (else a copy).
        evaluate: what it states in ``evaluate.json`` beyond the base's (e.g. a second scoring); default none.

    Returns:
        The files written.
    """
    folder = Path(bundle_dir) / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _write(folder / "train.json", {**train, **base_macros("train", tuple(train))}),
        _write(folder / "inference.json", {**inference, **base_macros("inference", tuple(inference))}),
        _write(folder / "evaluate.json", {**(evaluate or {}), **base_macros("evaluate", tuple(evaluate or ()))}),
        _write(folder / "multi_gpu_train.json", base_macros("multi_gpu_train")),
        _write(folder / "multi_gpu_evaluate.json", base_macros("multi_gpu_evaluate")),
    ]
    logging_conf = folder / "logging.conf"
    if logging_conf.is_symlink() or logging_conf.exists():
        logging_conf.unlink()
    if link_logging:
        logging_conf.symlink_to(os.path.relpath(BASE_CONFIG_DIR / "logging.conf", folder))
    else:
        shutil.copyfile(BASE_CONFIG_DIR / "logging.conf", logging_conf)
    return [*written, logging_conf]
