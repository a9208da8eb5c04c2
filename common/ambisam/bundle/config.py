"""Bundle configs with the shared base resolved.

Every bundle's configs state only what makes the method itself (its network, loss, optimizer and
hyper-parameters); the training loop, the validation, the handlers, the writers and the multi-GPU wiring are
written once, in the base configs of :data:`BASE_CONFIG_DIR` (``common/ambisam/configs/``), and a bundle takes them
with MONAI's ``%`` macros: ``"train": "%common/ambisam/configs/train.json#train"`` copies the base's ``train``
section into the bundle's config when MONAI parses it. A macro path is relative to the repository root, where
every command of the model cards runs (MONAI reads it relative to the working directory); the exported zip and
the MONAI Label app's working copy hold the configs flattened (:func:`flatten_config`), so they run anywhere.

Two rules keep this working with plain ``python -m monai.bundle run`` and its config lists:

- the base configs hold no macros (MONAI resolves one level);
- a bundle file, an override file (``evaluate.json``, ``multi_gpu_train.json``, ``train_mcl.json``) and a
  command-line override set **top-level ids** only: MONAI merges config lists and overrides before it resolves
  macros, so ``train#trainer#max_epochs`` cannot reach into a macro; the base reads every value a bundle or a
  user may change from a top-level id (``max_epochs``, ``model_file``, ``train_sampler``, ...).

The package's own runners (:mod:`ambisam.bundle.runner`: the CLI, the benchmark, the tests) flatten first, so
their overrides may also reach into the base's sections.
"""

from __future__ import annotations

import os
from copy import deepcopy
from functools import lru_cache
from pathlib import Path
from typing import Any

from ambisam.errors import InputError

__all__ = ["MACRO_ROOT", "BASE_CONFIG_DIR", "resolve_macros", "flatten_config", "load_bundle_config"]

#: the folder macro paths are relative to: the repository root
MACRO_ROOT = Path(__file__).resolve().parents[3]
#: the shared base configs
BASE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MACRO = "%"


@lru_cache(maxsize=32)
def _load(path: str, mtime: float) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_file(path)


def _macro_target(value: str, where: Any) -> Any:
    from monai.bundle import ConfigParser

    path, ids = ConfigParser.split_path_id(value[len(MACRO) :])
    if not path:  # a macro within the same config: MONAI resolves it
        return value
    file = Path(path) if Path(path).is_absolute() else MACRO_ROOT / path
    if not file.is_file():
        raise InputError(where, f"the config macro {value!r} names {file}, which does not exist")
    parser = ConfigParser(config=_load(str(file), file.stat().st_mtime))
    try:
        return deepcopy(parser[ids])
    except KeyError:
        raise InputError(file, f"has no id {ids!r} (named by the macro {value!r} in {where})") from None


def resolve_macros(config: Any, where: Any = None) -> Any:
    """``config`` with every ``"%path#id"`` macro replaced by that id's content (paths relative to
    :data:`MACRO_ROOT`); the input is not modified.

    Args:
        config: a config dict (or any part of one).
        where: the file the config came from, for the error message.

    Returns:
        The resolved copy.

    Raises:
        InputError: a macro names a missing file or id.
    """
    if isinstance(config, dict):
        return {k: resolve_macros(v, where) for k, v in config.items()}
    if isinstance(config, list):
        return [resolve_macros(v, where) for v in config]
    if isinstance(config, str) and config.startswith(MACRO):
        return _macro_target(config, where)
    return config


def flatten_config(files: str | os.PathLike | list) -> dict:
    """Configs merged in order as MONAI merges a config list, each one's macros resolved first.

    Args:
        files: one config file or a list of them.

    Returns:
        One self-contained config dict (no macros to the base left).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    merged = ConfigParser(config={})
    for file in files if isinstance(files, (list, tuple)) else [files]:
        for key, value in ConfigParser.load_config_file(str(file)).items():
            merge_kv(merged, key, resolve_macros(value, file))
    return merged.get()


def load_bundle_config(bundle: str | os.PathLike, names: list[str] | tuple[str, ...]) -> dict:
    """A bundle's configs (``["train", "evaluate"]``) merged and flattened."""
    from ambisam.bundle.locator import config_path

    return flatten_config([config_path(bundle, n) for n in names])
