"""The multi-rater data pipeline: datalists (:mod:`ambisam.data.datalist`) and their top-level blocks (raters,
class map, intensity: :mod:`ambisam.data.conventions`), case ids (:mod:`ambisam.data.ids`), synthetic CT-like data
sets (:mod:`ambisam.data.synth`: one lesion, K raters; :mod:`ambisam.data.synth_organs`: 13 abdominal organs, one
rater), a byte-bounded caching dataset (:mod:`ambisam.data.datasets`), converters from public layouts
(:mod:`ambisam.data.convert`), MONAI dictionary transforms (:mod:`ambisam.data.transforms`) and ready pipelines
(:mod:`ambisam.data.pipelines`)."""

from ambisam.data.conventions import (
    DEFAULT_INTENSITY,
    IntensityConvention,
    datalist_class_map,
    datalist_intensity,
    datalist_raters,
)
from ambisam.data.convert import FORMATS, convert, read_groups
from ambisam.data.datasets import BoundedCacheDataset, item_bytes
from ambisam.data.datalist import (
    SPLITS,
    limit_training_items,
    load_datalist,
    natural_key,
    parse_split,
    split_by_patient,
    write_datalist,
)
from ambisam.data.ids import IMAGE_EXTENSIONS, case_id, strip_image_extension
from ambisam.data.inputs import check_inputs, inference_items
from ambisam.data.pipelines import (
    RATER_ORDERS,
    localiser_training_transforms,
    localiser_volume_transforms,
    training_slice_transforms,
    volume_transforms,
)
from ambisam.data.synth import ensure_dataset, synth_case, synthesize, synthesize_dataset
from ambisam.data.synth_organs import FLARE22_LABELS, organ_names, synth_organ_case, synthesize_organs
from ambisam.data.transforms import (
    NO_BOX,
    PROMPT_PROTOCOLS,
    BoxesFromLabeld,
    BoxFromRaterd,
    CaseSeedd,
    LesionCropd,
    LoadBoxd,
    LocaliserPairsd,
    PiecewiseLinearIntensityd,
    LoadRatersd,
    RankRatersByAread,
    SelectReadRatersd,
    PromptBoxesd,
    ResizeBoxd,
    SelectSlicesd,
    SplitSamplingOutputd,
    StructureMasksd,
    ValidateMultiRaterd,
    box_from_mask,
    boxes_from_mask,
    case_seed,
    check_prompt,
    intensity_transform,
    piecewise_linear_intensity,
    slice_boxes_from_box3d,
)

from ambisam.io import write_nifti  # the writer, re-exported for data-set scripts

__all__ = [
    "BoundedCacheDataset",
    "item_bytes",
    "DEFAULT_INTENSITY",
    "IntensityConvention",
    "datalist_class_map",
    "datalist_intensity",
    "datalist_raters",
    "FORMATS",
    "convert",
    "read_groups",
    "SPLITS",
    "load_datalist",
    "natural_key",
    "parse_split",
    "split_by_patient",
    "limit_training_items",
    "write_datalist",
    "write_nifti",
    "IMAGE_EXTENSIONS",
    "case_id",
    "strip_image_extension",
    "check_inputs",
    "inference_items",
    "RATER_ORDERS",
    "training_slice_transforms",
    "volume_transforms",
    "localiser_volume_transforms",
    "localiser_training_transforms",
    "ensure_dataset",
    "synth_case",
    "synthesize",
    "synthesize_dataset",
    "FLARE22_LABELS",
    "organ_names",
    "synth_organ_case",
    "synthesize_organs",
    "CaseSeedd",
    "case_seed",
    "NO_BOX",
    "BoxesFromLabeld",
    "BoxFromRaterd",
    "PROMPT_PROTOCOLS",
    "check_prompt",
    "LesionCropd",
    "LoadBoxd",
    "LoadRatersd",
    "RankRatersByAread",
    "SelectReadRatersd",
    "PromptBoxesd",
    "ResizeBoxd",
    "SelectSlicesd",
    "SplitSamplingOutputd",
    "StructureMasksd",
    "ValidateMultiRaterd",
    "box_from_mask",
    "boxes_from_mask",
    "intensity_transform",
    "piecewise_linear_intensity",
    "PiecewiseLinearIntensityd",
    "LocaliserPairsd",
    "slice_boxes_from_box3d",
]
