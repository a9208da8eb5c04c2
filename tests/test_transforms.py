"""Tests of ambisam.data.transforms and ambisam.data.pipelines on small hand-made volumes (in memory and NIfTI)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Resized, SaveImaged

from ambisam.data.pipelines import training_slice_transforms, volume_transforms
from ambisam.data.transforms import (
    BoxesFromLabeld,
    BoxFromRaterd,
    LesionCropd,
    LoadBoxd,
    ResizeBoxd,
    SelectSlicesd,
    SplitSamplingOutputd,
    ValidateMultiRaterd,
    box_from_mask,
    boxes_from_mask,
    intensity_transform,
)
from ambisam.errors import InputError

# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def input_error(excinfo):
    """The InputError behind an exception: MONAI's Compose wraps what a transform raises in RuntimeError."""
    e = excinfo.value
    while e is not None and not isinstance(e, InputError):
        e = e.__cause__
    assert e is not None, f"no InputError behind {excinfo.value!r}"
    return e


def save_nii(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def slice_dict(label):
    """A 2D slice dict: image (1, H, W) and label (K, H, W) as tensors."""
    label = torch.as_tensor(np.asarray(label), dtype=torch.float32)
    return {"image": torch.rand(1, *label.shape[1:]), "label": label}


def three_raters(h=20, w=30):
    """Three raters on a (20, 30) slice with different rectangles."""
    lab = np.zeros((3, h, w), np.float32)
    lab[0, 5:10, 8:15] = 1  # box [8, 5, 14, 9]
    lab[1, 4:12, 10:20] = 1  # box [10, 4, 19, 11]
    lab[2, 6:8, 6:9] = 1  # box [6, 6, 8, 7]
    return lab


BOXES = [[8, 5, 14, 9], [10, 4, 19, 11], [6, 6, 8, 7]]


# ---------------------------------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------------------------------


def test_box_xy_convention_single_pixel():
    m = np.zeros((10, 12))
    m[3, 5] = 1  # row i = 3, column j = 5
    box = box_from_mask(m)
    assert box.dtype == torch.float32
    assert box.tolist() == [5, 3, 5, 3]
    assert box_from_mask(np.zeros((4, 4))) is None
    out = BoxFromRaterd(rater=0)(slice_dict(m[None]))
    assert out["box"].tolist() == [5, 3, 5, 3]


def test_boxes_from_mask_matches_per_slice():
    rng = np.random.default_rng(0)
    vol = rng.random((9, 11, 6)) > 0.93
    vol[..., 2] = False
    boxes = boxes_from_mask(vol)
    assert boxes.shape == (6, 4)
    for k in range(6):
        b = box_from_mask(vol[..., k])
        assert boxes[k].tolist() == ([-1] * 4 if b is None else b.tolist())


def test_box_from_fixed_union_and_random_rater():
    d = slice_dict(three_raters())
    for r in range(3):
        out = BoxFromRaterd(rater=r)(d)
        assert out["box"].tolist() == BOXES[r]
        assert out["rater_index"] == r
        assert out["rater_mask"].shape == (1, 20, 30)
        assert torch.equal(out["rater_mask"][0], d["label"][r])
    out = BoxFromRaterd(rater="union")(d)
    assert out["rater_index"] == -1 and out["box"].tolist() == [6, 4, 19, 11]
    assert torch.equal(out["rater_mask"][0], d["label"].amax(0))
    t = BoxFromRaterd(rater="random")
    t.set_random_state(0)
    seen = set()
    for _ in range(40):
        out = t(d)
        seen.add(out["rater_index"])
        assert out["box"].tolist() == BOXES[out["rater_index"]]
        assert torch.equal(out["rater_mask"][0], d["label"][out["rater_index"]])
    assert seen == {0, 1, 2}
    with pytest.raises(InputError, match="rater index 5"):
        BoxFromRaterd(rater=5)(d)


def test_rater_mask_keeps_metatensor():
    lab = MetaTensor(torch.as_tensor(three_raters()), meta={"filename_or_obj": "case.nii.gz"})
    out = BoxFromRaterd(rater=1)({"image": torch.rand(1, 20, 30), "label": lab})
    assert isinstance(out["rater_mask"], MetaTensor)
    assert out["rater_mask"].meta["filename_or_obj"] == "case.nii.gz"


def test_jitter_bounds_and_clipping():
    d = slice_dict(three_raters())
    t = BoxFromRaterd(rater=1, jitter=3)
    t.set_random_state(1)
    exact = torch.tensor(BOXES[1], dtype=torch.float32)
    diffs = []
    for _ in range(300):
        box = t(d)["box"]
        assert box.dtype == torch.float32
        diffs.append((box - exact).tolist())
        assert box[0] <= box[2] and box[1] <= box[3]
    diffs = np.array(diffs)
    assert np.abs(diffs).max() == 3  # reaches the bound, never exceeds it
    assert np.all(diffs == np.round(diffs))
    assert set(np.unique(diffs)) == set(range(-3, 4))
    # near the border: clipped to the image
    m = np.zeros((1, 8, 9), np.float32)
    m[0, 0:2, 7:9] = 1  # top-right corner: box [7, 0, 8, 1]
    t = BoxFromRaterd(rater=0, jitter=4)
    t.set_random_state(2)
    boxes = np.array([t(slice_dict(m))["box"].tolist() for _ in range(200)])
    assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= 8
    assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= 7
    assert boxes[:, 2].max() == 8 and boxes[:, 1].min() == 0  # clipping actually happened
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])


