"""Mapping intensities to ``[0, 1]`` per modality, with MONAI's own intensity transforms, and the localiser's
piecewise-linear CT map (MONAI 1.6 has no piecewise-linear intensity transform)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["intensity_transform", "LOCALISER_HU_KNOTS", "LOCALISER_KNOT_VALUES", "piecewise_linear_intensity",
           "PiecewiseLinearIntensityd"]

#: the Hounsfield units of the localiser's piecewise-linear map (MedLAM's) ...
LOCALISER_HU_KNOTS = (-1000.0, -200.0, 200.0, 1500.0)
#: ... and the values they map to
LOCALISER_KNOT_VALUES = (0.0, 0.2, 0.8, 1.0)


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


def piecewise_linear_intensity(image: torch.Tensor, knots: Sequence[float] = LOCALISER_HU_KNOTS,
                               values: Sequence[float] = LOCALISER_KNOT_VALUES) -> torch.Tensor:
    """Map intensities piecewise-linearly through ``(knots[n], values[n])``, constant beyond the end knots
    (``numpy.interp``'s rule): the localiser's ``[-1000, -200, 200, 1500]`` HU to ``[0, 0.2, 0.8, 1]`` by default,
    so that air is 0, soft tissue spreads over ``[0.2, 0.8]`` and bone saturates at 1.

    Args:
        image: any shape, any floating or integer dtype (HU).
        knots: increasing intensities.
        values: the value at each knot.

    Returns:
        ``float32`` tensor of ``image``'s shape (a MetaTensor stays one, with its metadata).

    Raises:
        ValueError: fewer than two knots, ``values`` of another length, or knots not strictly increasing.
    """
    knots, values = [float(v) for v in knots], [float(v) for v in values]
    if len(knots) < 2 or len(knots) != len(values) or any(b <= a for a, b in zip(knots, knots[1:])):
        raise ValueError(f"knots must be >= 2 strictly increasing values with one value each, got {knots}, {values}")
    x = torch.as_tensor(image).to(torch.float32)
    out = torch.full_like(x, values[0])
    for (x0, x1), (y0, y1) in zip(zip(knots, knots[1:]), zip(values, values[1:])):
        segment = (x >= x0) & (x < x1)
        out = torch.where(segment, y0 + (x - x0) * ((y1 - y0) / (x1 - x0)), out)
    return torch.where(x >= knots[-1], torch.full_like(x, values[-1]), out)


class PiecewiseLinearIntensityd(MapTransform):
    """:func:`piecewise_linear_intensity` on ``keys``.

    Args:
        keys: the image key(s).
        knots, values: as :func:`piecewise_linear_intensity`.
        allow_missing_keys: as MONAI's ``MapTransform``.
    """

    def __init__(self, keys: KeysCollection = "image", knots: Sequence[float] = LOCALISER_HU_KNOTS,
                 values: Sequence[float] = LOCALISER_KNOT_VALUES, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        piecewise_linear_intensity(torch.zeros(1), knots, values)  # check the knots once, here
        self.knots, self.values = tuple(knots), tuple(values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = piecewise_linear_intensity(d[key], self.knots, self.values)
        return d
