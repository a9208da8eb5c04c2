"""Training and evaluation engines shared by every bundle: one trainer with overridable hooks, and the
handlers MONAI lacks."""

from ambisam.engines.handlers import (
    MetricsReportWriter,
    ResumeFromCheckpoint,
    SamplingOutputWriter,
    latest_checkpoint,
    lower_is_better,
    require_weights,
)
from ambisam.engines.trainer import MultiRaterTrainer, SetTrainer

__all__ = [
    "MultiRaterTrainer",
    "SetTrainer",
    "MetricsReportWriter",
    "ResumeFromCheckpoint",
    "SamplingOutputWriter",
    "require_weights",
    "latest_checkpoint",
    "lower_is_better",
]