def test_empty_rater():
    lab = three_raters()
    lab[1] = 0
    d = slice_dict(lab)
    out = BoxFromRaterd(rater=1, empty="other")(d)
    assert out["box"].tolist() == [6, 5, 14, 9]  # union of raters 0 and 2
    assert out["rater_mask"].sum() == 0  # the target stays the chosen (empty) rater
    out = BoxFromRaterd(rater=1, empty="default")(d)
    assert out["box"].tolist() == [0, 0, 29, 19]  # whole image by default
    out = BoxFromRaterd(rater=1, empty="default", default_box=[1, 2, 3, 4])(d)
    assert out["box"].tolist() == [1, 2, 3, 4]
    out = BoxFromRaterd(rater=0, empty="other")(slice_dict(np.zeros((3, 20, 30))))
    assert out["box"].tolist() == [0, 0, 29, 19]  # all raters empty: the default box
    with pytest.raises(ValueError):
        BoxFromRaterd(empty="skip")


def test_random_nonempty_rater_never_picks_an_empty_mask():
    lab = three_raters()
    lab[1] = 0
    d = slice_dict(lab)
    t = BoxFromRaterd(rater="random_nonempty")
    t.set_random_state(0)
    seen = {t(d)["rater_index"] for _ in range(40)}
    assert seen == {0, 2}
    # with rater_valid, an unread rater is not drawn either
    t.set_random_state(0)
    seen = {t({**d, "rater_valid": torch.tensor([1, 1, 0])})["rater_index"] for _ in range(20)}
    assert seen == {0}
    # every mask empty: any rater who read it, as "random"
    t.set_random_state(0)
    seen = {t(slice_dict(np.zeros((3, 20, 30))))["rater_index"] for _ in range(40)}
    assert seen == {0, 1, 2}
    # plain "random" does draw the empty one
    r = BoxFromRaterd(rater="random")
    r.set_random_state(0)
    assert 1 in {r(d)["rater_index"] for _ in range(40)}


def test_boxes_from_label_minus_one_rows_and_jitter():
    lab = np.zeros((2, 10, 12, 5), np.float32)
    lab[0, 2:4, 3:6, 1] = 1
    lab[1, 5, 8, 1] = 1
    lab[1, 1:3, 1:3, 3] = 1
    out = BoxesFromLabeld()({"label": torch.as_tensor(lab)})
    assert out["box"].dtype == torch.float32 and out["box"].shape == (5, 4)
    assert out["box"].tolist() == [[-1] * 4, [3, 2, 8, 5], [-1] * 4, [1, 1, 2, 2], [-1] * 4]
    t = BoxesFromLabeld(jitter=2)
    t.set_random_state(0)
    for _ in range(50):
        b = t({"label": torch.as_tensor(lab)})["box"]
        assert b[[0, 2, 4]].eq(-1).all()
        assert (b[1] - torch.tensor([3.0, 2, 8, 5])).abs().max() <= 2
        assert b[3].min() >= 0



