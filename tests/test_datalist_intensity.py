"""The intensity convention is data: the datalist's intensity block, written by synth and convert, read by
datalist_intensity, and the intensity transforms it selects."""

from __future__ import annotations

import json
import logging
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ambisam.data import (
    IntensityConvention,
    convert,
    datalist_intensity,
    intensity_transform,
    load_datalist,
    synthesize,
    volume_transforms,
    write_datalist,
    write_nifti,
)
from ambisam.errors import InputError


def test_synth_writes_ct_with_its_window(tmp_path):
    path = synthesize(tmp_path, cases=1, raters=2, seed=0, shape=(48, 48, 12), split="0,0,1")
    assert json.loads(path.read_text())["intensity"] == {"modality": "ct", "window": [-1000, 400]}
    assert datalist_intensity(path) == IntensityConvention("ct", (-1000.0, 400.0), None, "datalist")


def test_converted_lidc_jpegs_are_none_in_0_255(tmp_path):
    rows, cols = np.mgrid[:16, :20]
    for n in range(2):
        folder = tmp_path / "src" / "training" / f"p{n}"
        folder.mkdir(parents=True)
        Image.fromarray(((rows * 7 + cols * 3) % 256).astype(np.uint8)).save(folder / f"image_{n}.jpg")
        for r in range(2):
            Image.fromarray((((rows - 8) ** 2 + (cols - 9) ** 2 < 20 + r) * 255).astype(np.uint8)).save(
                folder / f"label{r}_.jpg"
            )
    path = convert("lidc-folder", tmp_path / "src", tmp_path / "out", split="0,0,1")
    assert json.loads(path.read_text())["intensity"] == {"modality": "none", "range": [0, 255]}
    conv = datalist_intensity(path)
    assert conv == IntensityConvention("none", None, (0.0, 255.0), "datalist")
    assert json.loads((tmp_path / "out" / "convert.json").read_text())["intensity"] == conv.as_block()
    item = load_datalist(path, "test")[0]
    d = volume_transforms(conv.modality, conv.window, value_range=conv.value_range)(item)
    stored = np.asarray(nib.load(item["image"]).dataobj)[..., 0]
    np.testing.assert_allclose(d["image"][0, ..., 0].numpy(), stored / 255.0, atol=1e-6)  # fixed range, not min-max


def test_converted_pickle_and_qubiq_say_what_their_values_are(tmp_path):
    rng = np.random.default_rng(0)
    masks = [(rng.random((8, 8)) > 0.5).astype(np.uint8) for _ in range(2)]
    cases = [(1.0, {"modality": "none", "range": [0, 1]}), (200.0, {"modality": "none", "range": [0, 255]})]
    for top, expected in cases + [(-5.0, {"modality": "none"})]:
        data = {f"s{n}": {"image": rng.random((8, 8)) * top, "masks": masks, "series_uid": f"u{n}"} for n in range(2)}
        src = tmp_path / f"lidc{top}.pickle"
        src.write_bytes(pickle.dumps(data))
        path = convert("lidc-pickle", src, tmp_path / f"pickle{top}", split="0,0,1")
        assert json.loads(path.read_text())["intensity"] == expected

    def qubiq(root, values):
        case = root / "Training" / "case01"
        case.mkdir(parents=True)
        nib.save(nib.Nifti1Image(values.astype(np.float32), np.eye(4)), str(case / "image.nii.gz"))
        nib.save(nib.Nifti1Image(masks[0], np.eye(4)), str(case / "task01_seg01.nii.gz"))
        return root

    hu = rng.uniform(-1000, 300, (8, 8))
    assert datalist_intensity(convert("qubiq", qubiq(tmp_path / "kidney", hu), tmp_path / "k", split="0,0,1")) == (
        IntensityConvention("ct", (-160.0, 240.0), None, "datalist")
    )
    mri = rng.uniform(0, 900, (8, 8))
    path = convert("qubiq", qubiq(tmp_path / "prostate", mri), tmp_path / "p", split="0,0,1")
    assert datalist_intensity(path).modality == "mri"
    override = {"modality": "ct", "window": [-100, 200]}
    path = convert("qubiq", tmp_path / "prostate", tmp_path / "o", split="0,0,1", intensity=override)
    assert datalist_intensity(path).window == (-100.0, 200.0)
    with pytest.raises(InputError, match="modality"):
        convert("qubiq", tmp_path / "prostate", tmp_path / "bad", intensity={"modality": "pet"})
    assert not (tmp_path / "bad").exists()


def test_absent_block_is_the_default_with_one_warning(tmp_path, caplog):
    path = write_datalist(tmp_path, {})
    with caplog.at_level(logging.WARNING, logger="ambisam.data"):
        conv = datalist_intensity(path)
    assert conv == IntensityConvention("ct", (-1000.0, 400.0), None, "default")
    lines = [r for r in caplog.records if r.name == "ambisam.data"]
    assert len(lines) == 1 and "assuming" in lines[0].getMessage() and str(path) in lines[0].getMessage()


@pytest.mark.parametrize(
    "block, problem",
    [
        ("ct", "must be an object"),
        ({"window": [0, 1]}, "must be an object with a 'modality'"),
        ({"modality": "pet"}, "unknown modality 'pet'"),
        ({"modality": "ct"}, "needs its 'window'"),
        ({"modality": "ct", "window": [400, -1000]}, "low < high"),
        ({"modality": "ct", "window": [0, "a"]}, "two numbers"),
        ({"modality": "mri", "window": [0, 1]}, r"\['window'\] do not apply to modality 'mri'"),
        ({"modality": "none", "range": [5]}, "'range' must be two numbers"),
    ],
)
def test_bad_block_is_one_input_error_naming_the_datalist(tmp_path, block, problem):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"intensity": block, "training": [], "validation": [], "test": []}))
    for read in (lambda: datalist_intensity(path), lambda: load_datalist(path, "training")):
        with pytest.raises(InputError, match=problem) as e:
            read()
        assert e.value.path == str(path)
    with pytest.raises(InputError, match=problem):
        write_datalist(tmp_path / "w", {}, intensity=block)


def test_write_datalist_intensity_and_modalities(tmp_path):
    path = write_datalist(tmp_path, {}, intensity=IntensityConvention("MRI".lower()))
    assert json.loads(path.read_text())["intensity"] == {"modality": "mri"}
    path = write_datalist(tmp_path, {}, intensity={"modality": "NONE"})
    assert datalist_intensity(path) == IntensityConvention("none", None, None, "datalist")


def test_none_with_a_range_scales_that_range():
    x = {"image": torch.tensor([[[[-10.0, 0.0, 51.0, 255.0, 300.0]]]])}
    out = intensity_transform("image", "none", None, value_range=(0, 255))(dict(x))["image"]
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 0.2, 1.0, 1.0]))
    out = intensity_transform("image", "none", None)(dict(x))["image"]  # today's min-max
    assert torch.allclose(out.flatten(), (x["image"].flatten() + 10) / 310)
    with pytest.raises(ValueError, match="value range"):
        intensity_transform("image", "none", value_range=(5, 5))


def test_pipelines_take_the_value_range(tmp_path):
    image = write_nifti(tmp_path / "pic.nii.gz", np.full((4, 5, 1), 51.0, np.float32), np.eye(4))
    d = volume_transforms("none", value_range=(0, 255))({"image": str(image)})
    assert torch.allclose(d["image"], torch.full((1, 4, 5, 1), 0.2))
    d = volume_transforms("none")({"image": str(image)})  # constant image, min-max: all zero
    assert float(d["image"].abs().max()) == 0.0
