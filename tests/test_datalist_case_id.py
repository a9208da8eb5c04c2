"""The one case-id rule: ambisam.data.case_id, and every place in ambisam.data that names a case by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ambisam.data import SelectSlicesd, case_id, inference_items, load_datalist, strip_image_extension, write_datalist
from ambisam.io import write_nifti


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.b.nii.gz", "a.b"),
        ("/data/ct_01.nii.gz", "ct_01"),
        ("ct_01.nii", "ct_01"),
        ("x.NRRD", "x"),
        ("x.nrrd.gz", "x"),
        ("scan.mha", "scan"),
        ("scan.mhd", "scan"),
        ("slice.png", "slice"),
        ("slice.v2.jpg", "slice.v2"),
        ("slice.jpeg", "slice"),
        ("slice.tif", "slice"),
        ("slice.tiff", "slice"),
        ("arr.npy", "arr"),
        ("arr.npz", "arr"),
        ("img.dcm", "img"),
        ("scan.v2", "scan.v2"),  # not an image extension: kept
        ("notes.gz", "notes.gz"),
        (".nii.gz", ".nii.gz"),  # nothing would be left
        ("dicom_folder/", "dicom_folder"),
    ],
)
def test_extension_rule(name, expected):
    assert strip_image_extension(name) == expected
    assert case_id(name) == expected
    assert case_id(Path(name)) == expected


def test_item_metatensor_and_errors():
    assert case_id({"id": 3, "image": "/x/a.b.nii.gz"}) == "3"  # the item's id wins
    assert case_id({"image": "/x/a.b.nii.gz"}) == "a.b"
    loaded = MetaTensor(torch.zeros(1, 2, 2, 1), meta={"filename_or_obj": "/x/a.b.nii.gz"})
    assert case_id(loaded) == "a.b" and case_id({"image": loaded}) == "a.b"
    stacked = MetaTensor(torch.zeros(2, 2, 2, 1), meta={"filename_or_obj": ["/x/r0.nii.gz", "/x/r1.nii.gz"]})
    assert case_id(stacked) == "r0"
    with pytest.raises(ValueError, match="case id"):
        case_id({"label": ["x.nii.gz"]})
    with pytest.raises(ValueError, match="case id"):
        case_id(torch.zeros(1))


def test_every_data_entry_point_uses_the_rule(tmp_path):
    image = write_nifti(tmp_path / "a.b.nii.gz", np.zeros((4, 5, 2), np.float32), np.eye(4))
    mask = write_nifti(tmp_path / "a.b_r0.nii.gz", np.zeros((4, 5, 2), np.uint8), np.eye(4))
    datalist = write_datalist(tmp_path, {"test": [{"image": image, "label": [mask]}]})
    assert load_datalist(datalist, "test")[0]["id"] == "a.b"
    assert inference_items(image=image)[0]["id"] == "a.b"
    vol = MetaTensor(torch.zeros(1, 4, 5, 2), meta={"filename_or_obj": str(image)})
    lab = torch.zeros(1, 4, 5, 2)
    lab[0, 1, 1, 0] = 1
    slices = SelectSlicesd(empty_share=0.0)({"image": vol, "label": lab})
    assert [s["id"] for s in slices] == ["a.b"]