def test_training_box_from_the_union_keeps_the_chosen_rater_as_target():
    """prompt="union": one prompt for every rater (the raters' union box), the target still one rater's mask."""
    d = slice_dict(three_raters())
    union = BoxFromRaterd(rater="union")(d)["box"]
    t = BoxFromRaterd(rater="random", prompt="union")
    t.set_random_state(0)
    targets = set()
    for _ in range(30):
        out = t(d)
        assert torch.equal(out["box"], union)
        assert torch.equal(out["rater_mask"][0], d["label"][out["rater_index"]])
        targets.add(out["rater_index"])
    assert targets == {0, 1, 2}
    own = BoxFromRaterd(rater=1, prompt="random_rater")(d)["box"]
    assert not torch.equal(own, union)  # the default protocol: the target rater's own box
    lab = np.zeros((2, 20, 30), np.float32)  # an empty target rater: the union box, not "the other raters"
    lab[0, 2:5, 3:9] = 1
    out = BoxFromRaterd(rater=1, prompt="union")(slice_dict(lab))
    assert out["box"].tolist() == [3, 2, 8, 4] and out["rater_mask"].sum() == 0
    with pytest.raises(ValueError, match="prompt must be one of"):
        BoxFromRaterd(prompt="centre")


def test_evaluation_boxes_of_a_random_nonempty_rater_per_slice():
    lab = np.zeros((3, 10, 12, 3), np.float32)
    lab[0, 2:4, 3:6, 0] = 1  # slice 0: raters 0 and 1
    lab[1, 5:8, 8:11, 0] = 1
    lab[2, 1:3, 1:3, 2] = 1  # slice 2: rater 2 alone; slice 1: nobody
    t = BoxesFromLabeld(prompt="random_rater")
    t.set_random_state(0)
    seen = set()
    for _ in range(30):
        b = t({"label": torch.as_tensor(lab)})["box"]
        assert b[1].eq(-1).all() and b[2].tolist() == [1, 1, 2, 2]
        assert b[0].tolist() in ([3, 2, 5, 3], [8, 5, 10, 7])
        seen.add(tuple(b[0].tolist()))
    assert len(seen) == 2  # both raters drawn, never their union
    again = BoxesFromLabeld(prompt="random_rater")
    again.set_random_state(0)
    t.set_random_state(0)
    assert torch.equal(t({"label": torch.as_tensor(lab)})["box"], again({"label": torch.as_tensor(lab)})["box"])
    with pytest.raises(ValueError, match="prompt must be one of"):
        BoxesFromLabeld(prompt="centre")

# ---------------------------------------------------------------------------------------------------------------------
# slices and crops
# ---------------------------------------------------------------------------------------------------------------------


def marked_volume(depth=20, marked=(2, 3, 4, 10)):
    lab = np.zeros((3, 16, 18, depth), np.float32)
    for n, k in enumerate(marked):
        lab[n % 3, 4:8, 5:9, k] = 1  # each marked slice by a single rater
    img = np.random.default_rng(0).random((1, 16, 18, depth)).astype(np.float32)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, 20, 30]
    return {
        "image": MetaTensor(torch.as_tensor(img), affine=torch.as_tensor(affine)),
        "label": MetaTensor(torch.as_tensor(lab), affine=torch.as_tensor(affine)),
        "id": "case7",
    }


def test_select_slices_keeps_marked_and_empty_share():
    d = marked_volume()
    t = SelectSlicesd(empty_share=0.5)
    t.set_random_state(0)
    out = t(d)
    assert isinstance(out, list)
    idx = [o["slice_index"] for o in out]
    assert {2, 3, 4, 10} <= set(idx) and len(idx) == 8 and idx == sorted(idx)
    assert sum(o["label"].sum() == 0 for o in out) == 4
    for o in out:
        k = o["slice_index"]
        assert isinstance(k, int) and o["id"] == "case7"
        assert o["image"].shape == (1, 16, 18) and o["label"].shape == (3, 16, 18)
        assert torch.equal(o["image"].as_tensor(), d["image"][..., k].as_tensor())
        assert torch.equal(o["label"].as_tensor(), d["label"][..., k].as_tensor())
        assert o["image"].affine.shape == (3, 3)
        assert torch.allclose(o["image"].affine[:2, 2].double(), torch.tensor([10.0, 20.0], dtype=torch.float64))
    # share 0: only the marked slices
    assert [o["slice_index"] for o in SelectSlicesd(empty_share=0.0)(d)] == [2, 3, 4, 10]
    # stochastic rounding: 4 marked, share 0.2 -> 1 empty slice on average
    t = SelectSlicesd(empty_share=0.2)
    t.set_random_state(3)
    counts = [len(t(d)) - 4 for _ in range(50)]
    assert set(counts) <= {1} and np.mean(counts) == 1
    t = SelectSlicesd(empty_share=0.1)  # 4 * 0.1 / 0.9 = 0.444 empty slices on average
    t.set_random_state(3)
    counts = [len(t(d)) - 4 for _ in range(300)]
    assert set(counts) <= {0, 1} and abs(np.mean(counts) - 4 / 9) < 0.1
    # a volume with no target: one empty slice, or none with share 0
    empty = marked_volume(marked=())
    assert len(SelectSlicesd(empty_share=0.1)(empty)) == 1
    assert SelectSlicesd(empty_share=0.0)(empty) == []
    with pytest.raises(ValueError):
        SelectSlicesd(empty_share=1.0)


