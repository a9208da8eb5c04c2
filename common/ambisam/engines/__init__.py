"""Training and evaluation engines shared by every bundle: one trainer with overridable hooks, and the
handlers MONAI lacks."""

from ambisam.engines.best_model import BestModelSaver
from ambisam.engines.handlers import (
    MetricsReportWriter,
    ResumeFromCheckpoint,
    SamplingOutputWriter,
    key_metric_score,
    latest_checkpoint,
    lower_is_better,
    require_weights,
)
from ambisam.engines.strategy_table import StrategyTableWriter
from ambisam.engines.localiser import (
    LocaliserTrainer,
    RelativeOffsetInferer,
    localiser_views_forward,
    offset_error_output,
    prepare_localiser_batch,
)
from ambisam.engines.trainer import MultiRaterTrainer, prepare_multirater_batch, slice_batches, take_slices

__all__ = [
    "BestModelSaver",
    "MultiRaterTrainer",
    "LocaliserTrainer",
    "RelativeOffsetInferer",
    "localiser_views_forward",
    "prepare_localiser_batch",
    "offset_error_output",
    "prepare_multirater_batch",
    "slice_batches",
    "take_slices",
    "MetricsReportWriter",
    "ResumeFromCheckpoint",
    "SamplingOutputWriter",
    "StrategyTableWriter",
    "require_weights",
    "latest_checkpoint",
    "lower_is_better",
    "key_metric_score",
]
