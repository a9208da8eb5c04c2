"""The one sampling inferer every method uses.

For a volume, its structures (organs; one for most methods) and their per-slice box prompts,
:class:`SlicewiseSamplingInferer` encodes each slice that any structure prompts **once** (through the embedding
cache when one is given), asks the method for N samples per structure from that one embedding, and stacks
everything back into the volume. Slices a structure does not prompt are background for it, not a model call.

The method's conditions come from the batch (``rater_id``) and from the inferer (``mode``). For stochastic
methods, **sample i of a volume is one 3D hypothesis**: the method's standard normal draws are seeded once per
volume, structure and call (:attr:`~ambisam.networks.Conditions.noise_seeds`), so every slice of the volume
decodes sample i from the same draw (a latent method's per-slice prior then shapes it); ``per_slice_draws=True``
draws independently per slice instead. The seeds come from each case's own ``case_seed`` where the batch holds one
(:class:`~ambisam.data.CaseSeedd`: a hash of the run's seed and the case id, so a case's samples do not depend on
the order, the batch or the rank it is sampled in), else from torch's global generator; a run with the same seed
gives the same samples either way.

With ``roi_size`` the method sees a **region of interest** instead of the whole slice: a ``roi_size x roi_size``
window centred on each structure's box (the middle of its bounding box, as the training crops of
:class:`~ambisam.data.LesionCropd`; zero-padded past the border) is encoded and sampled, and the result is put back
in place (background outside the window). The box then only places the window, for a prompt-free method (P2SAM),
and is moved into the window for one that takes it as a prompt. The boxes may come from a box file, from the
raters' union (evaluation) or from any localiser that writes them.

The output layout is :mod:`ambisam.inferers.layout`'s: ``(B, S * (3 + N), H, W, D)``, or
``(B, S * (3 + 2N), H, W, D)`` with ``keep_probabilities`` (each sample's probability map too, for the metrics that
need it; the evaluation turns it on, inference does not).

With ``region_output=True`` (the inference bundles' setting) it returns only the slab of slices it sampled, with its
place in the volume (:mod:`ambisam.inferers.region`): memory then grows with the prompted region, not with the
volume (a ``512 x 512 x 300`` CT with N = 16 is 5.6 GiB dense in float32; a box over 4 slices is 80 MiB of slab).
Every reader of the output (the split, the writers, the MONAI Label app) takes either form.

With ``box_propagation=True`` each structure's per-slice boxes are read as one 3D box (their slice range and the
bounding box of their rows) and the boxes follow the structure (:mod:`ambisam.inferers.propagation`): the start
slice (the range's middle by default, ``propagation_start``) is sampled first, then each neighbour with the tight
box of the previous slice's ensemble mask plus ``propagation_margin`` pixels, clipped to the 3D box, outwards in
waves until the mask vanishes or the box ends (the slices beyond get no prompt: background). Each slice is still
encoded once for all structures (an embedding is held until no structure can reach its slice any more), the
seeds, ``roi_size`` (the window follows each new box), ``keep_probabilities``, ``region_output`` (the slab of the
slices actually sampled) and the progress bar work as without it. Off by default: the output is then exactly what
it was before the option existed.
"""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from monai.utils import optional_import

from ambisam.inferers.layout import SAMPLING_CHANNELS, binary_entropy, sampling_maps, split_sampling_output
from ambisam.inferers.propagation import (
    BoxPropagation,
    PropagationUnit,
    check_propagation_margin,
    check_propagation_start,
)
from ambisam.inferers.region import sampling_region
from ambisam.networks.base import Conditions
from ambisam.sam.cache import EmbeddingCache

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["SlicewiseSamplingInferer", "binary_entropy", "split_sampling_output", "SAMPLING_CHANNELS"]