def test_select_slices_in_compose_and_dataloader(tmp_path):
    d = marked_volume()
    img = save_nii(tmp_path / "lung_003.nii.gz", d["image"][0].numpy())
    lab = save_nii(tmp_path / "lung_003_raters.nii.gz", np.moveaxis(d["label"].numpy(), 0, -1))
    pipe = Compose(
        [
            LoadImaged(keys=["image", "label"], ensure_channel_first=True),
            ValidateMultiRaterd(num_raters=3),
            SelectSlicesd(empty_share=0.0),
            BoxFromRaterd(rater="union", jitter=0),
        ]
    )
    out = pipe({"image": img, "label": lab})
    assert [o["slice_index"] for o in out] == [2, 3, 4, 10]
    assert all(o["id"] == "lung_003" for o in out)  # id from the image file name when the item has none
    assert all(o["box"].tolist() == [5, 4, 8, 7] for o in out)
    loader = DataLoader(Dataset([{"image": img, "label": lab, "id": "a"}] * 2, transform=pipe), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 1, 16, 18) and batch["box"].shape == (8, 4)
    assert batch["slice_index"].tolist() == [2, 3, 4, 10] * 2


def test_lesion_crop_centred_and_padded():
    lab = np.zeros((2, 40, 50), np.float32)
    lab[0, 18:23, 20:25] = 1
    lab[1, 19:22, 21:26] = 1  # union rows 18..22, cols 20..25: centre (20, 22)
    img = torch.arange(40 * 50, dtype=torch.float32).reshape(1, 40, 50)
    out = LesionCropd(spatial_size=16)({"image": img, "label": torch.as_tensor(lab)})
    assert out["image"].shape == (1, 16, 16) and out["label"].shape == (2, 16, 16)
    # window rows 13..28, cols 15..30
    assert torch.equal(out["image"][0], img[0, 13:29, 15:31])
    assert out["label"].sum() == lab.sum()
    # near the corner: padded with zeros, the lesion stays at the centre
    lab = np.zeros((1, 40, 50), np.float32)
    lab[0, 1:4, 46:49] = 1  # centre (2, 47)
    out = LesionCropd(spatial_size=(16, 16))({"image": img + 1, "label": torch.as_tensor(lab)})
    assert out["image"].shape == (1, 16, 16)
    assert box_from_mask(out["label"][0]).tolist() == [6, 6, 8, 8]  # centre (7, 7) = (16 - 1) // 2
    # window rows -5..10, cols 40..55: 5 padded rows above, 6 padded columns right
    assert out["image"][0, :5].eq(0).all() and out["image"][0, :, 10:].eq(0).all()
    assert torch.equal(out["image"][0, 5:, :10], img[0, 0:11, 40:50] + 1)
    # shift_inside: no padding, window moved into the image
    out = LesionCropd(spatial_size=16, shift_inside=True)({"image": img + 1, "label": torch.as_tensor(lab)})
    assert out["image"].gt(0).all() and torch.equal(out["image"][0], img[0, 0:16, 34:50] + 1)
    # 3D volumes too
    vol = {"image": torch.rand(1, 10, 12, 8), "label": torch.zeros(2, 10, 12, 8)}
    vol["label"][1, 4, 5, 3] = 1
    out = LesionCropd(spatial_size=6)(vol)
    assert out["label"].shape == (2, 6, 6, 6) and out["label"][1, 2, 2, 2] == 1


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------


def load(image, label, num_raters=None):
    return Compose(
        [LoadImaged(keys=["image", "label"], ensure_channel_first=True), ValidateMultiRaterd(num_raters=num_raters)]
    )({"image": image, "label": label})


