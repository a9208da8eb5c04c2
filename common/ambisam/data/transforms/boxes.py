"""Box prompts: from masks, from a chosen rater, from box files, and through a resize."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple

from ambisam.data.transforms._utils import (
    _as_tensor,
    _check_jitter,
    _filename,
    _fmt_shape,
    _jitter_box,
    _read_json_file,
)
from ambisam.errors import InputError

__all__ = [
    "NO_BOX",
    "box_from_mask",
    "boxes_from_mask",
    "slice_boxes_from_box3d",
    "RATER_CHOICES",
    "PROMPT_PROTOCOLS",
    "check_prompt",
    "BoxFromRaterd",
    "BoxesFromLabeld",
    "PromptBoxesd",
    "LoadBoxd",
    "ResizeBoxd",
]


#: The row of a per-slice box tensor for a slice without a prompt.
NO_BOX = (-1.0, -1.0, -1.0, -1.0)


def box_from_mask(mask: Any) -> torch.Tensor | None:
    """The tight 2D box of a mask's nonzero pixels.

    Args:
        mask: ``(H, W)`` array or tensor; nonzero pixels are foreground.

    Returns:
        ``float32 (4,)`` ``[x_min, y_min, x_max, y_max] = [j_min, i_min, j_max, i_max]``, inclusive pixel indices,
        or ``None`` when the mask is empty.

    Raises:
        ValueError: when ``mask`` is not 2D.
    """
    m = _as_tensor(mask)
    if m.ndim != 2:
        raise ValueError(f"box_from_mask expects an (H, W) mask, got shape {tuple(m.shape)}.")
    m = m != 0
    rows = torch.nonzero(m.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(m.any(dim=0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1], rows[-1]], dtype=torch.float32)


def boxes_from_mask(mask: Any) -> torch.Tensor:
    """Per-slice 2D boxes of a volume mask.

    Args:
        mask: ``(H, W, D)`` array or tensor; nonzero voxels are foreground.

    Returns:
        ``float32 (D, 4)``: row ``k`` is :func:`box_from_mask` of slice ``k``, or ``[-1, -1, -1, -1]`` where slice
        ``k`` is empty.

    Raises:
        ValueError: when ``mask`` is not 3D.
    """
    m = _as_tensor(mask)
    if m.ndim != 3:
        raise ValueError(f"boxes_from_mask expects an (H, W, D) mask, got shape {tuple(m.shape)}.")
    m = m != 0
    depth = m.shape[-1]
    out = torch.tensor(NO_BOX, dtype=torch.float32).repeat(depth, 1)
    rows_any = m.any(dim=1)  # (H, D): does row i of slice k hold anything
    cols_any = m.any(dim=0)  # (W, D)
    marked = rows_any.any(dim=0)  # (D,)
    h_idx = torch.arange(m.shape[0]).unsqueeze(1)
    w_idx = torch.arange(m.shape[1]).unsqueeze(1)
    big = max(m.shape[0], m.shape[1]) + 1
    i_min = torch.where(rows_any, h_idx, big).amin(dim=0)
    i_max = torch.where(rows_any, h_idx, -1).amax(dim=0)
    j_min = torch.where(cols_any, w_idx, big).amin(dim=0)
    j_max = torch.where(cols_any, w_idx, -1).amax(dim=0)
    boxes = torch.stack([j_min, i_min, j_max, i_max], dim=1).to(torch.float32)
    out[marked] = boxes[marked]
    return out


def slice_boxes_from_box3d(box: Sequence[int], depth: int) -> torch.Tensor:
    """Per-slice 2D boxes of a (validated) 3D box.

    Args:
        box: ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices, inside the volume.
        depth: number of slices ``D`` of the volume.

    Returns:
        ``float32 (D, 4)``: ``[j_min, i_min, j_max, i_max]`` on slices ``k_min..k_max``, ``-1`` rows elsewhere.
    """
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    out = torch.tensor(NO_BOX, dtype=torch.float32).repeat(depth, 1)
    out[k0 : k1 + 1] = torch.tensor([j0, i0, j1, i1], dtype=torch.float32)
    return out


#: the ``rater`` choices of :class:`BoxFromRaterd` besides a fixed index
RATER_CHOICES = ("random", "random_nonempty", "union")

#: The named box-prompt protocols, for training (:class:`BoxFromRaterd`'s ``prompt``) and for validation and
#: evaluation (:class:`BoxesFromLabeld`'s ``prompt``). The bundles' base configs name one as ``prompt`` (evaluation)
#: and ``train_prompt`` (training; the same by default, so that a method is scored on the prompts it learned from).
PROMPT_PROTOCOLS = {
    "union": "the box of the raters' union on the slice (in training: whichever rater is the target)",
    "random_rater": "the box of one random rater whose mask is not empty on the slice, seeded (in training: the "
                    "target rater's own box, as the pSAM and SeqSAM reference code train; SeqSAM's evaluates so)",
}


def check_prompt(prompt: str) -> str:
    """``prompt`` if it names a protocol of :data:`PROMPT_PROTOCOLS`.

    Raises:
        ValueError: an unknown protocol, naming the known ones.
    """
    if prompt not in PROMPT_PROTOCOLS:
        raise ValueError(f"prompt must be one of {', '.join(map(repr, PROMPT_PROTOCOLS))}, got {prompt!r}.")
    return prompt


class BoxFromRaterd(RandomizableTransform, MapTransform):
    """Pick one rater of a 2D slice and make the SAM box prompt and the training target from that rater's mask.

    Args:
        label_key: key of the rater masks ``(K, H, W)`` (or ``(S * K, H, W)`` structure-major from
            :class:`~ambisam.data.StructureMasksd`).
        rater: ``"random"`` (uniform over the raters who read the case: every channel, or those with
            ``rater_valid`` 1), ``"random_nonempty"`` (uniform over those of them whose mask is not empty, as
            P2SAM's first stage; ``"random"`` when every mask is empty), a fixed channel index, or ``"union"`` (all
            raters together; ``rater_index`` is then ``-1``).
        jitter: box augmentation: each of the 4 coordinates moves by an independent uniform random whole number of
            pixels in ``[-jitter, jitter]``; the box is then clipped to the image and kept with ``min <= max``.
        prompt: where the box comes from (:data:`PROMPT_PROTOCOLS`): ``"random_rater"``: the chosen rater's own
            mask (the box then tells which rater to draw); ``"union"``: the raters' union, whichever rater is the
            target (one prompt, several answers: the ambiguity the latent must carry).
        empty: what box an empty rater mask gets (with ``prompt="random_rater"``; an empty union always gets
            ``default_box``): ``"other"``: the box of the union of the other raters (and ``default_box`` when they
            are all empty too); ``"default"``: ``default_box``.
        default_box: ``[x_min, y_min, x_max, y_max]``; ``None`` means the whole image ``[0, 0, W - 1, H - 1]``.
        box_key: output key of the box.
        rater_index_key: output key of the chosen rater index (int, ``-1`` for the union).
        rater_mask_key: output key of the chosen rater's mask ``(1, H, W)``, same type and metadata as the label.
        valid_key: key of the per-rater flags ``rater_valid (K,)`` (1 = read the case, from
            :class:`~ambisam.data.LoadRatersd`); where the dict has none every channel counts as read. With
            ``S * K`` channels channel ``c`` is rater ``c % K``.
        rater_id_key: output key of the chosen rater's index in the datalist's rater table (int, ``-1`` for the
            union): ``rater_index % K``, equal to ``rater_index`` for a ``(K, H, W)`` label.

    Returns:
        (from ``__call__``) the dict plus ``rater_index`` (int, the channel), ``rater_id`` (int), ``box``
        (``float32 (4,)`` ``[x_min, y_min, x_max, y_max]``) and ``rater_mask (1, H, W)``. An empty rater mask with
        ``empty="other"`` gets the box of the same structure's other raters.

    Raises:
        ValueError: (from ``__init__``) bad ``rater``/``jitter``/``empty``; (from ``__call__``) a label that is not
            ``(K, H, W)``.
        InputError: (from ``__call__``) a fixed rater index the label does not have or whose rater did not read the
            case, naming the label file.
    """

    def __init__(
        self,
        label_key: str = "label",
        rater: str | int = "random",
        jitter: int = 0,
        prompt: str = "random_rater",
        empty: str = "other",
        default_box: Sequence[float] | None = None,
        box_key: str = "box",
        rater_index_key: str = "rater_index",
        rater_mask_key: str = "rater_mask",
        valid_key: str = "rater_valid",
        rater_id_key: str = "rater_id",
    ) -> None:
        MapTransform.__init__(self, label_key)
        RandomizableTransform.__init__(self, prob=1.0)
        if isinstance(rater, str):
            if rater not in RATER_CHOICES:
                raise ValueError(f"rater must be one of {', '.join(map(repr, RATER_CHOICES))} or a rater index, got "
                                 f"{rater!r}.")
        elif isinstance(rater, bool) or int(rater) != rater or rater < 0:
            raise ValueError(f"a fixed rater must be an index >= 0, got {rater!r}.")
        if empty not in ("other", "default"):
            raise ValueError(f"empty must be 'other' or 'default', got {empty!r}.")
        if default_box is not None and len(default_box) != 4:
            raise ValueError(f"default_box must be [x_min, y_min, x_max, y_max], got {default_box!r}.")
        self.label_key = label_key
        self.rater = rater if isinstance(rater, str) else int(rater)
        self.jitter = _check_jitter(jitter)
        self.prompt = check_prompt(prompt)
        self.empty = empty
        self.default_box = None if default_box is None else [float(v) for v in default_box]
        self.box_key = box_key
        self.rater_index_key = rater_index_key
        self.rater_mask_key = rater_mask_key
        self.valid_key = valid_key
        self.rater_id_key = rater_id_key
        self._rater_index = 0

    def randomize(self, num_raters: int, valid: torch.Tensor | None = None, nonempty: torch.Tensor | None = None) -> None:
        """Draw the rater index (``-1`` for the union), among the channels with ``valid`` 1 where given (and, for
        ``"random_nonempty"``, among those with ``nonempty`` where any is)."""
        if self.rater == "union":
            self._rater_index = -1
        elif self.rater in ("random", "random_nonempty"):
            if self.rater == "random_nonempty" and nonempty is not None:
                marked = nonempty if valid is None else nonempty & valid
                if bool(marked.any()):
                    valid = marked
            read = None if valid is None else torch.nonzero(valid).flatten()
            if read is None or len(read) == num_raters:
                self._rater_index = int(self.R.randint(num_raters))
            else:
                self._rater_index = int(read[self.R.randint(len(read))]) if len(read) else -1
        else:
            self._rater_index = int(self.rater)

    def _channel_validity(
        self, d: Mapping[Hashable, Any], channels: int, label: Any
    ) -> tuple[torch.Tensor | None, int]:
        """Per-channel ``rater_valid`` (tiled over the structures) and the number of raters K."""
        if self.valid_key not in d:
            return None, channels
        valid = torch.as_tensor(d[self.valid_key]).flatten() != 0
        raters = int(valid.numel())
        if raters == 0 or channels % raters:
            raise ValueError(
                f"BoxFromRaterd: '{self.label_key}' has {channels} channels, not a multiple of the {raters} raters of "
                f"'{self.valid_key}'."
            )
        if not bool(valid.any()):
            raise InputError(_filename(label), "no rater read this case (every 'rater_valid' entry is 0).")
        return valid.repeat(channels // raters), raters

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        lab = _as_tensor(label)
        if lab.ndim != 3:
            raise ValueError(f"BoxFromRaterd expects '{self.label_key}' as (K, H, W), got {tuple(lab.shape)}.")
        num_raters, height, width = lab.shape
        valid, raters = self._channel_validity(d, num_raters, label)
        fg = lab != 0
        self.randomize(num_raters, valid, fg.flatten(1).any(dim=1))
        r = self._rater_index
        if r >= num_raters:
            raise InputError(_filename(label), f"label has {num_raters} rater mask(s); rater index {r} requested.")
        if r >= 0 and valid is not None and not bool(valid[r]):
            raise InputError(
                _filename(label), f"rater {r % raters} (label channel {r}) did not read this case; use rater='random'."
            )
        block = (r // raters) * raters  # the first channel of the chosen rater's structure (r >= 0)
        if r < 0:
            mask = fg.any(dim=0)
        elif self.prompt == "union":
            mask = fg[block : block + raters].any(dim=0)  # the same structure's raters
        else:
            mask = fg[r]
        box = box_from_mask(mask)
        if box is None and self.empty == "other" and r >= 0 and self.prompt == "random_rater":
            others = torch.cat([fg[block:r], fg[r + 1 : block + raters]], dim=0)
            box = box_from_mask(others.any(dim=0)) if others.shape[0] else None
        if box is None:
            box = torch.tensor(
                self.default_box if self.default_box is not None else [0, 0, width - 1, height - 1],
                dtype=torch.float32,
            )
        d[self.box_key] = _jitter_box(box, self.jitter, height, width, self.R)
        d[self.rater_index_key] = r
        d[self.rater_id_key] = r % raters if r >= 0 else -1
        target = lab[r : r + 1].clone() if r >= 0 else fg.any(dim=0, keepdim=True).to(lab.dtype)
        if isinstance(label, MetaTensor):
            target = MetaTensor(
                target, meta=deepcopy(label.meta), applied_operations=deepcopy(label.applied_operations)
            )
        elif isinstance(label, np.ndarray):
            target = target.numpy()
        d[self.rater_mask_key] = target
        return d


class BoxesFromLabeld(RandomizableTransform, MapTransform):
    """Per-slice box prompts ``(D, 4)`` of a volume from its rater masks (e.g. to simulate a user's boxes).

    Args:
        label_key: key of the rater masks ``(K, H, W, D)`` (or any ``(C, H, W, D)`` mask).
        box_key: output key.
        prompt: the protocol (:data:`PROMPT_PROTOCOLS`): ``"union"``: all channels united; ``"random_rater"``: per
            slice, the box of one channel drawn uniformly among those not empty on that slice (seeded through
            MONAI's random state, as every random transform).
        jitter: each coordinate of each marked slice's box moves by an independent uniform random whole number of
            pixels in ``[-jitter, jitter]``, then is clipped to the image (``min <= max`` kept).
        allow_missing_keys: do not fail when the label is absent.

    Returns:
        (from ``__call__``) the dict plus ``box``: ``float32 (D, 4)``, row ``k`` = ``[x_min, y_min, x_max, y_max]``
        of slice ``k``, ``[-1, -1, -1, -1]`` where no rater marks anything.

    Raises:
        ValueError: when the label is not ``(C, H, W, D)`` or ``jitter`` is not a whole number >= 0.
    """

    def __init__(
        self,
        label_key: str = "label",
        box_key: str = "box",
        jitter: int = 0,
        allow_missing_keys: bool = False,
        prompt: str = "union",
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key = label_key
        self.box_key = box_key
        self.jitter = _check_jitter(jitter)
        self.prompt = check_prompt(prompt)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = _as_tensor(d[key])
            if lab.ndim != 4:
                raise ValueError(f"BoxesFromLabeld expects '{key}' as (C, H, W, D), got {tuple(lab.shape)}.")
            fg = lab != 0
            boxes = boxes_from_mask(fg.any(dim=0))
            if self.prompt == "random_rater":
                marked = fg.flatten(1, 2).any(dim=1)  # (C, D): channel c not empty on slice k
                for k in torch.nonzero(boxes[:, 0] >= 0).flatten().tolist():
                    channels = torch.nonzero(marked[:, k]).flatten()
                    boxes[k] = box_from_mask(fg[int(channels[self.R.randint(len(channels))]), :, :, k])
            if self.jitter:
                height, width = lab.shape[1], lab.shape[2]
                for k in torch.nonzero(boxes[:, 0] >= 0).flatten().tolist():
                    boxes[k] = _jitter_box(boxes[k], self.jitter, height, width, self.R)
            d[self.box_key] = boxes
        return d


class PromptBoxesd(BoxesFromLabeld):
    """The box prompts of one case at inference: the given ``box`` if the item has one (from :class:`LoadBoxd`),
    else the raters' union's per-slice boxes (with jitter, to simulate a user), else an error.

    Args:
        label_key, box_key, jitter: as :class:`BoxesFromLabeld`.
        image_key: the image, named in the error.

    Raises:
        InputError: the item has neither a box nor a label (naming the image file).
    """

    def __init__(self, label_key: str = "label", box_key: str = "box", jitter: int = 0, image_key: str = "image"):
        super().__init__(label_key, box_key, jitter, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.box_key in data:
            return dict(data)
        if self.label_key not in data:
            raise InputError(
                _filename(data.get(self.image_key)),
                "no box prompt: give a box file (--box PATH) or rater masks to derive boxes from (--label PATH)",
            )
        return super().__call__(data)


class LoadBoxd(MapTransform):
    """Turn a 3D box (a JSON box file, or the list itself from the datalist) into per-slice boxes ``(D, 4)``.

    The 3D box is ``[i_min, j_min, k_min, i_max, j_max, k_max]``, inclusive voxel indices of the STORED image, so
    this must run right after loading (before ``Orientationd``/``Spacingd``). To follow later resampling, give
    ``mask_key``: the box is then also written as a ``(1, H, W, D)`` 0/1 mask with the image's metadata; resample it
    with the image (nearest) and rebuild the per-slice boxes from it with ``BoxesFromLabeld(label_key=mask_key)``
    (``ambisam.data.pipelines.volume_transforms`` does this).

    Args:
        box_key: key of the box: a path (``str``/``PathLike``) to a JSON file ``{"box": [...]}``, or the 6 numbers
            (list/tuple/array), or a dict ``{"box": [...]}``. Replaced by the per-slice boxes.
        image_key: key of the loaded image ``(1, H, W, D)`` whose shape the box must fit.
        mask_key: optional output key for the box as a mask (see above).
        allow_missing_keys: do not fail when the box key is absent (e.g. cases without a box).

    Returns:
        (from ``__call__``) the dict with ``box`` = ``float32 (D, 4)`` (``[j_min, i_min, j_max, i_max]`` on slices
        ``k_min..k_max``, ``-1`` rows elsewhere) and, with ``mask_key``, the box mask.

    Raises:
        InputError: naming the box file (or the image file when the box came from the datalist) when the file is
            missing or not JSON ``{"box": [...]}``, the box does not have 6 whole numbers, has a min > max, or lies
            (partly) outside the image.
    """

    def __init__(
        self,
        box_key: str = "box",
        image_key: str = "image",
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(box_key, allow_missing_keys)
        self.box_key = box_key
        self.image_key = image_key
        self.mask_key = mask_key

    @staticmethod
    def read_box(value: Any, image_file: Any = None) -> tuple[list[float], Any]:
        """The raw 3D box from a path, a dict or a list, and the file to name in errors."""
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            content = _read_json_file(path, "box file")
            if not isinstance(content, dict) or "box" not in content:
                raise InputError(path, 'box file must hold a JSON object {"box": [i_min, j_min, k_min, i_max, '
                                       "j_max, k_max]}.")
            return content["box"], path
        if isinstance(value, Mapping):
            if "box" not in value:
                raise InputError(image_file, 'box given as a mapping must have a "box" entry.')
            return value["box"], image_file
        return value, image_file

    @staticmethod
    def check_box(raw: Any, shape: Sequence[int], source: Any) -> list[int]:
        """Validate a raw 3D box against the image's spatial shape ``(H, W, D)``; return it as 6 ints."""
        fmt = "[i_min, j_min, k_min, i_max, j_max, k_max]"
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(source, f"box must be 6 numbers {fmt}, got {raw!r}.") from None
        if arr.ndim != 1 or arr.shape[0] != 6:
            raise InputError(source, f"box must be 6 numbers {fmt}, got {arr.size} value(s) of shape {arr.shape}.")
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(source, f"box coordinates must be whole voxel indices {fmt}, got {arr.tolist()}.")
        box = [int(v) for v in arr]
        names = "ijk"
        for a in range(3):
            if box[a] > box[a + 3]:
                raise InputError(source, f"box {box} has {names[a]}_min {box[a]} > {names[a]}_max {box[a + 3]}.")
        if box[0] == box[3] or box[1] == box[4]:
            raise InputError(
                source,
                f"box {box} has zero area in the slice plane (i_min == i_max or j_min == j_max); a box prompt must "
                "span at least two voxels along i and j.",
            )
        for a in range(3):
            if box[a] < 0 or box[a + 3] >= shape[a]:
                raise InputError(
                    source,
                    f"box {box} lies outside the image of shape {_fmt_shape(shape)} along axis {names[a]} "
                    f"(valid indices 0..{shape[a] - 1}).",
                )
        return box

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            img = _as_tensor(image)
            image_file = _filename(image)
            if img.ndim != 4:
                raise ValueError(f"LoadBoxd expects '{self.image_key}' as (1, H, W, D), got {tuple(img.shape)}.")
            shape = tuple(img.shape[1:])
            raw, source = self.read_box(d[key], image_file)
            box = self.check_box(raw, shape, source)
            d[key] = slice_boxes_from_box3d(box, shape[2])
            if self.mask_key is not None:
                mask = torch.zeros((1, *shape), dtype=torch.float32)
                mask[0, box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = 1
                if isinstance(image, MetaTensor):
                    mask = MetaTensor(
                        mask, meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations)
                    )
                d[self.mask_key] = mask
        return d


class ResizeBoxd(MapTransform):
    """Scale 2D boxes so that they follow a ``Resized`` of their image to ``spatial_size`` in-plane.

    Place it BEFORE the ``Resized`` of the image (it reads the image's current size). The scaling is the one SAM,
    MedSAM and ``SamBackbone.boxes_to_input`` use: ``x * W'/W``, ``y * H'/H``. ``[-1, -1, -1, -1]`` rows (no
    prompt) stay as they are. Apply it again with the original size to map boxes back.

    MONAI's ``monai.apps.detection`` box transforms (``ZoomBoxd`` etc.) do not fit: their boxes are ``(N, 2*dims)``
    with x along the FIRST spatial axis (ours: along the columns), they have no "no prompt" rows, and they resize the
    image themselves with ``Zoom`` rather than following a ``Resized``.

    Args:
        keys: box key(s): ``(4,)`` or ``(..., 4)`` boxes ``[x_min, y_min, x_max, y_max]`` in the reference image's
            pixels.
        ref_key: key of the image the boxes refer to: ``(C, H, W)`` or ``(C, H, W, D)``; ``H, W`` are read.
        spatial_size: the in-plane target size ``(H', W')`` (an int for both); a ``-1`` keeps that axis, and any
            further entries (e.g. the ``D`` of a 3D ``Resized`` size) are ignored.
        allow_missing_keys: do not fail when a box key is absent.

    Returns:
        (from ``__call__``) the dict with ``float32`` boxes of the same shape.
    """

    def __init__(
        self,
        keys: KeysCollection = "box",
        ref_key: str = "image",
        spatial_size: Sequence[int] | int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        size = list(ensure_tuple(spatial_size))
        if len(size) == 1:
            size = size * 2
        self.spatial_size = [int(s) for s in size[:2]]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = _as_tensor(d[self.ref_key])
        height, width = int(ref.shape[1]), int(ref.shape[2])
        new_h = height if self.spatial_size[0] < 0 else self.spatial_size[0]
        new_w = width if self.spatial_size[1] < 0 else self.spatial_size[1]
        scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        for key in self.key_iterator(d):
            box = _as_tensor(d[key]).to(torch.float32)
            if box.shape[-1] != 4:
                raise ValueError(f"ResizeBoxd expects '{key}' boxes of shape (..., 4), got {tuple(box.shape)}.")
            no_box = (box < 0).all(dim=-1, keepdim=True)
            d[key] = torch.where(no_box, box, box * scale)
        return d
