"""The field's metrics for distributions of segmentation masks (METHODS.md, "Metrics").

- :mod:`~ambisam.metrics.functional`: one image's samples ``(N, *spatial)`` and raters ``(K, *spatial)`` -> float.
- :mod:`~ambisam.metrics.metric`: MONAI ``CumulativeIterationMetric`` classes over batches (DDP-gathered).
- :mod:`~ambisam.metrics.handlers`: Ignite handlers for MONAI evaluators and bundle configs.
- :mod:`~ambisam.metrics.inputs`: which evaluation output a metric reads (probability maps, else samples).
"""

from __future__ import annotations

from ambisam.metrics.functional import (
    dice_max,
    dice_mean,
    ece,
    ece_bin_statistics,
    ece_from_bin_statistics,
    empty_fractions,
    ged,
    hm_iou,
    ncc,
    pairwise_dice,
    pairwise_iou,
    personalised_dice,
    sample_diversity,
    soft_dice,
)
from ambisam.metrics.handlers import (
    DiceMaxHandler,
    DiceMeanHandler,
    ECEHandler,
    GEDHandler,
    HMIoUHandler,
    NCCHandler,
    PersonalisedDiceHandler,
    PresenceHandler,
    SampleDiversityHandler,
    SoftDiceHandler,
)
from ambisam.metrics.inputs import MetricInputs
from ambisam.metrics.metric import (
    CONFIDENCES,
    DiceMaxMetric,
    DiceMeanMetric,
    DistributionMetric,
    ECEMetric,
    GEDMetric,
    HMIoUMetric,
    NCCMetric,
    PersonalisedDiceMetric,
    PresenceMetric,
    SampleDiversityMetric,
    SoftDiceMetric,
)

__all__ = [
    "pairwise_iou",
    "pairwise_dice",
    "ged",
    "sample_diversity",
    "hm_iou",
    "dice_max",
    "dice_mean",
    "soft_dice",
    "ncc",
    "ece_bin_statistics",
    "ece_from_bin_statistics",
    "ece",
    "empty_fractions",
    "personalised_dice",
    "CONFIDENCES",
    "MetricInputs",
    "DistributionMetric",
    "GEDMetric",
    "SampleDiversityMetric",
    "HMIoUMetric",
    "DiceMaxMetric",
    "DiceMeanMetric",
    "SoftDiceMetric",
    "NCCMetric",
    "ECEMetric",
    "PresenceMetric",
    "PersonalisedDiceMetric",
    "GEDHandler",
    "SampleDiversityHandler",
    "HMIoUHandler",
    "DiceMaxHandler",
    "DiceMeanHandler",
    "SoftDiceHandler",
    "NCCHandler",
    "ECEHandler",
    "PresenceHandler",
    "PersonalisedDiceHandler",
]