def test_validate_accepts_good_case_and_2d_as_one_slice(tmp_path):
    img = save_nii(tmp_path / "ok.nii.gz", np.zeros((6, 7, 1), np.float32))
    lab = save_nii(tmp_path / "ok_lab.nii.gz", np.zeros((6, 7, 1, 4), np.uint8))
    out = load(img, lab, num_raters=4)
    assert out["image"].shape == (1, 6, 7, 1) and out["label"].shape == (4, 6, 7, 1)
    # raters as a list of files are stacked as channels by LoadImaged
    r = [save_nii(tmp_path / f"r{n}.nii.gz", np.ones((6, 7, 1), np.uint8)) for n in range(2)]
    assert load(img, r, num_raters=2)["label"].shape == (2, 6, 7, 1)


@pytest.mark.parametrize(
    "case, which, problem",
    [
        ("dims", "image", "spatial dimension"),
        ("nan", "image", "NaN or infinite"),
        ("inf", "image", "NaN or infinite"),
        ("values", "label", "values other than 0 and 1"),
        ("raters", "label", "declares 3 raters"),
        ("shape", "label", "differs from the image"),
        ("affine", "label", "affine differs from the image's"),
        ("voxel", "image", "too small"),
    ],
)
def test_validate_errors_name_file_and_problem(tmp_path, case, which, problem):
    img = np.zeros((6, 7, 3), np.float32)
    lab = np.zeros((6, 7, 3, 3), np.float32)
    if case == "dims":
        img = np.zeros((6, 7), np.float32)
        lab = np.zeros((6, 7, 1, 3), np.float32)
    elif case == "nan":
        img[1, 2, 0] = np.nan
    elif case == "inf":
        img[1, 2, 0] = np.inf
    elif case == "values":
        lab[1, 1, 1, 2] = 2
    elif case == "raters":
        lab = lab[..., :2]
    elif case == "shape":
        lab = np.zeros((6, 8, 3, 3), np.float32)
    elif case == "voxel":
        img, lab = img[:1, :1, :1], lab[:1, :1, :1]
    moved = np.eye(4)
    moved[0, 3] = 2.5 if case == "affine" else 0.0  # the masks 2.5 mm off the image's grid
    paths = {
        "image": save_nii(tmp_path / f"img_{case}.nii.gz", img),
        "label": save_nii(tmp_path / f"lab_{case}.nii.gz", lab, moved),
    }
    with pytest.raises(Exception) as e:
        load(paths["image"], paths["label"], num_raters=3)
    err = input_error(e)
    assert paths[which] in str(err) and err.path == paths[which]
    assert problem in str(err)


def test_validate_in_memory_without_filename():
    t = ValidateMultiRaterd(num_raters=2)
    t({"image": torch.zeros(1, 4, 4, 2), "label": torch.zeros(2, 4, 4, 2)})
    with pytest.raises(InputError, match="values other than 0 and 1"):
        t({"image": torch.zeros(1, 4, 4, 2), "label": torch.full((2, 4, 4, 2), 0.5)})
    t({"image": torch.zeros(2, 4, 4, 2), "label": torch.zeros(2, 4, 4, 2)})  # multi-channel images are fine
    # inference without a label; the image is always required
    ValidateMultiRaterd(allow_missing_keys=True)({"image": torch.zeros(1, 4, 4, 2)})
    with pytest.raises(InputError, match="no 'image' entry"):
        ValidateMultiRaterd(allow_missing_keys=True)({"label": torch.zeros(1, 4, 4, 2)})


def test_intensity_transform():
    x = {"image": torch.tensor([[[[-2000.0, -1000.0, -300.0, 400.0, 1000.0]]]])}
    out = intensity_transform(modality="ct")(x)["image"]
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    out = intensity_transform(modality="CT", window=(0, 100))(x)["image"]
    assert out.min() == 0 and out.max() == 1
    mri = {"image": torch.linspace(0, 1000, 1000).reshape(1, 10, 10, 10)}
    out = intensity_transform(modality="mri")(mri)["image"]
    assert out.min() == 0 and out.max() == 1 and (out == 1).sum() > 1
    out = intensity_transform(modality="none")(x)["image"]
    assert out.min() == 0 and out.max() == 1
    two = {"image": torch.stack([torch.linspace(0, 10, 64), torch.linspace(-5, 500, 64)]).reshape(2, 4, 4, 4)}
    for mod in ("mri", "none"):  # per channel
        out = intensity_transform(modality=mod)(dict(two))["image"]
        assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(2))
        assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(2))
    with pytest.raises(ValueError):
        intensity_transform(modality="pet")
    with pytest.raises(ValueError):
        intensity_transform(window=(400, -1000))


