"""The best-model saver of a training run whose best score survives a resume.

MONAI's ``CheckpointSaver(save_key_metric=True)`` keeps the best key-metric score in memory only (Ignite's
``Checkpoint`` list of saved items). A run resumed from its epoch checkpoint (:class:`ResumeFromCheckpoint`)
starts with an empty list, so its first validation overwrote ``model.pt`` even when it scored worse than the best
model before the interruption: the best weights were lost without a word. :class:`BestModelSaver` writes that list
beside the model (``<model file>.best.json``, atomically, after every validation) and reads it back when the run
resumes, that is when an epoch checkpoint of ``resume_prefix`` is in ``save_dir``. A run that starts afresh
ignores an old record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from ambisam.engines.handlers import latest_checkpoint
from ambisam.io import write_json

__all__ = ["BestModelSaver"]

logger = logging.getLogger(__name__)


class BestModelSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` saving the best model by the key metric, its best score kept across a
    resume.

    Args:
        save_dir: where the model file (and its ``.best.json`` record) go.
        save_dict: the objects to save (``{"model": network}``).
        key_metric_filename: the model file's name (``model.pt``).
        resume_prefix: the file prefix of the training run's epoch checkpoints (``checkpoint``,
            ``stage1_checkpoint``); a run is resuming when one of them is in ``save_dir``. ``None``: never resume
            the record.
        kwargs: more ``CheckpointSaver`` arguments (``key_metric_negative_sign``, ``key_metric_name``, ...);
            ``save_key_metric`` is always on.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        key_metric_filename: str = "model.pt",
        resume_prefix: str | None = "checkpoint",
        **kwargs: Any,
    ) -> None:
        kwargs["save_key_metric"] = True
        super().__init__(save_dir, save_dict, key_metric_filename=key_metric_filename, **kwargs)
        self.model_path = Path(save_dir) / key_metric_filename
        self.record_path = self.model_path.with_name(self.model_path.name + ".best.json")
        self.resume_prefix = resume_prefix

    def attach(self, engine: Engine) -> None:
        """Attach to the validator: restore the best score when the run resumes, record it after each save."""
        super().attach(engine)
        if self._resuming():
            saved = json.loads(self.record_path.read_text())["saved"]
            self._key_metric_checkpoint.load_state_dict({"_saved": [(p, f) for p, f in saved]})
            logger.info(f"resuming the best model {self.model_path} (key metric score {saved[0][0]})")
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write_record)  # after the saver's own handler

    def _resuming(self) -> bool:
        return (
            self.resume_prefix is not None
            and latest_checkpoint(self.save_dir, self.resume_prefix) is not None
            and self.model_path.is_file()
            and self.record_path.is_file()
        )

    def _write_record(self, engine: Engine) -> None:
        saved = self._key_metric_checkpoint.state_dict()["_saved"]
        if saved and self.model_path.is_file():
            write_json(self.record_path, {"saved": [[float(p), str(f)] for p, f in saved]})