class SlicewiseSamplingInferer(Inferer):
    """Sample N masks per prompted slice and structure of a volume (or a 2D image) from one embedding per slice.

    The network follows the method contract (:class:`~ambisam.networks.MaskSamplingNetwork`, or wraps one as
    ``.module``, as DDP does).

    Args:
        num_samples: ``N``, the samples drawn per slice and structure.
        threshold: probability above which a sample's pixel is foreground.
        slice_batch_size: slices encoded and sampled per call.
        cache: an :class:`~ambisam.sam.EmbeddingCache` for the (frozen) encoder, or ``None`` to encode directly.
        progress: show a progress bar over slices.
        mode: the method's inference mode (``Conditions.mode``), or ``None`` for its default.
        per_slice_draws: draw a stochastic method's samples independently per slice (not one 3D hypothesis per
            sample).
        keep_probabilities: also return each sample's sigmoid probability map (``N`` more channels per structure,
            see :mod:`ambisam.inferers.layout`), as NCC needs; only the output of the batch being scored is held.
        roi_size: sample a ``roi_size x roi_size`` window centred on each structure's box instead of the whole
            slice (see the module docstring); ``None``: the whole slice.
        rater_id: the rater id every call conditions on when the call gives none (a rater-conditioned method's
            "what would rater r draw"); ``None``: the method's own default.
        region_output: return the slab of sampled slices as a region (:mod:`ambisam.inferers.region`) instead of
            the dense volume; the values are the same, and exactly 0 outside the slab either way.
        box_propagation: read each structure's boxes as a 3D box and derive each slice's box from its neighbour's
            ensemble mask, outwards from the start slice (see the module docstring); ``False``: every prompted slice
            is sampled with its own box.
        propagation_margin: pixels added on every side of a propagated tight box (default 3: the smallest margin
            that lost no case against the same box on every slice in ``bench propagation`` on the synthetic
            default, where 0 and 2 let a slightly small mask shrink the next box; within the training
            ``box_jitter`` of 5, so the boxes stay as loose as those the methods were trained with).
        propagation_start: ``"centre"`` (the middle slice of each structure's box) or the slice index to start on
            (where the given box is tight; it must lie in every structure's slice range).

    Raises:
        ValueError: ``num_samples`` or ``roi_size`` below 1, a negative ``propagation_margin`` or a bad
            ``propagation_start``.
    """

    def __init__(
        self,
        num_samples: int = 16,
        threshold: float = 0.5,
        slice_batch_size: int = 4,
        cache: EmbeddingCache | None = None,
        progress: bool = False,
        mode: str | None = None,
        per_slice_draws: bool = False,
        keep_probabilities: bool = False,
        roi_size: int | None = None,
        rater_id: int | None = None,
        region_output: bool = False,
        box_propagation: bool = False,
        propagation_margin: int = 3,
        propagation_start: str | int = "centre",
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if roi_size is not None and int(roi_size) < 1:
            raise ValueError(f"roi_size must be at least 1, got {roi_size}")
        self.roi_size = None if roi_size is None else int(roi_size)
        self.num_samples = int(num_samples)
        self.threshold = float(threshold)
        self.slice_batch_size = int(slice_batch_size)
        self.cache = cache
        self.progress = progress
        self.mode = mode
        self.per_slice_draws = bool(per_slice_draws)
        self.keep_probabilities = bool(keep_probabilities)
        self.rater_id = None if rater_id is None else int(rater_id)
        self.region_output = bool(region_output)
        self.box_propagation = bool(box_propagation)
        self.propagation_margin = check_propagation_margin(propagation_margin)
        self.propagation_start = check_propagation_start(propagation_start)

    def _boxes(self, box, net, b: int, d: int, device) -> torch.Tensor | None:
        """``(B, S, D, 4)`` per-slice boxes of every structure, or ``None`` for a prompt-free call."""
        if box is None:
            if net.capabilities.needs_prompt:
                raise ValueError(f"{type(net).__name__} needs a box prompt per slice, got none")
            if self.roi_size is not None:
                raise ValueError(
                    f"a region of interest (roi_size {self.roi_size}) is placed by a box per slice, got none: give a "
                    "box file, a label to derive it from, or a localiser's boxes"
                )
            return None
        boxes = torch.as_tensor(box, device=device).float()
        if boxes.ndim <= 3:  # (B, D, 4), (B, 4) or (B, 1, 4): one structure
            boxes = boxes.reshape(b, 1, -1, 4)
        if boxes.ndim != 4 or boxes.shape[0] != b or boxes.shape[2] != d or boxes.shape[3] != 4:
            raise ValueError(f"expected {d} per-slice boxes per case and structure, got box of shape {tuple(box.shape)}")
        return boxes

    @staticmethod
    def _volume_seeds(case_seed: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
        """``(B, S)`` seeds, one per volume and structure: from each case's own seed, else from torch's generator."""
        if case_seed is None:
            return torch.randint(0, 2**62, (b, s))
        per_case = torch.as_tensor(case_seed).reshape(-1).long().tolist()
        if len(per_case) != b:
            raise ValueError(f"expected one case_seed per case ({b}), got {len(per_case)}")
        return torch.stack([torch.randint(0, 2**62, (s,), generator=torch.Generator().manual_seed(c)) for c in per_case])

    def _units(self, boxes: torch.Tensor | None, b: int, s: int, d: int) -> list[tuple]:
        """The sampling units ``(case, slice, structures, window)``: every prompted slice with the structures it
        prompts (``window`` ``None``), or with ``roi_size`` one unit per prompted (slice, structure) with its window
        ``(y0, x0)``."""
        if boxes is None:
            return [(i, k, range(s), None) for i in range(b) for k in range(d)]
        prompted = (boxes >= 0).all(dim=-1)  # (B, S, D)
        if self.roi_size is None:
            return [(i, k, [t for t in range(s) if prompted[i, t, k]], None)
                    for i in range(b) for k in range(d) if bool(prompted[i, :, k].any())]
        return [(i, k, [t], self._window(boxes[i, t, k]))
                for i in range(b) for k in range(d) for t in range(s) if prompted[i, t, k]]

    def _window(self, box: torch.Tensor) -> tuple[int, int]:
        """``(y0, x0)`` of the ``roi_size`` window centred on a ``[x_min, y_min, x_max, y_max]`` box."""
        x_min, y_min, x_max, y_max = (int(v) for v in box.tolist())
        half = (self.roi_size - 1) // 2
        return (y_min + y_max) // 2 - half, (x_min + x_max) // 2 - half

    def _unit_image(self, image: torch.Tensor, window: tuple[int, int] | None) -> torch.Tensor:
        """The slice ``(C, H, W)``, or its window ``(C, roi, roi)`` (zero past the border)."""
        if window is None:
            return image
        r = self.roi_size
        y0, x0 = window
        padded = torch.nn.functional.pad(image, (r, r, r, r))
        return padded[:, y0 + r : y0 + 2 * r, x0 + r : x0 + 2 * r]

    @staticmethod
    def _unit_box(box: torch.Tensor, window: tuple[int, int] | None) -> torch.Tensor:
        """The box in the unit's pixels (moved into its window)."""
        if window is None:
            return box
        y0, x0 = window
        return box - box.new_tensor([x0, y0, x0, y0])

    def _paste(self, probs: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """``(N, roi, roi)`` window probabilities put in place on an ``(N, H, W)`` background of zeros."""
        h, w = size
        y0, x0 = window
        r = self.roi_size
        canvas = probs.new_zeros((probs.shape[0], h + 2 * r, w + 2 * r))
        canvas[:, y0 + r : y0 + 2 * r, x0 + r : x0 + 2 * r] = probs
        return canvas[:, r : r + h, r : r + w]

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        box: torch.Tensor | None = None,
        rater_id: torch.Tensor | int | None = None,
        case_seed: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Sample a batch of volumes.

        Args:
            inputs: ``(B, 1, H, W, D)`` volumes (or ``(B, 1, H, W)`` images) with intensities in ``[0, 1]``.
            network: the method network.
            box: per-slice boxes ``(B, D, 4)`` for one structure or ``(B, S, D, 4)`` for ``S`` (``(B, 4)`` or
                ``(B, 1, 4)`` for an image) in pixels, ``[x_min, y_min, x_max, y_max]`` with x along the second
                spatial axis; a row of ``-1`` marks a slice without a prompt. ``None`` for prompt-free methods:
                every slice is sampled.
            rater_id: ``(B,)`` rater ids (or one int for the batch) for rater-conditioned methods; default: the
                inferer's ``rater_id``.
            case_seed: ``(B,)`` per-case seeds (:class:`~ambisam.data.CaseSeedd`): each case's draws are seeded
                from its own seed, so its samples do not depend on the cases before it (order, batch, rank);
                ``None``: from torch's global generator. Ignored with ``per_slice_draws``.
            kwargs: ignored (engines may pass extra batch keys).

        Returns:
            ``(B, S * (3 + N), H, W, D)`` (``(B, S * (3 + N), H, W)`` for images); ``3 + 2N`` channels per structure
            with ``keep_probabilities``; see the module docstring. With ``region_output``: the region
            ``{"values": (B, S * (3 + N), H, W, k1 - k0), "start": (B, 3), "shape": (B, 3)}`` of the slices
            ``k0 .. k1 - 1`` from the batch's first sampled slice to its last (``start`` ``(0, 0, k0)``, ``shape``
            ``(H, W, D)``; no slice sampled: an empty slab at 0), for an image the whole image
            (``{"values": (B, C, H, W), "start": (B, 2), "shape": (B, 2)}``).

        Raises:
            ValueError: when a box prompt is needed but missing, or its shape does not match the input.
        """
        net = getattr(network, "module", network)
        is_2d = inputs.ndim == 4
        volumes = inputs[..., None] if is_2d else inputs
        if volumes.ndim != 5:
            raise ValueError(f"expected (B, 1, H, W[, D]) inputs, got {tuple(inputs.shape)}")
        b, _, h, w, d = volumes.shape
        boxes = self._boxes(box, net, b, d, volumes.device)
        s = 1 if boxes is None else boxes.shape[1]
        n = self.num_samples
        block = 3 + n * (2 if self.keep_probabilities else 1)
        rater_ids = None
        rater_id = self.rater_id if rater_id is None else rater_id
        if rater_id is not None:
            rater_ids = torch.as_tensor(rater_id, device=volumes.device).long().reshape(-1).expand(b)
        seeds = None if self.per_slice_draws else self._volume_seeds(case_seed, b, s)

        if self.box_propagation:
            if boxes is None:
                raise ValueError("box propagation follows a box prompt from slice to slice, got none: give a box file, "
                                 "a label to derive the boxes from, or a localiser's boxes")
            out, k0 = self._sample_propagated(volumes, net, boxes, rater_ids, seeds, block, is_2d)
        else:
            out, k0 = self._sample_prompted(volumes, net, boxes, rater_ids, seeds, block, is_2d)
        if is_2d:
            out = out[..., 0]
        if not self.region_output:
            return out
        start = [0, 0] if is_2d else [0, 0, k0]
        shape = [h, w] if is_2d else [h, w, d]
        return sampling_region(out, [start] * b, [shape] * b)

    def _sample_probabilities(
        self,
        net,
        embeddings: torch.Tensor,
        images: torch.Tensor,
        prompts: torch.Tensor | None,
        owners: list[int],
        structure: int,
        rater_ids: torch.Tensor | None,
        seeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The method's N samples of ``R`` units of one structure, as probabilities.

        Args:
            net: the method network (unwrapped).
            embeddings: ``(R, C, h, w)`` the units' embeddings.
            images: ``(R, C, H', W')`` the units' images (slices or windows).
            prompts: ``(R, 4)`` the units' boxes in their own pixels, or ``None`` (prompt-free call).
            owners: the case of each unit.
            structure: the structure sampled.
            rater_ids: ``(B,)`` rater ids, or ``None``.
            seeds: ``(B, S)`` noise seeds per volume and structure, or ``None`` (per-slice draws).

        Returns:
            ``(R, N, H', W')`` sigmoid probabilities.
        """
        backbone = net.backbone
        size = tuple(images.shape[-2:])
        conditions = Conditions(
            boxes=None if prompts is None else backbone.boxes_to_input(prompts, size),
            images=images,
            rater_ids=None if rater_ids is None else rater_ids[owners],
            mode=self.mode,
            noise_seeds=None if seeds is None else seeds[owners, structure],
        )
        logits = net.sample_logits(embeddings, conditions, self.num_samples)  # (R, N, s, s)
        return torch.sigmoid(backbone.postprocess(logits.float(), size))  # (R, N, *size)

    def _encode(self, net, images: torch.Tensor) -> torch.Tensor:
        """``(R, C, h, w)`` embeddings of ``(R, C, H', W')`` images, through the cache when there is one."""
        return self.cache(images) if self.cache is not None else net.backbone.encode(images)

    def _sample_prompted(
        self, volumes, net, boxes, rater_ids, seeds, block: int, is_2d: bool
    ) -> tuple[torch.Tensor, int]:
        """Sample every prompted slice with its own box (``boxes`` ``None``: every slice).

        Returns:
            ``(B, S * block, H, W, k1 - k0)`` and ``k0``: the whole depth, or with ``region_output`` the slices from
            the first sampled to the last.
        """
        b, _, h, w, d = volumes.shape
        s = 1 if boxes is None else boxes.shape[1]
        units = self._units(boxes, b, s, d)
        k0, k1 = 0, d  # the slices held: all, or from the first sampled slice to the last (region_output)
        if self.region_output and not is_2d:
            ks = [unit[1] for unit in units]
            k0, k1 = (min(ks), max(ks) + 1) if ks else (0, 0)
        out = volumes.new_zeros((b, s * block, h, w, k1 - k0), dtype=torch.float32)
        batches = [units[j : j + self.slice_batch_size] for j in range(0, len(units), self.slice_batch_size)]
        if self.progress and _has_tqdm:
            batches = tqdm(batches, desc="sampling slices", unit="batch")
        for chunk in batches:
            images = torch.stack([self._unit_image(volumes[i, :, :, :, k], window) for i, k, _, window in chunk])
            embeddings = self._encode(net, images)
            for t in range(s):  # every structure from the same embeddings (one per window with roi_size)
                rows = [j for j, unit in enumerate(chunk) if t in unit[2]]
                if not rows:
                    continue
                index = torch.as_tensor(rows, device=embeddings.device)
                prompts = None
                if boxes is not None:
                    prompts = torch.stack([self._unit_box(boxes[chunk[j][0], t, chunk[j][1]], chunk[j][3]) for j in rows])
                probs = self._sample_probabilities(net, embeddings.index_select(0, index), images[rows], prompts,
                                                   [chunk[j][0] for j in rows], t, rater_ids, seeds)
                if self.roi_size is not None:
                    probs = torch.stack([self._paste(p, chunk[j][3], (h, w)) for p, j in zip(probs, rows)])
                maps = sampling_maps(probs, self.threshold, self.keep_probabilities)
                for j, row in enumerate(rows):
                    i, k = chunk[row][:2]
                    out[i, t * block : (t + 1) * block, :, :, k - k0] = maps[j]
        return out, k0

    def _propagation(self, boxes: torch.Tensor) -> BoxPropagation:
        """The waves of a batch's propagated boxes (override to propagate otherwise)."""
        return BoxPropagation(boxes, self.propagation_margin, self.propagation_start)

    def _sample_propagated(
        self, volumes, net, boxes, rater_ids, seeds, block: int, is_2d: bool
    ) -> tuple[torch.Tensor, int]:
        """Sample each structure outwards from its start slice, each slice with the box its neighbour's mask gives
        (:mod:`ambisam.inferers.propagation`).

        Without ``roi_size`` a slice is encoded the first time a structure reaches it and its embedding is held
        until no structure can reach it any more, so every slice is encoded once for all structures; with
        ``roi_size`` each (slice, structure) window, centred on its propagated box, is encoded (as without
        propagation, one window per structure).

        Returns:
            ``(B, S * block, H, W, k1 - k0)`` and ``k0``: the whole depth, or with ``region_output`` the slices from
            the first sampled to the last.
        """
        b, _, h, w, d = volumes.shape
        propagation = self._propagation(boxes)
        k0, k1 = 0, d
        if self.region_output and not is_2d:  # the 3D boxes' slices bound what can be sampled
            ranges = list(propagation.ranges.values())
            k0, k1 = (min(r[0] for r in ranges), max(r[1] for r in ranges) + 1) if ranges else (0, 0)
        out = volumes.new_zeros((b, boxes.shape[1] * block, h, w, k1 - k0), dtype=torch.float32)
        held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (case, slice) -> (embedding, image)
        sampled: set[int] = set()
        bar = None
        if self.progress and _has_tqdm:
            bar = tqdm(total=propagation.max_units, desc="propagating boxes", unit="slice")
        while units := propagation.wave():
            if self.roi_size is None:
                self._hold_embeddings(volumes, net, units, held)
            masks: list[torch.Tensor | None] = [None] * len(units)
            for t in sorted({u.structure for u in units}):
                rows = [j for j, u in enumerate(units) if u.structure == t]
                for part in (rows[j : j + self.slice_batch_size] for j in range(0, len(rows), self.slice_batch_size)):
                    probs = self._sample_units(volumes, net, [units[j] for j in part], held, rater_ids, seeds)
                    maps = sampling_maps(probs, self.threshold, self.keep_probabilities)
                    ensemble = probs.mean(dim=1) > self.threshold  # (R, H, W)
                    for j, row in enumerate(part):
                        unit = units[row]
                        out[unit.case, t * block : (t + 1) * block, :, :, unit.slice - k0] = maps[j]
                        masks[row] = ensemble[j]
                        sampled.add(unit.slice)
            propagation.advance(units, torch.stack(masks))
            for key in [key for key in held if not propagation.needs(*key)]:
                del held[key]
            if bar is not None:
                bar.update(len(units))
        if bar is not None:
            bar.close()
        if self.region_output and not is_2d:  # the slab of the slices sampled, as without propagation
            first, last = (min(sampled), max(sampled) + 1) if sampled else (k0, k0)
            out, k0 = out[..., first - k0 : last - k0], first if sampled else 0
        return out, k0

    def _hold_embeddings(self, volumes, net, units: list[PropagationUnit], held: dict) -> None:
        """Encode the wave's slices not held yet (``slice_batch_size`` a call) and hold them with their images."""
        missing = sorted({(u.case, u.slice) for u in units} - held.keys())
        for j in range(0, len(missing), self.slice_batch_size):
            keys = missing[j : j + self.slice_batch_size]
            images = torch.stack([volumes[i, :, :, :, k] for i, k in keys])
            for key, embedding, image in zip(keys, self._encode(net, images), images):
                held[key] = (embedding, image)

    def _sample_units(self, volumes, net, units: list[PropagationUnit], held: dict, rater_ids, seeds) -> torch.Tensor:
        """``(R, N, H, W)`` the probabilities of units of one structure: from the held slice embeddings, or with
        ``roi_size`` from their windows, encoded here and put back in place."""
        h, w = volumes.shape[2:4]
        windows = [None if self.roi_size is None else self._window(u.box) for u in units]
        if self.roi_size is None:
            embeddings = torch.stack([held[(u.case, u.slice)][0] for u in units])
            images = torch.stack([held[(u.case, u.slice)][1] for u in units])
        else:
            slices = [volumes[u.case, :, :, :, u.slice] for u in units]
            images = torch.stack([self._unit_image(image, win) for image, win in zip(slices, windows)])
            embeddings = self._encode(net, images)
        prompts = torch.stack([self._unit_box(u.box, win) for u, win in zip(units, windows)])
        owners, structure = [u.case for u in units], units[0].structure
        probs = self._sample_probabilities(net, embeddings, images, prompts, owners, structure, rater_ids, seeds)
        if self.roi_size is not None:
            probs = torch.stack([self._paste(p, win, (h, w)) for p, win in zip(probs, windows)])
        return probs
