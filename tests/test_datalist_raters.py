"""Rater identity and "not read": the datalist's rater table, per-case raters, null labels, LoadRatersd,
rater_valid and rater_id through the pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ambisam.data import (
    BoxFromRaterd,
    LoadRatersd,
    ValidateMultiRaterd,
    datalist_raters,
    load_datalist,
    training_slice_transforms,
    volume_transforms,
    write_datalist,
    write_nifti,
)
from ambisam.errors import InputError

SHAPE = (12, 14, 4)


def _case(folder: Path, name: str, raters: int) -> tuple[Path, list[Path]]:
    """An image and `raters` masks; rater r marks a (3 + r)-pixel wide square on slices 1 and 2."""
    image = write_nifti(folder / f"{name}.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    masks = []
    for r in range(raters):
        m = np.zeros(SHAPE, np.uint8)
        m[2 : 5 + r, 3 : 6 + r, 1:3] = 1
        masks.append(write_nifti(folder / f"{name}_r{r}.nii.gz", m, np.eye(4)))
    return image, masks


def _datalist(folder: Path, doc: dict) -> Path:
    path = folder / "datalist.json"
    doc = {"training": [], "validation": [], "test": [], **doc}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture()
def named(tmp_path) -> Path:
    """Raters A-D; case c0 read by all, c1 by B and D only (given in the order D, B), c2 with a null for C."""
    image, masks = _case(tmp_path, "c0", 4)
    image1, masks1 = _case(tmp_path, "c1", 2)
    image2, masks2 = _case(tmp_path, "c2", 4)
    rel = lambda p: p.name  # noqa: E731
    return _datalist(
        tmp_path,
        {
            "raters": ["A", "B", "C", "D"],
            "training": [
                {"id": "c0", "image": rel(image), "label": [rel(m) for m in masks]},
                {"id": "c1", "image": rel(image1), "label": [rel(masks1[1]), rel(masks1[0])], "raters": ["D", "B"]},
                {"id": "c2", "image": rel(image2), "label": [rel(masks2[0]), rel(masks2[1]), None, rel(masks2[3])]},
            ],
        },
    )


def test_load_datalist_puts_every_case_in_the_global_order(named):
    assert datalist_raters(named) == ("A", "B", "C", "D")
    c0, c1, c2 = load_datalist(named, "training")
    assert all(isinstance(p, str) for p in c0["label"]) and len(c0["label"]) == 4
    folder = str(named.parent)
    assert c1["label"] == [None, f"{folder}/c1_r0.nii.gz", None, f"{folder}/c1_r1.nii.gz"] and "raters" not in c1
    assert c2["label"][2] is None and c2["label"][3] == f"{folder}/c2_r3.nii.gz"


def test_loading_gives_zero_channels_and_rater_valid(named):
    c0, c1, c2 = load_datalist(named, "training")
    d = volume_transforms(num_raters=4)(c1)
    assert d["label"].shape == (4, *SHAPE)
    assert d["rater_valid"].dtype == torch.float32 and d["rater_valid"].tolist() == [0, 1, 0, 1]
    assert d["label"][[0, 2]].sum() == 0
    r0 = torch.as_tensor(np.asarray(nib.load(c1["label"][1]).dataobj), dtype=torch.float32)
    assert torch.equal(d["label"][1].as_tensor(), r0)  # rater B's file, in B's channel
    assert d["label"][3].sum() > d["label"][1].sum()  # D's mask (c1_r1) is the larger one
    assert volume_transforms()(c2)["rater_valid"].tolist() == [1, 1, 0, 1]
    full = volume_transforms()(c0)
    assert full["rater_valid"].tolist() == [1, 1, 1, 1] and full["label"].shape == (4, *SHAPE)


def test_datalist_without_raters_is_unchanged(tmp_path):
    image, masks = _case(tmp_path, "x", 3)
    path = write_datalist(tmp_path, {"test": [{"id": "x", "image": image, "label": masks}]})
    item = load_datalist(path, "test")[0]
    assert item["label"] == [str(p.resolve()) for p in masks]
    assert datalist_raters(path) == ("0", "1", "2")
    d = LoadRatersd()(item)
    assert d["label"].shape == (3, *SHAPE) and d["rater_valid"].tolist() == [1, 1, 1]
    assert d["label"].meta["filename_or_obj"]  # MONAI's metadata kept
    with pytest.raises(InputError, match="declares 4 raters"):
        ValidateMultiRaterd(num_raters=4)(volume_transforms()(item))


def test_a_null_counts_as_a_declared_rater(tmp_path):
    image, masks = _case(tmp_path, "n", 2)
    path = write_datalist(tmp_path, {"training": [{"image": image, "label": [masks[0], None, masks[1]]}]})
    raw = json.loads(path.read_text())
    assert raw["training"][0]["label"][1] is None  # written as null
    item = load_datalist(path, "training")[0]
    d = volume_transforms(num_raters=3)(item)  # 2 files + 1 null = 3 declared raters
    assert d["label"].shape == (3, *SHAPE) and d["rater_valid"].tolist() == [1, 0, 1]
    with pytest.raises(Exception) as e:
        volume_transforms(num_raters=4)(item)
    assert "declares 4 raters" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"raters": ["A", "Z"]}, r"training\[0\].*unknown rater\(s\) \['Z'\].*\['A', 'B', 'C'\]"),
        ({"raters": ["A"]}, "names 1 raters for 2 'label' entries"),
        ({"raters": ["A", "A"]}, "more than once"),
        ({"label": [None, None]}, "every 'label' entry is null"),
        ({"label": ["x_r0.nii.gz"]}, "has 1 'label' entries but the datalist names 3 raters"),
    ],
)
def test_rater_errors_name_datalist_and_case(tmp_path, change, problem):
    image, masks = _case(tmp_path, "x", 2)
    item = {"id": "x", "image": image.name, "label": [m.name for m in masks], "raters": ["A", "C"], **change}
    if change.get("label") == ["x_r0.nii.gz"]:  # positional in the table: one entry per rater needed
        item.pop("raters")
    path = _datalist(tmp_path, {"raters": ["A", "B", "C"], "training": [item]})
    with pytest.raises(InputError, match=problem) as e:
        load_datalist(path, "training")
    assert e.value.path == str(path)


def test_bad_rater_table(tmp_path):
    for bad in ([], ["A", ""], "ABC", ["A", "A"]):
        path = _datalist(tmp_path, {"raters": bad})
        with pytest.raises(InputError, match="'raters'") as e:
            load_datalist(path, "training")
        assert e.value.path == str(path)
    with pytest.raises(InputError, match="'raters'"):
        write_datalist(tmp_path / "w", {}, raters=["A", "A"])
    assert not (tmp_path / "w" / "datalist.json").exists()


def test_write_datalist_rater_table_round_trip(tmp_path):
    image, masks = _case(tmp_path, "w", 2)
    path = write_datalist(
        tmp_path, {"training": [{"image": image, "label": masks, "raters": ["R2", "R1"]}]}, raters=["R1", "R2", "R3"]
    )
    raw = json.loads(path.read_text())
    assert list(raw) == ["raters", "training", "validation", "test"] and raw["raters"] == ["R1", "R2", "R3"]
    item = load_datalist(path, "training")[0]
    assert item["label"] == [str(masks[1].resolve()), str(masks[0].resolve()), None]


def _slice(valid, raters=4):
    lab = torch.zeros(raters, 10, 12)
    for r in range(raters):
        if valid[r]:
            lab[r, 2 : 4 + r, 3 : 5 + r] = 1
    return {"image": torch.zeros(1, 10, 12), "label": lab, "rater_valid": torch.tensor(valid, dtype=torch.float32)}


def test_random_rater_only_among_raters_who_read():
    t = BoxFromRaterd()
    t.set_random_state(0)
    drawn = {t(_slice([0, 1, 0, 1]))["rater_index"] for _ in range(60)}
    assert drawn == {1, 3}
    out = t(_slice([0, 0, 1, 0]))
    assert out["rater_index"] == out["rater_id"] == 2 and out["rater_mask"].sum() > 0
    # without rater_valid every channel counts, and the draws are the ones of before (same random stream)
    a, b = BoxFromRaterd(), BoxFromRaterd()
    a.set_random_state(5)
    b.set_random_state(5)
    d = _slice([1, 1, 1, 1])
    no_valid = {k: v for k, v in d.items() if k != "rater_valid"}
    assert [a(d)["rater_index"] for _ in range(20)] == [b(no_valid)["rater_index"] for _ in range(20)]
    assert BoxFromRaterd(rater="union")(d)["rater_id"] == -1
    with pytest.raises(InputError, match="did not read"):
        BoxFromRaterd(rater=0)(_slice([0, 1, 1, 1]))


def test_rater_id_with_structure_major_channels():
    d = _slice([1, 0, 1], raters=3)
    two = dict(d, label=torch.cat([d["label"], d["label"]]))  # 2 structures x 3 raters
    t = BoxFromRaterd()
    t.set_random_state(1)
    outs = [t(two) for _ in range(40)]
    assert {o["rater_index"] for o in outs} == {0, 2, 3, 5}
    assert all(o["rater_id"] == o["rater_index"] % 3 for o in outs)


def test_training_slices_carry_rater_valid_and_rater_id(named):
    c1 = load_datalist(named, "training")[1]
    pipe = training_slice_transforms(num_raters=4, empty_share=0.0, spatial_size=32)
    pipe.set_random_state(0)
    out = pipe(c1)
    assert [o["slice_index"] for o in out] == [1, 2]
    for o in out:
        assert o["rater_valid"].tolist() == [0, 1, 0, 1] and o["label"].shape == (4, 32, 32)
        assert o["rater_id"] in (1, 3) and o["rater_id"] == o["rater_index"] and o["rater_mask"].sum() > 0
