"""Box propagation in the sampling inferer: the boxes follow a tapered object from the start slice outwards, stop
where its mask vanishes, never leave the 3D box, every slice is encoded once for all structures, the seeds are
those of the plain inferer, and off (the default) is the plain inferer. A stand-in method on the U-Net grid backbone
(the image is its own embedding: no encoder to pay for) segments exactly the bright pixels inside its box, so the
propagated boxes are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ambisam.inferers import (
    BoxPropagation,
    SlicewiseSamplingInferer,
    is_region,
    propagated_boxes,
    split_sampling_output,
)
from ambisam.networks import ImageGridBackbone, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.prob_unet import box_masks
from ambisam.sam import EmbeddingCache

GRID = 32
BRIGHT = 0.9


def _slice_of(image: torch.Tensor) -> int:
    """The slice an image or embedding ``(C, H, W)`` comes from: its corner pixel holds ``k / 100``."""
    return round(float(image[0, 0, 0]) * 100)


class BrightInBox(MaskSamplingNetwork):
    """Marks exactly the bright pixels inside its box, and records the box and the slice of every unit it sees.

    With ``noise`` the samples are noisy (each sample's logits shifted by its seeded standard normal draws), as a
    stochastic method's."""

    capabilities = MethodCapabilities(training_target=None, stochastic=False)

    def __init__(self, grid: int = GRID, noise: bool = False):
        super().__init__(ImageGridBackbone(grid))
        self.grid, self.noise = grid, noise
        self.units: list[tuple[int, tuple[float, ...]]] = []  # (slice, box) per unit, in call order
        self.seeds: list[tuple[int, int]] = []  # (slice, noise seed) per unit

    def draw_samples(self, embeddings, conditions, num_samples):
        for emb, box in zip(embeddings, conditions.boxes):
            self.units.append((_slice_of(emb), tuple(box.tolist())))
        if conditions.noise_seeds is not None:
            self.seeds += [(_slice_of(e), int(s)) for e, s in zip(embeddings, conditions.noise_seeds)]
        inside = box_masks(conditions.boxes, self.grid)[:, 0] > 0
        fg = (embeddings[:, 0] > 0.5) & inside  # (R, S, S)
        logits = torch.where(fg, 10.0, -10.0)[:, None].expand(-1, num_samples, -1, -1)
        if self.noise:
            logits = logits + 4 * conditions.standard_normal(embeddings.shape[0], num_samples, self.grid, self.grid)
        return logits

    def boxes_on(self, k: int) -> list[tuple[float, ...]]:
        return [box for j, box in self.units if j == k]


def _ellipsoid(depth: int, centre, radii) -> np.ndarray:
    """``(GRID, GRID, depth)`` boolean ellipsoid (rows, columns, slices)."""
    yy, xx, kk = np.meshgrid(np.arange(GRID), np.arange(GRID), np.arange(depth), indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip((yy, xx, kk), centre, radii)) <= 1


def _volume(*objects: np.ndarray) -> torch.Tensor:
    """``(1, 1, GRID, GRID, D)``: slice ``k``'s background is ``k / 100`` (distinct slices, see :func:`_slice_of`),
    the objects bright."""
    depth = objects[0].shape[-1]
    vol = np.broadcast_to(np.arange(depth) / 100, (GRID, GRID, depth)).astype(np.float32).copy()
    for obj in objects:
        vol[obj] = BRIGHT
    return torch.from_numpy(vol)[None, None]


def _tight(mask2d: np.ndarray) -> tuple[float, ...]:
    ys, xs = np.nonzero(mask2d)
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


def _box3d(obj: np.ndarray, k_range=None) -> torch.Tensor:
    """``(D, 4)`` the same 2D box (the object's tight in-plane box) on every slice of ``k_range`` (default: the
    object's slices), as a box file gives."""
    ks = np.nonzero(obj.any(axis=(0, 1)))[0]
    first, last = k_range or (int(ks[0]), int(ks[-1]))
    boxes = -torch.ones(obj.shape[-1], 4)
    boxes[first : last + 1] = torch.tensor(_tight(obj.any(axis=2)))
    return boxes


def _grown(box, margin, extent):
    x0, y0, x1, y1 = box
    return (max(x0 - margin, extent[0]), max(y0 - margin, extent[1]), min(x1 + margin, extent[2]),
            min(y1 + margin, extent[3]))


def test_the_boxes_shrink_with_a_tapered_object_each_the_previous_slices_tight_box_plus_the_margin():
    obj = _ellipsoid(9, (16, 15, 4), (11, 13, 4.6))  # slices 0-8, widest on slice 4
    boxes = _box3d(obj)
    extent = tuple(boxes[0].tolist())
    net = BrightInBox()
    out = SlicewiseSamplingInferer(num_samples=3, box_propagation=True, propagation_margin=1)(_volume(obj), net,
                                                                                              box=boxes)
    assert [k for k, _ in net.units] == [4, 3, 5, 2, 6, 1, 7, 0, 8]  # outwards from the centre, one wave a step
    assert net.boxes_on(4) == [extent]  # the start slice keeps the given box
    for k in range(9):
        if k != 4:
            previous = k + 1 if k < 4 else k - 1
            assert net.boxes_on(k) == [_grown(_tight(obj[..., previous]), 1, extent)], k
    widths = [net.boxes_on(k)[0][2] - net.boxes_on(k)[0][0] for k in range(9)]
    assert widths[0] < widths[1] < widths[4] and widths[8] < widths[7] < widths[4]  # the boxes shrink outwards
    pred = split_sampling_output(out[0], num_samples=3)["pred"][0]
    assert torch.equal(pred.bool(), torch.from_numpy(obj))  # each box holds its slice's object


def test_propagation_stops_where_the_mask_vanishes_and_the_slices_beyond_are_background():
    obj = _ellipsoid(12, (16, 16, 4), (8, 8, 2.5))  # slices 2-6
    distractor = np.zeros_like(obj)
    distractor[10:20, 10:20, 9:] = True  # something bright inside the 3D box, past the object's end
    vol = _volume(obj, distractor)
    boxes = _box3d(obj, k_range=(0, 10))  # a 3D box longer than the object: centre slice 5
    net = BrightInBox()
    out = SlicewiseSamplingInferer(num_samples=2, box_propagation=True)(vol, net, box=boxes)
    assert sorted(k for k, _ in net.units) == [1, 2, 3, 4, 5, 6, 7]  # 1 and 7 sampled, found empty: the end
    assert torch.count_nonzero(out[..., [0, 8, 9, 10, 11]]) == 0  # no prompt beyond: background, all channels
    pred = split_sampling_output(out[0], num_samples=2)["pred"][0]
    assert torch.equal(pred.bool(), torch.from_numpy(obj))
    # without propagation every slice of the 3D box is prompted, and the distractor is segmented
    plain = BrightInBox()
    out = SlicewiseSamplingInferer(num_samples=2)(vol, plain, box=boxes)
    assert sorted(k for k, _ in plain.units) == list(range(11))
    assert split_sampling_output(out[0], num_samples=2)["pred"][0][..., 9:11].sum() > 0


def test_the_propagated_boxes_never_leave_the_3d_box():
    obj = _ellipsoid(10, (16, 16, 4.5), (12, 12, 6))  # wider than the box and past its slices 2-7
    boxes = -torch.ones(10, 4)
    boxes[2:8] = torch.tensor([10.0, 8.0, 20.0, 26.0])
    net = BrightInBox()
    SlicewiseSamplingInferer(num_samples=2, box_propagation=True, propagation_margin=5)(_volume(obj), net, box=boxes)
    assert sorted(k for k, _ in net.units) == list(range(2, 8))  # stops at the box's ends
    for _, (x0, y0, x1, y1) in net.units:
        assert 10 <= x0 <= x1 <= 20 and 8 <= y0 <= y1 <= 26
    assert (10.0, 8.0, 20.0, 26.0) in net.boxes_on(3)  # the object fills the box: clipped back to it


def test_each_slice_is_encoded_once_for_two_structures_with_their_own_ranges_and_starts():
    first = _ellipsoid(11, (9, 9, 4), (6, 6, 4.5))  # slices 0-8, start 4
    second = _ellipsoid(11, (22, 22, 7), (6, 7, 3.5))  # slices 4-10, start 7
    vol = _volume(first, second)
    boxes = torch.stack([_box3d(first), _box3d(second)])[None]  # (1, 2, D, 4)
    for batch_size in (1, 3):
        net = BrightInBox()
        encoded = []
        encode = net.backbone.encode
        net.backbone.encode = lambda images: encoded.extend(_slice_of(im) for im in images) or encode(images)
        inferer = SlicewiseSamplingInferer(num_samples=2, box_propagation=True, slice_batch_size=batch_size)
        out = inferer(vol, net, box=boxes)
        assert sorted(encoded) == list(range(11)), batch_size  # every slice once, for both structures
        assert len(net.units) == 9 + 7  # each structure sampled on each of its slices
        maps = split_sampling_output(out[0], num_samples=2)
        assert torch.equal(maps["pred"][0].bool(), torch.from_numpy(first))
        assert torch.equal(maps["pred"][1].bool(), torch.from_numpy(second))
    cache = EmbeddingCache(net.backbone)
    SlicewiseSamplingInferer(num_samples=2, box_propagation=True, cache=cache)(vol, BrightInBox(), box=boxes)
    assert (cache.misses, cache.hits) == (11, 0)


def test_off_by_default_and_the_seeds_are_the_plain_inferers_one_per_volume_and_structure():
    assert SlicewiseSamplingInferer().box_propagation is False
    obj = _ellipsoid(7, (16, 16, 3), (9, 9, 3.5))
    other = _ellipsoid(7, (8, 24, 3), (4, 4, 2))
    vol = _volume(obj, other)
    boxes = torch.stack([_box3d(obj), _box3d(other)])[None]
    seed = torch.tensor([1234])
    runs = []
    for propagation in (True, True, False):
        net = BrightInBox(noise=True)
        inferer = SlicewiseSamplingInferer(num_samples=6, box_propagation=propagation, keep_probabilities=True)
        runs.append((inferer(vol, net, box=boxes, case_seed=seed), net))
    assert torch.equal(runs[0][0], runs[1][0])  # the same seed, the same samples
    default = SlicewiseSamplingInferer(num_samples=6, keep_probabilities=True)(vol, BrightInBox(noise=True), box=boxes,
                                                                                 case_seed=seed)
    assert torch.equal(default, runs[2][0])
    slices_by_seed = []
    for _, net in runs:
        seen: dict[int, set[int]] = {}
        for k, s in net.seeds:
            seen.setdefault(s, set()).add(k)
        slices_by_seed.append(seen)
    other_slices = set(np.nonzero(other.any(axis=(0, 1)))[0].tolist())
    # one seed per structure on all of its slices (one 3D hypothesis per sample), the same seeds as without it
    assert sorted(slices_by_seed[0].values(), key=len) == [other_slices, set(range(7))]
    assert slices_by_seed[0] == slices_by_seed[1] == slices_by_seed[2]
    different = SlicewiseSamplingInferer(num_samples=6, box_propagation=True, keep_probabilities=True)(
        vol, BrightInBox(noise=True), box=boxes, case_seed=torch.tensor([99]))
    assert not torch.equal(runs[0][0], different)


def test_region_output_is_the_slab_of_the_slices_sampled():
    obj = _ellipsoid(12, (16, 16, 5), (8, 8, 2.5))  # slices 3-7
    boxes = _box3d(obj, k_range=(1, 10))  # start 5; 2 and 8 sampled and found empty
    vol = _volume(obj)
    dense = SlicewiseSamplingInferer(num_samples=2, box_propagation=True)(vol, BrightInBox(), box=boxes)
    region = SlicewiseSamplingInferer(num_samples=2, box_propagation=True, region_output=True)(vol, BrightInBox(),
                                                                                               box=boxes)
    assert is_region(region) and region["start"].tolist() == [[0, 0, 2]] and region["shape"].tolist() == [[32, 32, 12]]
    assert torch.equal(region["values"], dense[..., 2:9]) and torch.count_nonzero(dense[..., :2]) == 0


def test_with_a_region_of_interest_the_window_follows_each_new_box():
    obj = _ellipsoid(7, (12, 18, 3), (7, 8, 3.5))
    roi = 24
    net = BrightInBox(grid=roi)  # the window is the grid: no resizing
    out = SlicewiseSamplingInferer(num_samples=2, box_propagation=True, roi_size=roi)(_volume(obj), net,
                                                                                      box=_box3d(obj))
    assert sorted(k for k, _ in net.units) == list(range(7))
    half = (roi - 1) // 2
    for _, (x0, y0, x1, y1) in net.units:  # each box in its own window's pixels: the window is centred on it
        assert (int(x0) + int(x1)) // 2 == half and (int(y0) + int(y1)) // 2 == half
    assert torch.equal(split_sampling_output(out[0], num_samples=2)["pred"][0].bool(), torch.from_numpy(obj))


def test_a_box_on_one_slice_can_start_the_propagation_there():
    obj = _ellipsoid(9, (16, 16, 2), (9, 9, 4.5))  # widest on slice 2
    boxes = _box3d(obj, k_range=(0, 8))
    boxes[:] = boxes[2]
    net = BrightInBox()
    SlicewiseSamplingInferer(num_samples=2, box_propagation=True, propagation_start=2)(_volume(obj), net, box=boxes)
    assert [k for k, _ in net.units][:3] == [2, 1, 3]
    with pytest.raises(ValueError, match="outside a structure's box slices 0..8"):
        SlicewiseSamplingInferer(num_samples=2, box_propagation=True, propagation_start=9)(_volume(obj), net,
                                                                                           box=boxes)


def test_bad_settings_and_a_missing_box_are_refused():
    with pytest.raises(ValueError, match="propagation_margin"):
        SlicewiseSamplingInferer(box_propagation=True, propagation_margin=-1)
    for start in ("middle", -2, 1.5):
        with pytest.raises(ValueError, match="propagation_start"):
            SlicewiseSamplingInferer(box_propagation=True, propagation_start=start)

    class PromptFree(BrightInBox):
        capabilities = MethodCapabilities(training_target=None, stochastic=False, needs_prompt=False)

    with pytest.raises(ValueError, match="box propagation follows a box prompt"):
        SlicewiseSamplingInferer(num_samples=2, box_propagation=True)(torch.zeros(1, 1, GRID, GRID, 3), PromptFree())


def test_the_next_box_is_the_tight_box_inside_the_extent_grown_and_clipped():
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 5:8, 6:10] = True  # rows 5-7, columns 6-9
    masks[1, 0:20, 0:20] = True  # everything: clipped to the extent
    masks[2, 0:2, 0:2] = True  # only outside the extent: vanished
    extents = torch.tensor([[2.0, 2, 17, 17], [4.0, 3, 12, 15], [4.0, 4, 12, 12]])
    boxes = propagated_boxes(masks, extents, margin=3)
    assert boxes.tolist() == [[3.0, 2.0, 12.0, 10.0], [4.0, 3.0, 12.0, 15.0], [-1.0, -1.0, -1.0, -1.0]]
    waves = BoxPropagation(torch.tensor([[[[-1.0] * 4, [1.0, 1, 5, 5], [2.0, 0, 6, 4]]]]), margin=1)
    assert waves.ranges == {(0, 0): (1, 2)} and waves.extents[(0, 0)].tolist() == [1.0, 0.0, 6.0, 5.0]
    assert [(u.slice, u.box.tolist()) for u in waves.wave()] == [(1, [1.0, 1.0, 5.0, 5.0])]
    assert waves.needs(0, 2) and not waves.needs(0, 0)