# ---------------------------------------------------------------------------------------------------------------------
# box files
# ---------------------------------------------------------------------------------------------------------------------


def test_load_box_from_file_and_datalist(tmp_path):
    img = MetaTensor(torch.zeros(1, 10, 12, 6), meta={"filename_or_obj": "/data/ct_01.nii.gz"})
    box_file = tmp_path / "ct_01_box.json"
    box_file.write_text(json.dumps({"box": [2, 3, 1, 5, 9, 3]}))
    expected = [[-1] * 4, [3, 2, 9, 5], [3, 2, 9, 5], [3, 2, 9, 5], [-1] * 4, [-1] * 4]
    out = LoadBoxd()({"image": img, "box": str(box_file)})
    assert out["box"].dtype == torch.float32 and out["box"].tolist() == expected
    out = LoadBoxd(mask_key="box_mask")({"image": img, "box": [2, 3, 1, 5, 9, 3]})
    assert out["box"].tolist() == expected
    assert out["box_mask"].shape == (1, 10, 12, 6) and out["box_mask"].sum() == 4 * 7 * 3
    assert torch.equal(BoxesFromLabeld(label_key="box_mask")(out)["box"], out["box"])
    out = LoadBoxd()({"image": img, "box": (0, 0, 0, 9, 11, 5)})  # the whole image
    assert out["box"].tolist() == [[0, 0, 11, 9]] * 6


@pytest.mark.parametrize(
    "box, problem",
    [
        ([2, 3, 1, 10, 9, 3], "outside the image"),
        ([-1, 3, 1, 5, 9, 3], "outside the image"),
        ([2, 3, 4, 5, 9, 3], "k_min 4 > k_max 3"),
        ([2, 3, 1, 5, 9], "6 numbers"),
        ([2, 3, 1, 5, 9, 3, 4], "6 numbers"),
        ([2, 3, 1, 5.5, 9, 3], "whole voxel indices"),
        (["a", 3, 1, 5, 9, 3], "6 numbers"),
        ([5, 3, 1, 5, 9, 3], "zero area in the slice plane"),
        ([2, 4, 0, 6, 4, 5], "zero area in the slice plane"),
    ],
)
def test_load_box_errors(tmp_path, box, problem):
    img = MetaTensor(torch.zeros(1, 10, 12, 6), meta={"filename_or_obj": "/data/ct_01.nii.gz"})
    box_file = tmp_path / "bad_box.json"
    box_file.write_text(json.dumps({"box": box}))
    with pytest.raises(InputError) as e:
        LoadBoxd()({"image": img, "box": str(box_file)})
    assert str(box_file) in str(e.value) and problem in str(e.value)
    with pytest.raises(InputError) as e:  # from the datalist: the image file is named
        LoadBoxd()({"image": img, "box": box})
    assert "/data/ct_01.nii.gz" in str(e.value) and problem in str(e.value)


