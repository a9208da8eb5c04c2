"""Mapping intensities to ``[0, 1]`` per modality, with MONAI's own intensity transforms."""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["intensity_transform"]


def intensity_transform(
    keys: KeysCollection = "image",
    modality: str = "ct",
    window: Sequence[float] = (-1000, 400),
    percentiles: Sequence[float] = (0.5, 99.5),
) -> MapTransform:
    """The MONAI transform that maps intensities to ``[0, 1]`` for a modality.

    Args:
        keys: the image key(s).
        modality: ``"ct"``: the Hounsfield window ``window`` scaled to ``[0, 1]`` with clipping
            (``ScaleIntensityRanged``); ``"mri"``: the ``percentiles`` of each image scaled to ``[0, 1]`` with
            clipping (``ScaleIntensityRangePercentilesd``); ``"none"``: min-max to ``[0, 1]`` (``ScaleIntensityd``).
            Case-insensitive. "mri" and "none" work per channel (multi-sequence images); "ct" uses one window.
        window: ``(low, high)`` CT window in HU; default the lung window ``(-1000, 400)``.
        percentiles: ``(lower, upper)`` percentiles for MRI.

    Returns:
        A MONAI dictionary transform.

    Raises:
        ValueError: for an unknown modality or a window/percentile pair with ``low >= high``.
    """
    mod = str(modality).lower()
    if mod == "ct":
        lo, hi = (float(v) for v in window)
        if not lo < hi:
            raise ValueError(f"CT window must be (low, high) with low < high, got {tuple(window)}.")
        return ScaleIntensityRanged(keys=keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if mod == "mri":
        lo, hi = (float(v) for v in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"MRI percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(percentiles)}.")
        return ScaleIntensityRangePercentilesd(
            keys=keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    if mod == "none":
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0, channel_wise=True)
    raise ValueError(f"modality must be 'ct', 'mri' or 'none', got {modality!r}.")