def _two_organ_datalist(folder):
    """One test case of two structures in a class-mapped datalist (2 raters alike): a tapered "kidney" whose 3D box
    holds a bright pixel near its corner on its end slices (a vessel, say, in no label), and a "spleen"."""
    from ambisam.data import write_datalist, write_nifti

    kidney = _ellipsoid(8, (10, 10, 3.5), (7, 7, 3.9))  # slices 0-7, box rows/columns 4-16
    spleen = _ellipsoid(8, (24, 24, 4), (5, 5, 3))
    image = np.full(kidney.shape, -1000, np.int16)
    image[kidney | spleen] = 300
    image[4, 4, [0, 7]] = 300  # inside the kidney's 3D box, outside the kidney
    label = (kidney * 1 + spleen * 2).astype(np.uint8)
    item = {"image": write_nifti(folder / "ct.nii.gz", image, np.eye(4)),
            "label": [write_nifti(folder / f"ct_r{r}.nii.gz", label, np.eye(4)) for r in range(2)]}
    return write_datalist(folder, {"test": [item]}, labels={"kidney": 1, "spleen": 2},
                          intensity={"modality": "ct", "window": [-1000, 400]})


def test_the_bench_gives_a_dice_per_structure_for_both_modes_on_a_class_mapped_and_a_synthetic_data_set(tmp_path):
    import json

    from ambisam.bench_propagation import PROPAGATION_MODES, bench_propagation, format_propagation
    from ambisam.data import synthesize
    from ambisam.errors import InputError

    _two_organ_datalist(tmp_path / "organs")
    r = bench_propagation(tmp_path / "organs", num_samples=2, margin=0, network=BrightInBox(), out=tmp_path / "r.json")
    assert list(r["structures"]) == ["kidney", "spleen"] and [c["box"] for c in r["cases"]][0] == [4, 4, 0, 16, 16, 7]
    kidney, spleen = r["structures"]["kidney"], r["structures"]["spleen"]
    assert kidney["propagated"] == {"dice": 1.0, "end_dice": 1.0}  # the end slices' boxes leave the pixel out
    assert kidney["same_box"]["dice"] < 1.0 and kidney["same_box"]["end_dice"] < 1.0  # the 3D box holds it
    assert spleen["same_box"] == spleen["propagated"] == {"dice": 1.0, "end_dice": 1.0}
    assert r["mean"]["propagated"]["dice"] == 1.0 and r["slices_encoded"] == {"same_box": 8, "propagated": 8}
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["job"] == "bench propagation" and record["seed"] == 0 and "torch" in record["versions"]
    assert record["structures"] == r["structures"] and "| kidney | 1 | " in format_propagation(r)

    synthesize(tmp_path / "synthetic", cases=2, shape=(32, 32, 12), split=(0.0, 0.0, 1.0))
    r = bench_propagation(tmp_path / "synthetic", num_samples=2, network=BrightInBox())
    assert list(r["structures"]) == ["foreground"] and r["structures"]["foreground"]["cases"] == 2
    for mode in PROPAGATION_MODES:
        assert 0.5 < r["mean"][mode]["dice"] <= 1.0 and r["seconds"][mode] > 0
    with pytest.raises(InputError, match="training-free"):
        bench_propagation(tmp_path / "synthetic", method="psam")
