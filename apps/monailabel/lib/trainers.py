"""Training a frozen-encoder bundle from MONAI Label: MONAI Label's own ``BundleTrainTask`` on the bundle's
``train.json``, with the datastore's finished labels as the training and validation data.

What differs from training from the command line, and why:

- The datastore holds one finished label per image (an annotator's mask, or a multi-rater stack), so the bundle's
  ``num_raters`` becomes 1 (at least one rater mask) unless the request sets it.
- Each request is a new run in ``<working copy>/runs/monailabel/<time>/`` (fine-tuning from the served
  ``models/model.pt``, which MONAI Label loads when ``pretrained`` is on) rather than resuming the bundle's own
  checkpoints (the served weights reach the first stage as its ``init_weights``); when it completes, its best
  ``model.pt`` replaces the served one, and the infer task reloads it.
- Validation runs every ``val_interval`` epochs (default 1) so that a short run still writes ``model.pt``; with
  too few labelled images for a validation split, the training images are validated on.
- A method with several training stages (``ambisam.registry``: ``stages``) fine-tunes its **last** stage only: the
  served weights are that stage's (P2SAM: stage 2, the frozen merged encoder and the prompt distribution), and
  the earlier stages built what it starts from (P2SAM's stage 1 trains the encoder, which an annotation session
  should not redo; a stage-2 state dict is not even a stage-1 network's).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai.bundle
from monailabel.tasks.train.bundle import BundleTrainTask

from ambisam.bundle import flatten_config
from ambisam.registry import method_registry

__all__ = ["FrozenEncoderBundleTrainTask"]

logger = logging.getLogger(__name__)


class FrozenEncoderBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` for a bundle whose image encoder is frozen (trained from cached embeddings).

    Args:
        path: the bundle's working copy.
        conf: the app's ``--conf`` pairs.
        kwargs: passed to ``BundleTrainTask``.
    """

    def __init__(self, path: str, conf: Mapping[str, str], **kwargs: Any) -> None:
        kwargs.setdefault("load_strict", True)
        super().__init__(path, dict(conf), **kwargs)
        self._request: dict = {}
        self._run_dir: Path | None = None
        self._pretrained: str | None = None

    def _bundle_value(self, key: str, default: Any) -> Any:
        value = self.bundle_config.get(key)
        return default if value is None or isinstance(value, str) else value

    def config(self) -> dict[str, Any]:
        options = super().config()
        options.update(
            {
                "max_epochs": self._bundle_value("max_epochs", 8),
                "val_split": 0.2,
                "val_interval": 1,
                "num_samples": self._bundle_value("num_samples", 16),
                "multi_gpu": False,
            }
        )
        return options

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Fine-tune from the served weights through the bundle's own ``init_weights`` (the shared base's
        ``CheckpointLoader``): MONAI Label would add its loader only to a bundle without one, and the base has one
        (and MONAI Label 0.8.5 calls ``os.path.exists(None)`` when pretrained is off, a TypeError)."""
        self._pretrained = model_pytorch if pretrained and model_pytorch and os.path.exists(model_pytorch) else None

    def _partition_datalist(self, datalist, request, shuffle=False):
        train_ds, val_ds = super()._partition_datalist(datalist, request, shuffle)
        if not train_ds:
            raise ValueError("no labelled image in the datastore: save at least one finished label before training")
        if not val_ds:  # never fall back to the bundle's default data set (it would be generated in the cwd)
            logger.warning("too few labelled images for a validation split: validating on the training images")
            val_ds = list(train_ds)
        return train_ds, val_ds

    def _update_overrides(self, overrides: dict) -> dict:
        request = self._request
        run_dir = self._run_dir
        overrides.update(
            {
                "max_epochs": overrides.get(self.const.key_train_trainer_max_epochs(), 1),
                "val_interval": int(request.get("val_interval", 1)),
                # at least one rater mask per label (an annotator's, or a multi-rater stack); None would be dropped
                # by monai.bundle.run, which ignores None overrides
                "num_raters": int(request.get("num_raters") or 1),
                "ckpt_dir": str(run_dir / "models"),
                "output_dir": str(run_dir),
            }
        )
        if request.get("num_samples"):
            overrides["num_samples"] = int(request["num_samples"])
        return overrides

    @property
    def stages(self) -> list[list[str]]:
        """The stages a request runs (config names): the bundle's last training stage, from the method registry
        (the one whose weights are served); ``[["train"]]`` by default."""
        spec = method_registry.get(Path(self.bundle_path).name)
        return [list(spec.stages[-1])] if spec is not None and spec.stages else [["train"]]

    def _stage_files(self, stage: list[str]) -> list[str]:
        return [os.path.join(self.bundle_path, "configs", f"{name}.json") for name in stage]

    def _model_file(self) -> str:
        """The file the last stage saves its best weights to (``model_file``)."""
        return str(flatten_config(self._stage_files(self.stages[-1])).get("model_file", "model.pt"))

    def run_single_gpu(self, request, overrides):
        """The stages in order (one, see :attr:`stages`), the first from the served weights, each next one from the
        weights the previous one saved."""
        run_id = request.get("run_id", "run")
        init = None
        for i, stage in enumerate(self.stages):
            files = self._stage_files(stage)
            stage_overrides = dict(overrides, init_weights=init if i else self._pretrained)
            logger.info(f"training stage {i + 1}/{len(self.stages)}: {' + '.join(stage)}")
            monai.bundle.run(run_id=run_id, init_id=None, final_id=None, meta_file=self.bundle_metadata_path,
                             config_file=files, **stage_overrides)
            model_file = str(flatten_config(files).get("model_file", "model.pt"))
            init = os.path.join(str(overrides["ckpt_dir"]), model_file)

    def __call__(self, request, datastore):
        self._request = dict(request)
        self._run_dir = Path(self.bundle_path) / "runs" / "monailabel" / time.strftime("%Y%m%d-%H%M%S")
        result = super().__call__(request, datastore)
        trained = self._run_dir / "models" / self._model_file()
        served = Path(self.bundle_path) / "models" / "model.pt"
        if trained.is_file():
            served.parent.mkdir(parents=True, exist_ok=True)
            tmp = served.with_name(".model.pt.training")
            shutil.copy2(trained, tmp)
            os.replace(tmp, served)
            os.utime(served)  # a new mtime: the infer task reloads the network
            logger.info(f"new weights served: {served} (from {trained})")
        else:
            logger.warning(f"training wrote no model.pt in {trained.parent}: the served weights are unchanged")
        return result or {}
