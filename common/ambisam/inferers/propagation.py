"""Box prompts that follow a structure from slice to slice: propagation outwards from one slice.

A 3D box prompt (a box file's ``[i_min, j_min, k_min, i_max, j_max, k_max]``, :class:`~ambisam.data.LoadBoxd`) gives
every slice of its range the same 2D box, which is far larger than the structure near its ends (on a real CT a
kidney's tight 3D box gave Dice 0.98 on its central slice and 0.06 on its last). With box propagation (the sampling
inferer's ``box_propagation``) each structure's per-slice boxes are read as one 3D box: their slice range
``first .. last`` and the bounding 2D box of their rows, the **extent**. Then

1. the **start** slice (the middle of the range, ``(first + last) // 2``, where the box is most likely tight; or a
   given slice index) is sampled with its own box (the extent where it has none);
2. each neighbour's box is the tight box of the previous slice's **ensemble mask** (the mean of the N samples'
   probabilities above the threshold) inside the extent, grown by ``margin`` pixels on every side and clipped to
   the extent, so it never leaves the 3D box;
3. this goes outwards in both directions, one slice a **wave**, and stops on a side at the 3D box's end or where the
   ensemble mask inside the extent vanishes: that slice keeps what the method gave it (its mask is empty), and
   every slice beyond it on that side gets no prompt (background), as do the slices outside the range.

Per-slice boxes derived from a label (the raters' union) are allowed too: their slice range and bounding box are
the 3D box, and the start slice keeps the label's own box.

:class:`BoxPropagation` holds the waves of a batch (every case and structure at once), so that the inferer can
encode each slice once for all the structures that reach it (:meth:`BoxPropagation.needs` says when no structure
will reach a slice any more); :func:`propagated_boxes` is the step from one slice's masks to the next boxes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ambisam.data.transforms.boxes import NO_BOX, boxes_from_mask

__all__ = [
    "PROPAGATION_STARTS",
    "PropagationUnit",
    "BoxPropagation",
    "check_propagation_margin",
    "check_propagation_start",
    "propagated_boxes",
]

#: the named start slices of a propagation (an ``int`` slice index is the other choice)
PROPAGATION_STARTS = ("centre",)


def check_propagation_start(start: str | int) -> str | int:
    """``start`` as a propagation start: a name of :data:`PROPAGATION_STARTS` or a slice index ``>= 0``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(start, str) and start in PROPAGATION_STARTS:
        return start
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(
            f"propagation_start must be one of {', '.join(map(repr, PROPAGATION_STARTS))} or a slice index >= 0, "
            f"got {start!r}"
        )
    return int(start)


def check_propagation_margin(margin: int) -> int:
    """``margin`` as a propagation margin: a whole number of pixels ``>= 0``.

    Raises:
        ValueError: a negative margin.
    """
    if int(margin) < 0:
        raise ValueError(f"propagation_margin must be at least 0 pixels, got {margin}")
    return int(margin)


def propagated_boxes(masks: torch.Tensor, extents: torch.Tensor, margin: int) -> torch.Tensor:
    """The next slice's boxes from this slice's masks: each mask's tight box inside its extent, grown by ``margin``
    and clipped to the extent.

    Args:
        masks: ``(R, H, W)`` boolean ensemble masks of ``R`` slices.
        extents: ``(R, 4)`` each slice's 3D-box extent ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices, x
            along the columns).
        margin: pixels added on every side of the tight box.

    Returns:
        ``(R, 4)`` float32 boxes, inside their extents; a row of :data:`~ambisam.data.NO_BOX` (``-1``) where the
        mask has no pixel inside its extent (the propagation stops there).
    """
    r, h, w = masks.shape
    extents = extents.to(torch.float32)
    rows = torch.arange(h, device=masks.device, dtype=torch.float32)
    cols = torch.arange(w, device=masks.device, dtype=torch.float32)
    in_rows = (rows[None] >= extents[:, 1:2].floor()) & (rows[None] <= extents[:, 3:4].ceil())  # (R, H)
    in_cols = (cols[None] >= extents[:, 0:1].floor()) & (cols[None] <= extents[:, 2:3].ceil())  # (R, W)
    inside = masks.bool() & in_rows[:, :, None] & in_cols[:, None, :]
    tight = boxes_from_mask(inside.permute(1, 2, 0)).to(extents.device)  # (R, 4), -1 rows where empty
    grow = extents.new_tensor([-margin, -margin, margin, margin], dtype=torch.float32)
    grown = tight + grow
    boxes = torch.cat([torch.maximum(grown[:, :2], extents[:, :2]), torch.minimum(grown[:, 2:], extents[:, 2:])], 1)
    vanished = (tight < 0).all(dim=1, keepdim=True)
    return torch.where(vanished, extents.new_tensor(NO_BOX), boxes)


