"""The one sampling inferer (:mod:`~ambisam.inferers.sampling`) and the layout of its output
(:mod:`~ambisam.inferers.layout`)."""

from ambisam.inferers.layout import (
    OUTPUT_NAMES,
    OUTPUT_SUFFIXES,
    SAMPLING_CHANNELS,
    binary_entropy,
    num_structures,
    sampling_maps,
    split_sampling_output,
)
from ambisam.inferers.sampling import SlicewiseSamplingInferer

__all__ = [
    "SlicewiseSamplingInferer",
    "SAMPLING_CHANNELS",
    "OUTPUT_NAMES",
    "OUTPUT_SUFFIXES",
    "binary_entropy",
    "num_structures",
    "sampling_maps",
    "split_sampling_output",
]
