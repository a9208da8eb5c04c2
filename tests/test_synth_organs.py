"""`synth --organs`: the multi-organ abdominal CT data set (FLARE22's 13 organs, one label map per case)."""

from __future__ import annotations

import json
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from ambisam.cli import Commands, main
from ambisam.data import (
    FLARE22_LABELS,
    SPLITS,
    datalist_class_map,
    datalist_intensity,
    ensure_dataset,
    load_datalist,
    synth_organ_case,
    synthesize_organs,
    volume_transforms,
)
from ambisam.data.synth_organs import ORGAN_HU, organ_affine
from ambisam.errors import InputError

SHAPE = (64, 64, 24)
SPACING = (1.6, 1.6, 5.0)
CASES = 3


@pytest.fixture(scope="module")
def organs_set(tmp_path_factory) -> Path:
    return synthesize_organs(tmp_path_factory.mktemp("organs"), cases=CASES, seed=0, shape=SHAPE)


def _array(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _cases(datalist: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (image, label map)}`` of every case of the datalist."""
    out = {}
    for split in SPLITS:
        for item in load_datalist(datalist, split):
            assert len(item["label"]) == 1  # one rater
            out[item["id"]] = (_array(item["image"]), _array(item["label"][0]))
    return dict(sorted(out.items()))


def _centroids(labels: np.ndarray) -> dict[str, np.ndarray]:
    values = list(FLARE22_LABELS.values())
    centres = ndimage.center_of_mass(np.ones(labels.shape), labels, index=values)
    return {name: np.asarray(c) for name, c in zip(FLARE22_LABELS, centres)}


def test_datalist_is_one_rater_with_the_class_map_and_the_medsam_window(organs_set):
    raw = json.loads(organs_set.read_text())
    assert raw["labels"] == FLARE22_LABELS and list(raw["labels"]) == list(FLARE22_LABELS)
    assert raw["intensity"] == {"modality": "ct", "window": [-500, 1000]} and "raters" not in raw
    items = [it for split in SPLITS for it in raw[split]]
    assert sorted(it["id"] for it in items) == [f"case{n:03d}" for n in range(CASES)]
    for item in items:
        assert item["image"] == f"imagesTr/{item['id']}.nii.gz" and item["label"] == [f"labelsTr/{item['id']}.nii.gz"]
        assert item["patient"] == item["id"]
    class_map = datalist_class_map(organs_set)
    convention = datalist_intensity(organs_set)
    assert class_map == FLARE22_LABELS and convention.window == (-500.0, 1000.0)

    item = load_datalist(organs_set, "training")[0]
    d = volume_transforms(convention.modality, convention.window, num_raters=1, class_map=class_map)(item)
    assert d["label"].shape == (13, *SHAPE) and d["structures"] == list(FLARE22_LABELS)
    assert set(torch.unique(d["label"]).tolist()) == {0.0, 1.0} and d["rater_valid"].tolist() == [1]
    labels = _array(item["label"][0])
    for s, value in enumerate(FLARE22_LABELS.values()):
        assert torch.equal(d["label"][s].bool(), torch.as_tensor(labels == value))
    image = nib.load(item["image"])
    assert image.get_data_dtype() == np.int16 and nib.load(item["label"][0]).get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, organ_affine(SHAPE, SPACING))
    np.testing.assert_allclose(np.diag(image.affine)[:3], SPACING)

    record = json.loads((organs_set.parent / "synth.json").read_text())
    assert record["kind"] == "synth_organs" and record["organs"] == list(FLARE22_LABELS)
    assert record["shape"] == list(SHAPE) and record["spacing"] == list(SPACING) and "numpy" in record["versions"]
    assert set(record["cases_info"]) == {it["id"] for it in items}
    liver = record["cases_info"]["case000"]["organs"]["liver"]
    assert liver["label"] == 1 and liver["voxels"] > 0 and len(liver["centroid"]) == 3


def test_every_organ_is_present_with_its_value_on_two_slices_and_nothing_else(organs_set):
    for case, (image, labels) in _cases(organs_set).items():
        assert set(np.unique(labels).tolist()) == {0, *FLARE22_LABELS.values()}, case
        for name, value in FLARE22_LABELS.items():
            assert np.count_nonzero((labels == value).any(axis=(0, 1))) >= 2, (case, name)
        assert image.min() >= -1024 and (image == labels).sum() < labels.size  # HU, not a copy of the labels


def test_organ_densities_are_the_documented_hounsfield_units(organs_set):
    checked = 0
    for case, (image, labels) in _cases(organs_set).items():
        gas = ndimage.binary_dilation(image < -500, np.ones((5, 5, 3), bool))  # the stomach's gas and its blur
        for name, value in FLARE22_LABELS.items():
            mask = labels == value
            every = image[mask & ~gas].astype(float)
            assert abs(every.mean() - ORGAN_HU[name]) < 70, (case, name, every.mean())  # outlines blurred into fat
            # inside: all 8 in-plane neighbours in the organ, beyond the partial-volume blur of its outline
            inner = image[ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool)) & ~gas].astype(float)
            if inner.size >= 30:  # smaller insides keep too much of the smooth texture to be measured
                checked += 1
                assert abs(inner.mean() - ORGAN_HU[name]) < 20, (case, name, inner.mean())
        fat = image[(labels == 0) & (image > -200) & (image < 0)]
        assert abs(np.median(fat) + 100) < 20
    assert checked >= 6 * CASES


def test_anatomy_is_the_same_on_every_case(organs_set):
    for case, (image, labels) in _cases(organs_set).items():
        c = _centroids(labels)
        spine_i = ndimage.center_of_mass(image > 300)[0]  # the vertebrae (bone), midline
        i, j, k = 0, 1, 2
        assert c["liver"][i] > c["spleen"][i], case  # i: from the patient's left to the right
        assert c["kidney_right"][i] > spine_i > c["kidney_left"][i], case
        assert c["inferior_vena_cava"][i] > c["aorta"][i], case
        assert abs(c["aorta"][i] - spine_i) < abs(c["kidney_left"][i] - spine_i) / 2, case  # medial
        for front in ("pancreas", "stomach", "gallbladder", "liver"):  # j: posterior to anterior
            assert c["aorta"][j] < c[front][j], (case, front)
        assert c["adrenal_gland_right"][i] > spine_i > c["adrenal_gland_left"][i], case
        assert c["esophagus"][k] > max(c["kidney_left"][k], c["kidney_right"][k]), case  # k: inferior to superior
        assert c["liver"][k] > c["kidney_right"][k] and c["adrenal_gland_right"][k] > c["kidney_right"][k], case


def test_sizes_and_positions_vary_between_cases(organs_set):
    cases = _cases(organs_set)
    for name, value in FLARE22_LABELS.items():
        volumes = [np.count_nonzero(labels == value) for _, labels in cases.values()]
        assert len(set(volumes)) == CASES, (name, volumes)
    liver = [_centroids(labels)["liver"] for _, labels in cases.values()]
    assert np.ptp(np.stack(liver), axis=0).max() > 0.5


def test_same_seed_same_arrays_and_a_case_does_not_change_when_cases_grows(organs_set, tmp_path):
    full = _cases(organs_set)
    for n, (image, labels) in enumerate(full.values()):
        again = synth_organ_case(np.random.default_rng([0, n]), SHAPE, SPACING)
        assert np.array_equal(again[0], image) and np.array_equal(again[1], labels)
    fewer = _cases(synthesize_organs(tmp_path / "two", cases=2, seed=0, shape=SHAPE))
    assert list(fewer) == ["case000", "case001"]
    for case, (image, labels) in fewer.items():
        assert np.array_equal(image, full[case][0]) and np.array_equal(labels, full[case][1])
    other = synth_organ_case(np.random.default_rng([1, 0]), SHAPE)[0]
    assert not np.array_equal(other, full["case000"][0])


def test_a_subset_labels_the_same_image(organs_set):
    image, labels = _cases(organs_set)["case000"]
    sub_image, sub_labels, info = synth_organ_case(np.random.default_rng([0, 0]), SHAPE, organs="spleen,liver")
    assert np.array_equal(sub_image, image)
    assert np.array_equal(sub_labels, np.where(np.isin(labels, [1, 3]), labels, 0))
    assert list(info["organs"]) == ["liver", "spleen"]  # FLARE22's order


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"organs": ["liver", "pancreaz"]}, r"unknown organ\(s\) \['pancreaz'\]; the organs are liver, kidney_right"),
        ({"organs": "liver,liver"}, "named more than once"),
        ({"shape": (64, 64, 4)}, "at least"),
        ({"cases": 0}, "cases >= 1"),
        ({"spacing": (1.0, 0.0, 2.0)}, "positive"),
    ],
)
def test_bad_arguments_are_one_input_error_and_nothing_is_written(tmp_path, kwargs, problem):
    out = tmp_path / "bad"
    with pytest.raises(InputError, match=problem):
        synthesize_organs(out, **{"cases": 1, "shape": SHAPE, **kwargs})
    assert not out.exists()


def test_ensure_dataset_writes_the_organ_set_for_a_config(tmp_path):
    datalist = ensure_dataset(tmp_path / "organs", organs=["spleen", "liver"], cases=1, shape=SHAPE)
    assert datalist_class_map(datalist) == {"liver": 1, "spleen": 3}
    assert ensure_dataset(tmp_path / "organs", organs=True) == datalist  # used as it is
    with pytest.raises(InputError, match="unknown organ"):
        ensure_dataset(tmp_path / "bad", organs=["livr"])
    with pytest.raises(InputError, match="one rater"):
        ensure_dataset(tmp_path / "bad", organs=True, raters=4)
    assert not (tmp_path / "bad").exists()
    everything = ensure_dataset(tmp_path / "all", organs=True, cases=1, shape=SHAPE)
    assert datalist_class_map(everything) == FLARE22_LABELS


def test_cli_organs_and_spacing(tmp_path, capsys):
    out = tmp_path / "cli"
    fire.Fire(Commands(), command=["synth", str(out), "--cases", "1", "--organs", "liver,kidney_left",
                                   "--spacing", "1.0,1.0,2.5"], name="ambisam")
    datalist = out / "datalist.json"
    assert capsys.readouterr().out.strip() == str(datalist)
    assert datalist_class_map(datalist) == {"liver": 1, "kidney_left": 13}
    image = nib.load(out / "imagesTr" / "case000.nii.gz")
    assert image.shape == (96, 96, 32) and np.allclose(np.diag(image.affine)[:3], (1.0, 1.0, 2.5))

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "bad"), "--organs", "liver,gall_bladder"])
    assert exit_info.value.code == 2
    assert "unknown organ(s) ['gall_bladder']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