class PropagationUnit(NamedTuple):
    """One slice of one structure to sample in a wave.

    Attributes:
        case: the batch index.
        slice: the slice index ``k``.
        structure: the structure index.
        box: ``(4,)`` its box prompt ``[x_min, y_min, x_max, y_max]``.
        direction: ``0`` for the start slice, ``-1`` / ``+1`` for a slice reached going down / up.
    """

    case: int
    slice: int
    structure: int
    box: torch.Tensor
    direction: int


class BoxPropagation:
    """The outward waves of box prompts over every case and structure of a batch (see the module docstring).

    ``wave()`` gives the units to sample now; ``advance(units, masks)`` takes their ensemble masks and makes the next
    wave; ``needs(case, k)`` says whether a structure may still sample slice ``k`` of a case. Override
    :meth:`start_slice` or :meth:`next_boxes` to change where a propagation starts or how a box follows a mask.

    Args:
        boxes: ``(B, S, D, 4)`` per-slice boxes (``-1`` rows: no prompt); a structure without any box is not sampled.
        margin: pixels added around each propagated tight box.
        start: ``"centre"`` (the middle slice of each structure's range) or a slice index, the same for every
            structure, which must lie in each structure's range.

    Raises:
        ValueError: a negative ``margin``, a bad ``start``, or a start index outside a structure's slice range.
    """

    def __init__(self, boxes: torch.Tensor, margin: int = 3, start: str | int = "centre") -> None:
        self.margin = check_propagation_margin(margin)
        self.start = check_propagation_start(start)
        self.ranges: dict[tuple[int, int], tuple[int, int]] = {}  # (case, structure) -> (first, last)
        self.extents: dict[tuple[int, int], torch.Tensor] = {}  # (case, structure) -> (4,)
        self._pending: list[PropagationUnit] = []
        b, s = boxes.shape[:2]
        for i in range(b):
            for t in range(s):
                rows = boxes[i, t]
                prompted = (rows >= 0).all(dim=-1)
                if not bool(prompted.any()):
                    continue
                ks = torch.nonzero(prompted).flatten()
                first, last = int(ks[0]), int(ks[-1])
                given = rows[prompted]
                extent = torch.cat([given[:, :2].amin(dim=0), given[:, 2:].amax(dim=0)])
                k = self.start_slice(first, last)
                self.ranges[(i, t)], self.extents[(i, t)] = (first, last), extent
                self._pending.append(PropagationUnit(i, k, t, rows[k] if prompted[k] else extent, 0))

    def start_slice(self, first: int, last: int) -> int:
        """The slice a structure's propagation starts on, given its slice range ``first .. last``.

        Raises:
            ValueError: a start index outside the range.
        """
        if self.start == "centre":
            return (first + last) // 2
        if not first <= self.start <= last:
            raise ValueError(
                f"propagation_start {self.start} lies outside a structure's box slices {first}..{last}: a start "
                "index must be a slice of every structure's 3D box"
            )
        return self.start

    @property
    def max_units(self) -> int:
        """The most units the waves can hold in all (every slice of every range): a progress bar's total."""
        return sum(last - first + 1 for first, last in self.ranges.values())

    def wave(self) -> list[PropagationUnit]:
        """The units of the current wave, by case, slice and structure (empty: the propagation is over)."""
        return sorted(self._pending, key=lambda u: (u.case, u.slice, u.structure))

    def next_boxes(self, units: list[PropagationUnit], masks: torch.Tensor) -> torch.Tensor:
        """``(R, 4)`` the boxes the units' neighbours get from the units' ``(R, H, W)`` ensemble masks
        (:func:`propagated_boxes`; ``-1`` rows stop the propagation)."""
        extents = torch.stack([self.extents[(u.case, u.structure)] for u in units]).to(masks.device)
        return propagated_boxes(masks, extents, self.margin)

    def advance(self, units: list[PropagationUnit], masks: torch.Tensor) -> None:
        """Make the next wave from this one's results.

        Args:
            units: the current wave (:meth:`wave`), in its order.
            masks: ``(R, H, W)`` the units' boolean ensemble masks, in the same order.
        """
        pending = []
        for unit, box in zip(units, self.next_boxes(units, masks) if units else []):
            if bool((box < 0).all()):
                continue  # the structure vanished: nothing beyond this slice on this side
            first, last = self.ranges[(unit.case, unit.structure)]
            for direction in (-1, 1) if unit.direction == 0 else (unit.direction,):
                k = unit.slice + direction
                if first <= k <= last:
                    pending.append(PropagationUnit(unit.case, k, unit.structure, box, direction))
        self._pending = pending

    def needs(self, case: int, k: int) -> bool:
        """Whether a pending unit of ``case`` may still reach slice ``k`` (so that its embedding must be kept)."""
        for unit in self._pending:
            if unit.case != case:
                continue
            first, last = self.ranges[(unit.case, unit.structure)]
            low = first if unit.direction <= 0 else unit.slice
            high = last if unit.direction >= 0 else unit.slice
            if low <= k <= high:
                return True
        return False
