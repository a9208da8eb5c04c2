"""Ready MONAI ``Compose`` pipelines built from :mod:`ambisam.data.transforms` and MONAI's own transforms.

Bundle configs may use these factories or list the same transforms directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    SelectItemsd,
    Spacingd,
)

from ambisam.data.transforms import (
    BoxesFromLabeld,
    BoxFromRaterd,
    LesionCropd,
    LoadBoxd,
    LoadRatersd,
    RankRatersByAread,
    ResizeBoxd,
    SelectSlicesd,
    StructureMasksd,
    ValidateMultiRaterd,
    intensity_transform,
)
from ambisam.data.transforms.intensity import PiecewiseLinearIntensityd
from ambisam.data.transforms.localiser import LOCALISER_SPACING_MM, PATCH_SIZE, LocaliserPairsd

__all__ = [
    "RATER_ORDERS",
    "volume_transforms",
    "training_slice_transforms",
    "localiser_volume_transforms",
    "localiser_training_transforms",
]

#: the ``rater_order`` of the pipelines: the datalist's rater table, or the area rank (:class:`RankRatersByAread`)
RATER_ORDERS = ("datalist", "area")


def _check_rater_order(rater_order: str) -> str:
    if rater_order not in RATER_ORDERS:
        raise ValueError(f"rater_order must be one of {', '.join(map(repr, RATER_ORDERS))}, got {rater_order!r}.")
    return rater_order


def _load_and_check(
    modality: str,
    window: Sequence[float],
    num_raters: int | None,
    label_optional: bool,
    value_range: Sequence[float] | None,
    class_map: Mapping[str, int] | None,
    structures: Sequence[str] | None,
    rater_order: str,
) -> list:
    """``LoadImaged`` + :class:`LoadRatersd` + :class:`ValidateMultiRaterd` (+ :class:`RankRatersByAread` with
    ``rater_order="area"``) + intensity (+ :class:`StructureMasksd` with a class map); the label may be absent when
    ``label_optional``."""
    values = None if class_map is None else list(class_map.values())
    xs = [
        LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
        LoadRatersd("label", image_only=True, allow_missing_keys=label_optional),
        ValidateMultiRaterd("image", "label", num_raters, allow_missing_keys=label_optional, label_values=values),
    ]
    if _check_rater_order(rater_order) == "area":
        xs.append(RankRatersByAread("label", allow_missing_keys=label_optional))
    xs.append(intensity_transform("image", modality, window, value_range=value_range))
    if class_map is not None:
        xs.append(StructureMasksd("label", class_map, structures, allow_missing_keys=label_optional))
    return xs


def volume_transforms(
    modality: str = "ct",
    window: Sequence[float] = (-1000, 400),
    num_raters: int | None = None,
    orientation: str | None = None,
    spacing: Sequence[float] | None = None,
    box: bool = False,
    value_range: Sequence[float] | None = None,
    class_map: Mapping[str, int] | None = None,
    structures: Sequence[str] | None = None,
    rater_order: str = "datalist",
) -> Compose:
    """Pre-processing of whole volumes for inference and evaluation.

    ``LoadImaged`` (image) and :class:`LoadRatersd` (label, when present) -> :class:`ValidateMultiRaterd` ->
    optional :class:`RankRatersByAread` -> intensity to ``[0, 1]`` -> optional :class:`StructureMasksd` -> optional :class:`LoadBoxd` -> optional
    ``Orientationd`` / ``Spacingd`` (label nearest). Every step is invertible or metadata-free, so
    ``Invertd(transform=<this>, orig_keys="image")`` maps predictions back.

    Args:
        modality: ``"ct"``, ``"mri"`` or ``"none"`` (see :func:`intensity_transform`).
        window: the CT window in HU.
        num_raters: the number of raters the dataset declares (checked when a label is present).
        orientation: e.g. ``"RAS"``; ``None`` keeps the stored orientation.
        spacing: target voxel spacing ``(si, sj, sk)``; ``None`` keeps the stored spacing.
        box: read the item's optional 3D ``"box"`` (JSON file or list) into per-slice boxes ``box (D, 4)``; with
            ``orientation``/``spacing`` the box travels as a mask through the resampling and the per-slice boxes
            are rebuilt afterwards, so they refer to the resampled slices.
        value_range: with ``modality="none"``: the fixed ``(low, high)`` range scaled to ``[0, 1]`` (the datalist's
            ``intensity.range``); ``None``: per-image min-max.
        class_map: the datalist's ``labels`` (see :func:`~ambisam.data.datalist_class_map`): the label files hold
            these integer values, and ``label`` becomes ``(S * K, H, W, D)`` binary masks (:class:`StructureMasksd`).
        structures: with ``class_map``: the structures to keep, in order (``None``: all).
        rater_order: ``"datalist"`` (default): label channel ``r`` is rater ``r`` of the datalist's rater table;
            ``"area"``: the channels are reordered by ascending foreground area over the whole volume
            (:class:`RankRatersByAread`, ProSeg's LIDC convention: rater ``r`` is the ``r``-th smallest mask, raters
            who did not read the case last), when the item has a label.

    Returns:
        A ``Compose`` giving ``image (1, H, W, D)`` in ``[0, 1]``, ``label (K, H, W, D)`` (``(S * K, H, W, D)``
        with a class map, plus ``structures``) and ``rater_valid (K,)`` when the item has a label (and
        ``rater_order (K,)``, the datalist channel of each channel, with ``rater_order="area"``), and ``box (D, 4)``
        when ``box`` is set and the item has one.

    Raises:
        ValueError: an unknown ``rater_order``.
    """
    resample = orientation is not None or spacing is not None
    xs = _load_and_check(modality, window, num_raters, True, value_range, class_map, structures, rater_order)
    spatial_keys = ["image", "label"]
    if box:
        xs.append(LoadBoxd("box", "image", mask_key="box_mask" if resample else None, allow_missing_keys=True))
        if resample:
            spatial_keys.append("box_mask")
    if orientation is not None:
        xs.append(Orientationd(keys=spatial_keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        modes = ["bilinear"] + ["nearest"] * (len(spatial_keys) - 1)
        xs.append(Spacingd(keys=spatial_keys, pixdim=spacing, mode=modes, allow_missing_keys=True))
    if box and resample:
        xs.append(BoxesFromLabeld(label_key="box_mask", box_key="box", allow_missing_keys=True))
        xs.append(DeleteItemsd(keys="box_mask"))
    return Compose(xs)


def training_slice_transforms(
    modality: str = "ct",
    window: Sequence[float] = (-1000, 400),
    num_raters: int | None = None,
    empty_share: float = 0.1,
    crop_size: Sequence[int] | int | None = None,
    rater: str | int = "random",
    jitter: int = 0,
    spatial_size: Sequence[int] | int = 256,
    value_range: Sequence[float] | None = None,
    class_map: Mapping[str, int] | None = None,
    structures: Sequence[str] | None = None,
    rater_order: str = "datalist",
    prompt: str = "random_rater",
) -> Compose:
    """Training pipeline: one volume -> a list of 2D slice dicts ready for a SAM backbone.

    ``LoadImaged`` + :class:`LoadRatersd` -> :class:`ValidateMultiRaterd` -> optional :class:`RankRatersByAread`
    -> intensity -> optional
    :class:`StructureMasksd` -> :class:`SelectSlicesd` -> optional
    :class:`LesionCropd` -> :class:`BoxFromRaterd` -> :class:`ResizeBoxd` + ``Resized`` (image bilinear, masks
    nearest) to the backbone input.

    Args:
        modality: ``"ct"``, ``"mri"`` or ``"none"``.
        window: the CT window in HU.
        num_raters: the number of raters the dataset declares.
        empty_share: expected share of empty slices among the selected ones (see :class:`SelectSlicesd`).
        crop_size: lesion-centred crop size (e.g. 128), or ``None`` for the whole slice.
        rater: ``"random"`` (among the raters who read the case), a fixed index or ``"union"`` (see
            :class:`BoxFromRaterd`).
        jitter: box jitter in pixels (before resizing).
        spatial_size: the backbone's square input size (256 LiteMedSAM, 1024 SAM), or ``(H, W)``.
        value_range, class_map, structures: as :func:`volume_transforms`.
        rater_order: as :func:`volume_transforms`; with ``"area"`` the volume's raters are ranked before the
            slices are selected, so ``rater_id`` (and ``rater_index``) is the rater's area rank in the whole volume,
            the same on every slice of the case.
        prompt: the box-prompt protocol (:data:`~ambisam.data.PROMPT_PROTOCOLS`): ``"random_rater"``: the target
            rater's own box; ``"union"``: the raters' union box, whichever rater is the target.

    Returns:
        A ``Compose`` whose output is a list of dicts with ``image (1, S, S)``, ``label (K, S, S)`` (``S * K``
        channels with a class map), ``rater_valid (K,)``, ``rater_mask (1, S, S)``, ``box (4,)`` in input
        coordinates, ``rater_index`` (the label channel), ``rater_id`` (the rater's index in the datalist's rater
        table, or its area rank with ``rater_order="area"``; ``-1`` for the union), ``id`` and ``slice_index``
        (and ``rater_order (K,)`` with ``rater_order="area"``).
        Use MONAI's ``list_data_collate`` (the default of ``monai.data.DataLoader``).

    Raises:
        ValueError: an unknown ``rater_order``.
    """
    size = list(spatial_size) if isinstance(spatial_size, Sequence) else [int(spatial_size)] * 2
    masks = ["label", "rater_mask"]
    xs = _load_and_check(modality, window, num_raters, False, value_range, class_map, structures, rater_order)
    xs.append(SelectSlicesd("label", empty_share))
    if crop_size is not None:
        xs.append(LesionCropd(keys=["image", "label"], label_key="label", spatial_size=crop_size))
    xs += [
        BoxFromRaterd("label", rater=rater, jitter=jitter, prompt=prompt),
        ResizeBoxd("box", ref_key="image", spatial_size=size),
        Resized(keys=["image"] + masks, spatial_size=size, mode=["bilinear"] + ["nearest"] * len(masks)),
    ]
    return Compose(xs)


def localiser_volume_transforms(load: bool = True, spacing: float = LOCALISER_SPACING_MM) -> Compose:
    """A CT volume on the localiser's grid: ``Orientationd`` to RAS, the piecewise-linear HU map
    (:class:`~ambisam.data.transforms.intensity.PiecewiseLinearIntensityd`, air 0), ``Spacingd`` to ``spacing`` mm
    isotropic with ``diagonal=True`` (any rotation or shear of the affine is resampled away, so the grid's
    ``(i, j, k)`` are the world's RAS axes; outside the scan is 0, air) and ``float32``.

    Args:
        load: start with ``LoadImaged`` of ``image`` (a datalist item); ``False``: ``image`` is already a
            ``(1, H, W, D)`` MetaTensor in HU.
        spacing: the grid's voxel size in mm.

    Returns:
        A ``Compose`` giving ``image (1, h, w, d)`` with its grid affine (``image.affine``).
    """
    xs = [LoadImaged(keys="image", ensure_channel_first=True, image_only=True)] if load else []
    xs += [
        Orientationd(keys="image", axcodes="RAS", labels=None),
        PiecewiseLinearIntensityd("image"),
        Spacingd(keys="image", pixdim=(float(spacing),) * 3, diagonal=True, mode="bilinear", padding_mode="zeros"),
        EnsureTyped(keys="image", dtype="float32"),
    ]
    return Compose(xs)


def localiser_training_transforms(augment: bool = True, seed: int = 0, patch_size: int = PATCH_SIZE,
                                  num_points: int = 64, spacing: float = LOCALISER_SPACING_MM) -> Compose:
    """The localiser's training (``augment``) or validation pipeline: one datalist item (only its image is read)
    -> :func:`localiser_volume_transforms` -> :class:`~ambisam.data.LocaliserPairsd` -> the keys the trainer
    reads.

    Args:
        augment: random crops and augmentations (training); ``False``: crops seeded per case, not augmented.
        seed: the run's seed (the per-case crops of validation).
        patch_size: the crops' side in voxels.
        num_points: points per crop for the point-embedding loss.
        spacing: the grid's voxel size in mm.

    Returns:
        A ``Compose`` giving ``image (3, P, P, P)``, ``offset_mm (2, 3)``, ``points (2, N, 3)`` and ``id``.
    """
    return Compose([  # one flat list, so that a CacheDataset caches the volume (up to the first random transform)
        *localiser_volume_transforms(load=True, spacing=spacing).transforms,
        LocaliserPairsd("image", patch_size=patch_size, num_points=num_points, augment=augment, seed=seed),
        SelectItemsd(keys=["image", "offset_mm", "points", "id"]),
    ])
