"""Running a bundle's configs in this process, as ``python -m monai.bundle run`` does, and running a method's
training stages in order.

A training stage is a list of a bundle's configs (``["train"]``, then ``["train", "train_stage2"]``); each stage
after the first starts from the weights the previous one saved (``init_weights``, a top-level id of the base
train config), unless the caller gives ``init_weights`` itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ambisam.bundle.config import resolve_macros
from ambisam.bundle.locator import bundle_dir, config_path

__all__ = ["bundle_workflow", "run_bundle", "run_stages", "stage_weights"]

logger = logging.getLogger(__name__)


def bundle_workflow(bundle: str | os.PathLike, configs: Sequence[str], workflow_type: str | None = None, **override: Any):
    """A ``ConfigWorkflow`` over a bundle's configs with the shared base resolved, so that ``override`` may set
    nested ids too (``"train#handlers"``, ``"validate#inferer#cache"``).

    Args:
        bundle: a bundle name or folder.
        configs: config names in merge order (``["train", "evaluate"]``).
        workflow_type: ``"train"``, ``"infer"`` or ``None`` (MONAI's property checks).
        override: config overrides.

    Returns:
        The workflow, not initialised.
    """
    from monai.bundle import ConfigWorkflow

    folder = bundle_dir(bundle) / "configs"
    files = [str(config_path(bundle, c)) for c in configs]
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"),
        workflow_type=workflow_type,
    )
    workflow.parser.set(resolve_macros(workflow.parser.get(), files[-1]))
    workflow.parser.update(pairs=override)
    return workflow


def run_bundle(bundle: str | os.PathLike, configs: Sequence[str], **override: Any):
    """Initialise, run and finalise a bundle's configs (see :func:`bundle_workflow`); returns the workflow."""
    workflow = bundle_workflow(bundle, configs, **override)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def stage_weights(workflow) -> str:
    """The weights a finished training stage saved (``ckpt_dir/model_file``): where the next stage starts."""
    parser = workflow.parser
    return os.path.join(parser.get_parsed_content("ckpt_dir"), parser.get_parsed_content("model_file"))


def run_stages(bundle: str | os.PathLike, stages: Sequence[Sequence[str]], **override: Any) -> list:
    """Run training stages in order, each from the weights the previous one saved.

    Args:
        bundle: a bundle name or folder.
        stages: each stage's config names (``[["train"], ["train", "train_stage2"]]``).
        override: overrides for every stage (``init_weights`` applies to the first only).

    Returns:
        The stages' workflows.
    """
    workflows = []
    init = override.pop("init_weights", None)
    for i, stage in enumerate(stages):
        logger.info(f"{Path(str(bundle)).name}: training stage {i + 1}/{len(stages)} ({' + '.join(stage)})")
        workflow = run_bundle(bundle, list(stage), **override, init_weights=init)
        init = stage_weights(workflow)
        workflows.append(workflow)
    return workflows
