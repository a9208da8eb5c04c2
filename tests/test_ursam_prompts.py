"""UR-SAM's organ prompts (simulated manual boxes, organ box files in voxel and world coordinates), its
rectification as a post-processing step and the multi-label volume, on hand-built arrays (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ambisam.data import ManualOrganBoxesd, OrganBoxFiled, OrganPromptsd, RectifyByUncertaintyd, multi_label_volume
from ambisam.errors import InputError
from ambisam.inferers.region import sampling_region
from ambisam.networks.ursam import correct


def _two_organs(h=64, w=48, d=6):
    label = torch.zeros(2, h, w, d)
    label[0, 10:30, 5:20, 1:4] = 1  # organ a on slices 1-3
    label[1, 40:50, 30:40, 2:6] = 1  # organ b on slices 2-5
    return label


def test_manual_boxes_are_the_tight_box_moved_by_at_most_the_scaled_perturbation():
    label = _two_organs()
    t = ManualOrganBoxesd(max_perturbation=20)
    t.set_random_state(0)
    out = t({"label": label, "structures": ["a", "b"]})
    limit = 20 * 64 / 1024  # 1.25 px of this 64-pixel slice
    tight = torch.tensor([[10, 5, 1, 29, 19, 3], [40, 30, 2, 49, 39, 5]], dtype=torch.float32)
    assert out["box3d"][:, [2, 5]].tolist() == tight[:, [2, 5]].tolist()  # the slice range is the organ's
    assert (out["box3d"] - tight).abs().max() <= round(limit)
    assert out["box"].shape == (2, 6, 4)
    assert (out["box"][0, [0, 4, 5]] == -1).all() and (out["box"][0, 1:4] >= 0).all()  # only organ a's slices
    assert out["box"][1, 3].tolist() == [out["box3d"][1, 1], out["box3d"][1, 0], out["box3d"][1, 4], out["box3d"][1, 3]]
    again = ManualOrganBoxesd(max_perturbation=20)
    again.set_random_state(0)
    assert torch.equal(again({"label": label, "structures": ["a", "b"]})["box3d"], out["box3d"])  # seeded
    big = ManualOrganBoxesd(max_perturbation=400).set_random_state(1)({"label": label, "structures": ["a", "b"]})
    assert not torch.equal(big["box3d"], tight)  # a perturbation does move the boxes


def test_manual_boxes_with_a_run_seed_depend_on_the_case_not_on_what_came_before():
    label = _two_organs()
    t = ManualOrganBoxesd(max_perturbation=100, seed=3)
    first = t({"label": label, "structures": ["a", "b"], "id": "case1"})["box3d"]
    t({"label": label, "structures": ["a", "b"], "id": "case0"})  # another case in between: no effect
    assert torch.equal(t({"label": label, "structures": ["a", "b"], "id": "case1"})["box3d"], first)
    other = [ManualOrganBoxesd(max_perturbation=100, seed=s)({"label": label, "structures": ["a", "b"], "id": c})
             ["box3d"] for s, c in ((3, "case0"), (4, "case1"))]
    assert not torch.equal(other[0], first) and not torch.equal(other[1], first)


def test_an_organ_the_case_lacks_gets_no_prompt():
    label = _two_organs()
    label[1] = 0
    out = ManualOrganBoxesd()({"label": label, "structures": ["a", "b"]})
    assert (out["box3d"][1] == -1).all() and (out["box"][1] == -1).all()


def _image(affine, shape=(20, 30, 8)):
    return MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_a_world_box_lands_on_the_same_voxels_in_any_orientation_and_spacing(tmp_path, orientation):
    # 0.8 x 0.8 x 5 mm, an origin, and LPS flips the first two axes
    flip = np.diag([-1.0, -1.0, 1.0]) if orientation == "LPS" else np.eye(3)
    affine = np.eye(4)
    affine[:3, :3] = flip @ np.diag([0.8, 0.8, 5.0])
    affine[:3, 3] = [12.0, -40.0, 100.0]
    voxel_box = [3, 4, 2, 10, 20, 5]
    corners = np.array([voxel_box[:3], voxel_box[3:]], dtype=float)
    world = (affine @ np.c_[corners, np.ones(2)].T)[:3].T.reshape(-1).tolist()
    path = tmp_path / "organs.json"
    path.write_text(json.dumps({"coordinates": "world", "boxes": {"liver": world}}))
    out = OrganBoxFiled(structures=["liver"])({"image": _image(affine), "box": str(path)})
    assert out["box3d"][0].tolist() == voxel_box
    assert out["structures"] == ["liver"] and out["box"].shape == (1, 8, 4)
    assert out["box"][0, 3].tolist() == [4, 3, 20, 10]  # [x_min, y_min, x_max, y_max] = [j, i, j, i]


def test_voxel_box_file_and_its_errors_name_the_file(tmp_path):
    image = _image(np.eye(4))
    path = tmp_path / "organs.json"
    path.write_text(json.dumps({"boxes": {"liver": [1, 1, 0, 5, 6, 3], "spleen": [0, 0, 0, 99, 5, 2]}}))
    out = OrganBoxFiled(structures=["liver"])({"image": image, "box": str(path)})
    assert out["box3d"].tolist() == [[1, 1, 0, 5, 6, 3]]
    for structures, problem in ((["kidney_left"], "has no box for ['kidney_left']"),
                                (["spleen"], "outside the image")):
        with pytest.raises(InputError) as e:
            OrganBoxFiled(structures=structures)({"image": image, "box": str(path)})
        assert str(path) in str(e.value) and problem in str(e.value)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        OrganBoxFiled(structures=["liver"])({"image": image, "box": str(path)})


def test_prompt_modes_say_what_is_missing():
    item = {"image": _image(np.eye(4))}
    with pytest.raises(InputError, match="localiser"):
        OrganPromptsd("auto")(item)
    with pytest.raises(InputError, match="organ box file"):
        OrganPromptsd("box_file", structures=["liver"])(item)
    with pytest.raises(InputError, match="label"):
        OrganPromptsd("manual")(item)
    with pytest.raises(InputError, match="prompt must be one of"):
        OrganPromptsd("clicks")


def test_multi_label_volume_takes_the_more_probable_organ_where_masks_overlap():
    masks = torch.tensor([[[True, True, False]], [[False, True, True]]])  # (S=2, 1, 3)
    prob = torch.tensor([[[0.9, 0.6, 0.0]], [[0.0, 0.8, 0.7]]])
    assert multi_label_volume(masks, prob, [1, 13]).tolist() == [[[1, 13, 13]]]


def test_rectification_step_equals_the_method_function_on_a_region_and_densely():
    torch.manual_seed(0)
    s, h, w, d = 2, 16, 16, 5
    mean = torch.rand(s, h, w, d)
    image = torch.rand(1, h, w, d)
    boxes = torch.full((s, d, 4), -1.0)
    boxes[0, 1:4] = torch.tensor([2.0, 3.0, 12.0, 13.0])
    boxes[1, 2] = torch.tensor([0.0, 0.0, 15.0, 15.0])
    step = RectifyByUncertaintyd({"a": 1, "b": 2})
    item = {"mean": mean, "image": image, "box": boxes, "structures": ["a", "b"], "pred": None}
    dense = step(item)
    expected = correct("ursam", mean[0, :, :, 2][None], image[0, :, :, 2][None], boxes[0, 2][None])
    assert torch.equal(dense["pred"][0, :, :, 2].bool(), expected["mask"][0])
    assert torch.equal(dense["uncertain"][0, :, :, 2].bool(), expected["uncertain"][0])
    assert not dense["pred"][0, :, :, [0, 4]].any() and not dense["pred"][1, :, :, [0, 1, 3, 4]].any()
    slab = sampling_region(mean[..., 1:4].clone(), [0, 0, 1], [h, w, d])
    region = step({**item, "mean": slab})
    assert region["pred"]["values"].dtype == torch.uint8
    assert torch.equal(region["pred"]["values"].bool(), dense["pred"][..., 1:4].bool())
    assert torch.equal(region["labels"]["values"], dense["labels"][..., 1:4].to(torch.uint8))
    assert set(torch.unique(dense["labels"]).tolist()) <= {0, 1, 2}
