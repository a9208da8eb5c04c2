"""Rater identity by area rank (ProSeg's LIDC convention): RankRatersByAread and rater_order="area" in the
pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ambisam.data import RankRatersByAread, load_datalist, training_slice_transforms, volume_transforms, write_datalist
from ambisam.data import write_nifti

SHAPE = (12, 14, 4)


def _squares(sizes_per_slice: list[list[int]], shape=SHAPE) -> np.ndarray:
    """``(K, *shape)`` masks: rater r draws a square of side ``sizes_per_slice[r][k]`` on slice k (0: nothing)."""
    masks = np.zeros((len(sizes_per_slice), *shape), np.uint8)
    for r, sizes in enumerate(sizes_per_slice):
        for k, side in enumerate(sizes):
            masks[r, 1 : 1 + side, 2 : 2 + side, k] = 1
    return masks


def test_ranking_by_area_of_a_2d_item():
    label = torch.zeros(4, 10, 10)
    label[0, :5, :5] = 1  # 25
    label[1, :2, :2] = 1  # 4
    label[2, :3, :4] = 1  # 12
    label[3, :1, :1] = 1  # 1
    label = MetaTensor(label, meta={"filename_or_obj": "c.nii.gz"})
    out = RankRatersByAread()({"label": label, "rater_valid": torch.ones(4)})
    assert out["rater_order"].tolist() == [3, 1, 2, 0] and out["rater_order"].dtype == torch.int64
    assert [int(m.sum()) for m in out["label"]] == [1, 4, 12, 25]
    assert torch.equal(out["label"][2], label[2].as_tensor())  # masks moved, not changed
    assert isinstance(out["label"], MetaTensor) and out["label"].meta["filename_or_obj"] == "c.nii.gz"
    assert out["rater_valid"].tolist() == [1, 1, 1, 1]
    assert RankRatersByAread()({"label": label})["rater_order"].tolist() == [3, 1, 2, 0]  # no flags: all read


def test_ties_keep_the_stored_order_and_unread_raters_go_last():
    label = torch.zeros(5, 6, 6, 1)
    label[0, :2, :2] = 1  # 4
    label[2, :1, :4] = 1  # 4, tie with rater 0
    label[3, :3, :3] = 1  # 9
    # rater 1 read and saw nothing (0); rater 4 did not read (its zero channel)
    valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    out = RankRatersByAread()({"label": label, "rater_valid": valid})
    assert out["rater_order"].tolist() == [1, 0, 2, 3, 4]
    assert out["rater_valid"].tolist() == [1, 1, 1, 1, 0]
    unread_first = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])  # two unread raters: last, in their stored order
    out = RankRatersByAread()({"label": label, "rater_valid": unread_first})
    assert out["rater_order"].tolist() == [1, 4, 2, 0, 3] and out["rater_valid"].tolist() == [1, 1, 1, 0, 0]


def test_a_volume_is_ranked_as_a_whole():
    # slice 0 alone would rank rater 0 (side 4) above rater 1 (side 2); over the volume rater 1 is the larger
    masks = torch.as_tensor(_squares([[4, 0, 0, 0], [2, 3, 3, 3]]))
    out = RankRatersByAread(keys=["label", "other"])({"label": masks, "other": masks.clone()})
    assert out["rater_order"].tolist() == [0, 1] and torch.equal(out["label"], masks)
    swapped = masks[[1, 0]]
    out = RankRatersByAread(keys=["label", "other"])({"label": swapped, "other": swapped * 2})
    assert out["rater_order"].tolist() == [1, 0] and torch.equal(out["label"], masks)
    assert torch.equal(out["other"], masks * 2)  # every key follows the label's order


def test_errors_and_missing_label():
    with pytest.raises(ValueError, match="3 rater channels for 2"):
        RankRatersByAread()({"label": torch.zeros(3, 4, 4), "rater_valid": torch.ones(2)})
    with pytest.raises(ValueError, match="'box_mask' has 1 channels for 3 raters"):
        RankRatersByAread(keys=["label", "box_mask"])({"label": torch.zeros(3, 4, 4), "box_mask": torch.zeros(1, 4, 4)})
    item = {"image": torch.zeros(1, 4, 4)}
    assert RankRatersByAread(allow_missing_keys=True)(item) == item
    with pytest.raises(KeyError):
        RankRatersByAread()(item)
    for factory in (volume_transforms, training_slice_transforms):
        with pytest.raises(ValueError, match="'datalist', 'area'"):
            factory(rater_order="size")


@pytest.fixture()
def ranked_case(tmp_path) -> Path:
    """One case, 4 raters stored in the order large, small, (not read), medium; rater 0 is the smallest on slice 0."""
    masks = _squares([[1, 6, 6, 6], [3, 2, 2, 0], [0, 0, 0, 0], [2, 4, 4, 0]])
    image = write_nifti(tmp_path / "c.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    files = [write_nifti(tmp_path / f"c_r{r}.nii.gz", masks[r], np.eye(4)) for r in (0, 1, 3)]
    return write_datalist(tmp_path, {"training": [{"id": "c", "image": image, "label": [*files[:2], None, files[2]]}]})


def test_volume_transforms_rank_by_area(ranked_case):
    item = load_datalist(ranked_case, "training")[0]
    d = volume_transforms(num_raters=4, rater_order="area")(item)
    assert d["rater_order"].tolist() == [1, 3, 0, 2]  # areas 17, 36, 109; rater 2 did not read
    assert d["rater_valid"].tolist() == [1, 1, 1, 0]
    areas = [int(m.sum()) for m in d["label"]]
    assert areas == [17, 36, 109, 0]
    plain = volume_transforms(num_raters=4)(item)
    assert "rater_order" not in plain and torch.equal(d["label"], plain["label"][[1, 3, 0, 2]])
    no_label = volume_transforms(rater_order="area")({"image": item["image"]})
    assert "label" not in no_label and "rater_order" not in no_label


def test_training_slices_take_the_volume_rank(ranked_case):
    item = load_datalist(ranked_case, "training")[0]
    stored = volume_transforms(num_raters=4)(item)["label"]
    order = [1, 3, 0, 2]
    pipe = training_slice_transforms(num_raters=4, empty_share=0.0, spatial_size=(12, 14), rater_order="area")
    pipe.set_random_state(0)
    seen = set()
    for _ in range(6):
        for o in pipe(item):
            r, k = o["rater_index"], o["slice_index"]
            seen.add(r)
            assert o["rater_id"] == r and o["rater_order"].tolist() == order and o["rater_valid"][r] == 1
            assert torch.equal(o["label"].as_tensor(), stored[order][..., k].as_tensor())
            assert torch.equal(o["rater_mask"][0].as_tensor(), stored[order[r], ..., k].as_tensor())
    assert seen == {0, 1, 2}  # never the rater who did not read (rank 3)
    # rater 0 is the smallest over the volume (stored rater 1), though on slice 0 stored rater 0 is smaller
    fixed = training_slice_transforms(num_raters=4, empty_share=0.0, spatial_size=(12, 14), rater=0,
                                      rater_order="area")
    first = fixed(item)[0]
    assert first["slice_index"] == 0 and first["rater_id"] == 0 and int(first["rater_mask"].sum()) == 9