def test_load_box_file_errors(tmp_path):
    img = MetaTensor(torch.zeros(1, 10, 12, 6), meta={"filename_or_obj": "/data/ct_01.nii.gz"})
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match="not found") as e:
        LoadBoxd()({"image": img, "box": str(missing)})
    assert str(missing) in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{box: ")
    with pytest.raises(InputError, match="not readable JSON"):
        LoadBoxd()({"image": img, "box": str(bad)})
    bad.write_text(json.dumps([1, 2, 3, 4, 5, 6]))
    with pytest.raises(InputError, match='"box"'):
        LoadBoxd()({"image": img, "box": bad})


# ---------------------------------------------------------------------------------------------------------------------
# resizing
# ---------------------------------------------------------------------------------------------------------------------


def test_resize_and_box_scaling_round_trip():
    lab = np.zeros((2, 40, 60), np.float32)
    lab[0, 10:21, 30:46] = 1
    d = slice_dict(lab)
    d = BoxFromRaterd(rater=0)(d)
    box = d["box"].clone()
    assert box.tolist() == [30, 10, 45, 20]
    size = (256, 256)
    fwd = Compose(
        [
            ResizeBoxd("box", ref_key="image", spatial_size=size),
            Resized(keys=["image", "label", "rater_mask"], spatial_size=size, mode=["bilinear", "nearest", "nearest"]),
        ]
    )
    r = fwd(d)
    assert r["image"].shape == (1, 256, 256) and r["rater_mask"].shape == (1, 256, 256)
    sx, sy = 256 / 60, 256 / 40
    assert torch.allclose(r["box"], box * torch.tensor([sx, sy, sx, sy]))
    # the scaled box agrees with the box of the resized target to within one (scaled) pixel
    assert (box_from_mask(r["rater_mask"][0]) - r["box"]).abs().max() <= max(sx, sy)
    back = Compose(
        [
            ResizeBoxd("box", ref_key="image", spatial_size=(40, 60)),
            Resized(keys=["image", "rater_mask"], spatial_size=(40, 60), mode=["bilinear", "nearest"]),
        ]
    )(r)
    assert back["image"].shape == (1, 40, 60)
    assert torch.allclose(back["box"], box, atol=1e-4)
    assert (box_from_mask(back["rater_mask"][0]) - box).abs().max() <= 1  # nearest 60 -> 256 -> 60 is not exact
    # per-slice boxes of a volume: -1 rows are kept
    vol = {"image": torch.zeros(1, 40, 60, 3), "box": torch.tensor([[-1.0] * 4, [30, 10, 45, 20], [-1.0] * 4])}
    out = ResizeBoxd(spatial_size=(128, 120))(vol)["box"]
    assert out[[0, 2]].eq(-1).all() and out[1].tolist() == [60, 32, 90, 64]


# ---------------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_split_sampling_output():
    n = 5
    rng = torch.Generator().manual_seed(0)
    out = torch.rand(3 + n, 6, 7, 4, generator=rng)
    out[3:] = (out[3:] > 0.5).float()
    mt = MetaTensor(out, meta={"filename_or_obj": "x.nii.gz"})
    d = SplitSamplingOutputd(num_samples=n)({"pred": mt})
    assert d["pred"].shape == (1, 6, 7, 4) and d["mean"].shape == (1, 6, 7, 4)
    assert d["uncertainty"].shape == (1, 6, 7, 4) and d["variance"].shape == (1, 6, 7, 4)
    assert d["samples"].shape == (n, 6, 7, 4)
    assert torch.equal(d["pred"].as_tensor(), (out[:1] > 0.5).float())
    assert torch.equal(d["mean"].as_tensor(), out[:1])
    assert torch.equal(d["uncertainty"].as_tensor(), out[1:2])
    assert torch.equal(d["variance"].as_tensor(), out[2:3])
    assert torch.equal(d["samples"].as_tensor(), out[3:])
    assert all(isinstance(d[k], MetaTensor) and d[k].meta["filename_or_obj"] == "x.nii.gz" for k in d)
    d = SplitSamplingOutputd(threshold=0.8)({"pred": out})
    assert torch.equal(d["pred"], (out[:1] > 0.8).float())
    with pytest.raises(ValueError):
        SplitSamplingOutputd(num_samples=4)({"pred": out})


def test_split_sampling_output_with_probabilities():
    n, structures = 3, 2
    out = torch.rand(structures * (3 + 2 * n), 5, 4, generator=torch.Generator().manual_seed(1))
    blocks = out.reshape(structures, 3 + 2 * n, 5, 4)
    d = SplitSamplingOutputd(num_samples=n, probabilities=True)({"pred": out})
    assert d["samples"].shape == d["probabilities"].shape == (structures * n, 5, 4)
    assert torch.equal(d["samples"], blocks[:, 3 : 3 + n].reshape(-1, 5, 4))
    assert torch.equal(d["probabilities"], blocks[:, 3 + n :].reshape(-1, 5, 4))
    assert torch.equal(d["mean"], blocks[:, 0])
    assert "probabilities" not in SplitSamplingOutputd(num_samples=n)({"pred": out[: structures * (3 + n)]})
    with pytest.raises(ValueError, match="3 \\+ 2N"):
        SplitSamplingOutputd(num_samples=4, probabilities=True)({"pred": out})


def test_invert_split_outputs_through_orientation_and_spacing(tmp_path):
    shape = (12, 10, 5)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 0, 2.5, -12.0], [0, -0.9, 0, 7.0], [0, 0, 0, 1]])  # not RAS
    vol = np.random.default_rng(0).normal(-500, 300, shape).astype(np.float32)
    lab = np.zeros((*shape, 2), np.uint8)
    lab[3:9, 2:7, 1:4, 0] = 1  # exactly the box below
    lab[4:8, 3:6, 1:3, 1] = 1
    item = {
        "image": save_nii(tmp_path / "vol.nii.gz", vol, affine),
        "label": save_nii(tmp_path / "vol_raters.nii.gz", lab, affine),
        "box": [3, 2, 1, 8, 6, 3],
    }
    pre = volume_transforms(num_raters=2, orientation="RAS", spacing=(1.5, 1.5, 1.5), box=True)
    d = pre(item)
    img = d["image"]
    assert img.shape[1:] != shape and 0 <= float(img.min()) and float(img.max()) <= 1
    assert d["label"].shape[1:] == img.shape[1:] and "box_mask" not in d
    # the per-slice boxes followed the resampling: they match the resampled union of the raters (= the box here)
    assert d["box"].shape == (img.shape[-1], 4)
    assert torch.equal(d["box"], BoxesFromLabeld()(d)["box"])
    # a fake sampling output on the transformed grid: [mean, entropy, variance, 3 samples]
    mean = torch.linspace(0, 1, img.numel()).reshape(img.shape)
    samples = (torch.rand(3, *img.shape[1:]) > 0.5).float()
    out = torch.cat([mean, mean * 0.3, mean * 0.1, samples]).float()
    d["pred"] = MetaTensor(out, meta=img.meta)
    d = SplitSamplingOutputd(num_samples=3)(d)
    keys = ["pred", "mean", "uncertainty", "variance", "samples"]
    inv = Invertd(keys=keys, transform=pre, orig_keys="image", nearest_interp=[True, False, False, False, True])
    d = inv(d)
    for k in keys:
        assert d[k].shape[1:] == shape, k
        assert np.allclose(d[k].affine.numpy(), affine, atol=1e-5), k
    assert d["samples"].shape[0] == 3 and set(torch.unique(d["samples"]).tolist()) <= {0.0, 1.0}
    assert set(torch.unique(d["pred"]).tolist()) <= {0.0, 1.0}
    SaveImaged(keys="pred", output_dir=str(tmp_path / "out"), output_postfix="pred", separate_folder=False)(d)
    saved = nib.load(str(tmp_path / "out" / "vol_pred.nii.gz"))
    assert saved.shape[:3] == shape and np.allclose(saved.affine, affine, atol=1e-5)


