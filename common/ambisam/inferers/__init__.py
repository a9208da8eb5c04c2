"""The one sampling inferer (:mod:`~ambisam.inferers.sampling`), the layout of its output
(:mod:`~ambisam.inferers.layout`), its region form (:mod:`~ambisam.inferers.region`), the box prompts that
follow a structure from slice to slice (:mod:`~ambisam.inferers.propagation`) and UR-SAM's organ boxes
from the localiser (:mod:`~ambisam.inferers.localise`)."""

from ambisam.inferers.layout import (
    OUTPUT_NAMES,
    OUTPUT_SUFFIXES,
    OPTIONAL_OUTPUT_SUFFIXES,
    SAMPLING_CHANNELS,
    binary_entropy,
    num_structures,
    sampling_maps,
    split_sampling_output,
)
from ambisam.inferers.propagation import (
    PROPAGATION_STARTS,
    BoxPropagation,
    PropagationUnit,
    check_propagation_margin,
    check_propagation_start,
    propagated_boxes,
)
from ambisam.inferers.localise import (
    EXTREME_POINTS,
    MIN_EXTENT_VOXELS,
    LocaliseOrgansd,
    LocaliserGrid,
    OrganLocaliser,
    box_overlap,
    extreme_points,
    organ_box,
    score_boxes,
)
from ambisam.inferers.region import dense, is_region, region_parts, region_planes, sampling_region
from ambisam.inferers.sampling import SlicewiseSamplingInferer

__all__ = [
    "SlicewiseSamplingInferer",
    "OrganLocaliser",
    "LocaliseOrgansd",
    "LocaliserGrid",
    "EXTREME_POINTS",
    "MIN_EXTENT_VOXELS",
    "box_overlap",
    "extreme_points",
    "organ_box",
    "score_boxes",
    "SAMPLING_CHANNELS",
    "OUTPUT_NAMES",
    "OUTPUT_SUFFIXES",
    "OPTIONAL_OUTPUT_SUFFIXES",
    "binary_entropy",
    "num_structures",
    "sampling_maps",
    "split_sampling_output",
    "sampling_region",
    "is_region",
    "region_parts",
    "region_planes",
    "dense",
    "PROPAGATION_STARTS",
    "BoxPropagation",
    "PropagationUnit",
    "check_propagation_margin",
    "check_propagation_start",
    "propagated_boxes",
]
