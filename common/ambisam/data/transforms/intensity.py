"""Mapping intensities to ``[0, 1]`` per modality, with MONAI's own intensity transforms."""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["intensity_transform"]


def _fixed_range(keys: KeysCollection, pair: Sequence[float], what: str) -> MapTransform:
    """``(low, high)`` scaled to ``[0, 1]`` with clipping."""
    if pair is None:
        raise ValueError(f"{what} must be (low, high), got None.")
    lo, hi = (float(v) for v in pair)
    if not lo < hi:
        raise ValueError(f"{what} must be (low, high) with low < high, got {tuple(pair)}.")
    return ScaleIntensityRanged(keys=keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)


def intensity_transform(
    keys: KeysCollection = "image",
    modality: str = "ct",
    window: Sequence[float] = (-1000, 400),
    percentiles: Sequence[float] = (0.5, 99.5),
    value_range: Sequence[float] | None = None,
) -> MapTransform:
    """The MONAI transform that maps intensities to ``[0, 1]`` for a modality.

    Args:
        keys: the image key(s).
        modality: ``"ct"``: the Hounsfield window ``window`` scaled to ``[0, 1]`` with clipping
            (``ScaleIntensityRanged``); ``"mri"``: the ``percentiles`` of each image scaled to ``[0, 1]`` with
            clipping (``ScaleIntensityRangePercentilesd``); ``"none"``: the fixed ``value_range`` scaled to ``[0, 1]``
            with clipping (``ScaleIntensityRanged``), or without one each image's min-max to ``[0, 1]``
            (``ScaleIntensityd``).
            Case-insensitive. "mri" and "none" without a range work per channel (multi-sequence images); "ct" and
            "none" with a range use one range for all channels.
        window: ``(low, high)`` CT window in HU; default the lung window ``(-1000, 400)``.
        percentiles: ``(lower, upper)`` percentiles for MRI.
        value_range: ``(low, high)`` for ``"none"``: the range the data set's values are stated to lie in (e.g.
            ``(0, 255)`` for 8-bit pictures; the datalist's ``intensity.range``). Ignored for "ct" and "mri".

    Returns:
        A MONAI dictionary transform.

    Raises:
        ValueError: for an unknown modality or a window/percentile/value range pair with ``low >= high``.
    """
    mod = str(modality).lower()
    if mod == "ct":
        return _fixed_range(keys, window, "CT window")
    if mod == "mri":
        lo, hi = (float(v) for v in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"MRI percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(percentiles)}.")
        return ScaleIntensityRangePercentilesd(
            keys=keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    if mod == "none" and value_range is not None:
        return _fixed_range(keys, value_range, "value range")
    if mod == "none":
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0, channel_wise=True)
    raise ValueError(f"modality must be 'ct', 'mri' or 'none', got {modality!r}.")
