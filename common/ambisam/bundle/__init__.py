"""Bundles as the package sees them: where a bundle is (:mod:`~ambisam.bundle.locator`), its configs with the
shared base resolved (:mod:`~ambisam.bundle.config`), and running them, stage by stage
(:mod:`~ambisam.bundle.runner`), and a new bundle's config folder (:mod:`~ambisam.bundle.scaffold`)."""

from ambisam.bundle.config import BASE_CONFIG_DIR, MACRO_ROOT, flatten_config, load_bundle_config, resolve_macros
from ambisam.bundle.locator import BUNDLES_DIR, available_bundles, bundle_dir, config_path, find_bundle
from ambisam.bundle.runner import bundle_workflow, run_bundle, run_stages, stage_weights
from ambisam.bundle.scaffold import BASE_CONFIGS, base_macros, write_bundle_configs

__all__ = [
    "BASE_CONFIG_DIR",
    "MACRO_ROOT",
    "BUNDLES_DIR",
    "available_bundles",
    "bundle_dir",
    "config_path",
    "find_bundle",
    "flatten_config",
    "load_bundle_config",
    "resolve_macros",
    "bundle_workflow",
    "run_bundle",
    "run_stages",
    "stage_weights",
    "BASE_CONFIGS",
    "base_macros",
    "write_bundle_configs",
]
