"""Multi-label volumes: the datalist's class map (labels), its checks, and StructureMasksd."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ambisam.data import (
    StructureMasksd,
    ValidateMultiRaterd,
    datalist_class_map,
    load_datalist,
    volume_transforms,
    write_datalist,
    write_nifti,
)
from ambisam.errors import InputError

CLASS_MAP = {"liver": 1, "kidney_right": 2, "spleen": 5}


def _multi_label_case(folder, raters=2, shape=(10, 12, 3)):
    """Rater r: liver in rows 0-3 (+r), right kidney in rows 5-6, spleen (value 5) on slice 2 for rater 1 only."""
    image = write_nifti(folder / "abd.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    labels = []
    for r in range(raters):
        m = np.zeros(shape, np.uint8)
        m[0 : 4 + r, :4] = 1
        m[5:7, 6:9] = 2
        if r == 1:
            m[8, 8, 2] = 5
        labels.append(write_nifti(folder / f"abd_r{r}.nii.gz", m, np.eye(4)))
    return image, labels


def test_class_map_round_trip_and_structure_masks(tmp_path):
    image, labels = _multi_label_case(tmp_path)
    path = write_datalist(tmp_path, {"test": [{"image": image, "label": labels}]}, labels=CLASS_MAP)
    assert json.loads(path.read_text())["labels"] == CLASS_MAP
    class_map = datalist_class_map(path)
    assert class_map == CLASS_MAP and list(class_map) == ["liver", "kidney_right", "spleen"]
    item = load_datalist(path, "test")[0]

    d = volume_transforms(num_raters=2, class_map=class_map)(item)
    assert d["structures"] == ["liver", "kidney_right", "spleen"]
    assert d["label"].shape == (6, 10, 12, 3) and isinstance(d["label"], MetaTensor)
    lab = d["label"]
    assert set(torch.unique(lab).tolist()) == {0.0, 1.0}
    # structure-major: channel s * K + r
    assert lab[0].sum() == 4 * 4 * 3 and lab[1].sum() == 5 * 4 * 3  # liver, raters 0 and 1
    assert lab[2].sum() == lab[3].sum() == 2 * 3 * 3  # right kidney
    assert lab[4].sum() == 0 and lab[5].sum() == 1 and lab[5, 8, 8, 2] == 1  # spleen: rater 1 only
    assert d["rater_valid"].tolist() == [1, 1]

    raw = torch.stack([torch.as_tensor(np.asarray(nib.load(p).dataobj), dtype=torch.float32) for p in labels])
    kidney = StructureMasksd(class_map=class_map, structures="kidney_right")({"label": raw})  # a plain tensor
    assert kidney["label"].shape == (2, 10, 12, 3) and kidney["structures"] == ["kidney_right"]
    assert torch.equal(kidney["label"], lab[2:4].as_tensor())


def test_unknown_structure_lists_the_known_names():
    known = r"\['liver', 'kidney_right', 'spleen'\]"
    with pytest.raises(InputError, match=r"unknown structure\(s\) \['pancreas'\].*" + known):
        StructureMasksd(class_map=CLASS_MAP, structures=["liver", "pancreas"])


def test_label_value_check_accepts_exactly_the_class_map():
    image = torch.zeros(1, 4, 4, 2)
    lab = torch.zeros(2, 4, 4, 2)
    lab[0, 0, 0, 0], lab[1, 1, 1, 1] = 2, 5
    ValidateMultiRaterd(label_values=CLASS_MAP.values())({"image": image, "label": lab})
    with pytest.raises(InputError, match="values other than 0 and 1"):
        ValidateMultiRaterd()({"image": image, "label": lab})
    lab[1, 2, 2, 0] = 3
    with pytest.raises(InputError, match=r"values other than 0, 1, 2, 5 \(found 3"):
        ValidateMultiRaterd(label_values=CLASS_MAP.values())({"image": image, "label": lab})


@pytest.mark.parametrize(
    "labels, problem",
    [
        ({}, "non-empty object"),
        ([1, 2], "non-empty object"),
        ({"liver": 0}, "positive integer"),
        ({"liver": 1.5}, "positive integer"),
        ({"liver": True}, "positive integer"),
        ({"": 1}, "non-empty"),
        ({"liver": 1, "spleen": 1}, "share the value 1"),
    ],
)
def test_bad_class_map_is_one_input_error_naming_the_datalist(tmp_path, labels, problem):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"labels": labels, "training": [], "validation": [], "test": []}))
    for read in (lambda: load_datalist(path, "training"), lambda: datalist_class_map(path)):
        with pytest.raises(InputError, match=problem) as e:
            read()
        assert e.value.path == str(path)


def test_binary_datalist_has_no_class_map(tmp_path):
    path = write_datalist(tmp_path, {})
    assert datalist_class_map(path) is None
