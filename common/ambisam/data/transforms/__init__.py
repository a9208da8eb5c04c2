"""MONAI dictionary transforms for multi-rater, box-prompted segmentation: only what MONAI does not already do.

Conventions (shared across ``ambisam``):

- after ``LoadImaged(keys="image", ensure_channel_first=True)`` and :class:`LoadRatersd` (``LoadImaged`` for rater
  masks) a case is ``image (1, H, W, D)``, ``label (K, H, W, D)``: the ``K`` raters' 0/1 masks stacked as channels
  in the datalist's rater order (a zero channel for a rater who did not read the case), and ``rater_valid (K,)``
  (1 = read); :class:`StructureMasksd` turns multi-label rater maps into ``(S * K, H, W, D)`` binary masks. A 2D
  image is a one-slice volume (``D = 1``); slices run along the last axis and arrays are indexed ``a[c, i, j, k]``;
- a 2D box for SAM is ``[x_min, y_min, x_max, y_max] = [j_min, i_min, j_max, i_max]`` (x along the columns ``j``,
  y along the rows ``i``), inclusive pixel indices, ``float32``;
- per-slice boxes of a volume are a ``(D, 4)`` tensor whose row ``k`` is the box on slice ``k``, or
  ``[-1, -1, -1, -1]`` where slice ``k`` has no prompt (that slice is background, not a model call);
- a 3D box is ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices of the stored array; a box
  file is JSON ``{"box": [...]}``.

Everything MONAI already does (loading, orientation, spacing, intensity scaling, cropping, padding, resizing,
inverting, saving) is done with MONAI's own transforms; :func:`intensity_transform` only picks the right one.
"""

from ambisam.data.transforms.boxes import (
    NO_BOX,
    PROMPT_PROTOCOLS,
    BoxesFromLabeld,
    BoxFromRaterd,
    LoadBoxd,
    PromptBoxesd,
    ResizeBoxd,
    box_from_mask,
    boxes_from_mask,
    check_prompt,
    slice_boxes_from_box3d,
)
from ambisam.data.transforms.intensity import (
    PiecewiseLinearIntensityd,
    intensity_transform,
    piecewise_linear_intensity,
)
from ambisam.data.transforms.localiser import LocaliserPairsd
from ambisam.data.transforms.organ_boxes import ORGAN_PROMPTS, ManualOrganBoxesd, OrganBoxFiled, OrganPromptsd
from ambisam.data.transforms.outputs import SplitSamplingOutputd
from ambisam.data.transforms.rectification import RectifyByUncertaintyd, multi_label_volume
from ambisam.data.transforms.seeds import CaseSeedd, case_seed
from ambisam.data.transforms.raters import LoadRatersd, RankRatersByAread, SelectReadRatersd
from ambisam.data.transforms.slices import LesionCropd, SelectSlicesd
from ambisam.data.transforms.structures import StructureMasksd
from ambisam.data.transforms.validation import ValidateMultiRaterd

__all__ = [
    "NO_BOX",
    "box_from_mask",
    "boxes_from_mask",
    "slice_boxes_from_box3d",
    "ValidateMultiRaterd",
    "intensity_transform",
    "piecewise_linear_intensity",
    "PiecewiseLinearIntensityd",
    "LocaliserPairsd",
    "SelectSlicesd",
    "LesionCropd",
    "BoxFromRaterd",
    "PROMPT_PROTOCOLS",
    "check_prompt",
    "BoxesFromLabeld",
    "PromptBoxesd",
    "LoadBoxd",
    "ResizeBoxd",
    "SplitSamplingOutputd",
    "ORGAN_PROMPTS",
    "ManualOrganBoxesd",
    "OrganBoxFiled",
    "OrganPromptsd",
    "RectifyByUncertaintyd",
    "multi_label_volume",
    "LoadRatersd",
    "RankRatersByAread",
    "SelectReadRatersd",
    "StructureMasksd",
    "CaseSeedd",
    "case_seed",
]