def test_volume_transforms_without_label_or_box(tmp_path):
    img = save_nii(tmp_path / "v.nii.gz", np.full((6, 7, 3), 400, np.float32))
    d = volume_transforms()({"image": img})
    assert d["image"].shape == (1, 6, 7, 3) and torch.all(d["image"] == 1) and "label" not in d
    d = volume_transforms(box=True)({"image": img, "box": [0, 0, 1, 2, 2, 1]})
    assert d["box"].tolist() == [[-1] * 4, [0, 0, 2, 2], [-1] * 4]
    d = volume_transforms(box=True, orientation="RAS", spacing=(2, 2, 2))({"image": img})  # no box in the item
    assert d["image"].shape[1:] != (6, 7, 3) and "box" not in d and "box_mask" not in d


def test_training_slice_pipeline(tmp_path):
    lab = np.zeros((30, 40, 6, 3), np.uint8)
    lab[10:16, 12:20, 2, 0] = 1
    lab[11:17, 14:22, 2, 1] = 1
    lab[12:14, 15:18, 3, 2] = 1
    item = {
        "image": save_nii(tmp_path / "t.nii.gz", np.zeros((30, 40, 6), np.float32)),
        "label": save_nii(tmp_path / "t_raters.nii.gz", lab),
        "id": "t",
    }
    pipe = training_slice_transforms(num_raters=3, empty_share=0.0, crop_size=16, jitter=0, spatial_size=64)
    pipe.set_random_state(0)
    out = pipe(item)
    assert [o["slice_index"] for o in out] == [2, 3]
    for o in out:
        assert o["image"].shape == (1, 64, 64) and o["label"].shape == (3, 64, 64)
        assert o["rater_mask"].shape == (1, 64, 64) and o["box"].shape == (4,) and o["id"] == "t"
        if o["rater_mask"].sum() > 0:
            assert (box_from_mask(o["rater_mask"][0]) - o["box"]).abs().max() <= 4
    loader = DataLoader(Dataset([item, item], transform=pipe), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["box"].shape == (4, 4)
    assert batch["rater_index"].shape == (4,) and batch["slice_index"].tolist() == [2, 3, 2, 3]
    with pytest.raises(Exception) as e:
        training_slice_transforms(num_raters=4)(item)
    assert "declares 4 raters" in str(input_error(e))
