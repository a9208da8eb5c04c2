"""Datalists, the synthetic data set and the converters: ambisam.data.{datalist,synth,convert}."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged
from PIL import Image
from scipy.ndimage import distance_transform_edt

from ambisam.data import (
    convert,
    load_datalist,
    parse_split,
    split_by_patient,
    synthesize,
    write_datalist,
    write_nifti,
)
from ambisam.data.synth import SMALL_RADIUS
from ambisam.errors import InputError

LIDC_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lidc-sample"
SPLITS = ("training", "validation", "test")


def _all_items(datalist: Path) -> list[dict]:
    return [item for split in SPLITS for item in load_datalist(datalist, split)]


def _array(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created although the input was rejected"


# ------------------------------------------------------------------------------------------------- synth


@pytest.fixture(scope="module")
def synth12(tmp_path_factory) -> Path:
    """12 cases at the default shape: enough for a few small lesions with a missing rater."""
    return synthesize(tmp_path_factory.mktemp("synth12"), cases=12, raters=4, seed=0)


def test_synth_layout_and_record(synth12):
    out = synth12.parent
    assert synth12.name == "datalist.json"
    items = _all_items(synth12)
    assert sorted(it["id"] for it in items) == [f"case{n:03d}" for n in range(12)]
    counts = {s: len(load_datalist(synth12, s)) for s in SPLITS}
    assert counts == {"training": 6, "validation": 3, "test": 3}
    record = json.loads((out / "synth.json").read_text())
    assert record["seed"] == 0 and record["cases"] == 12 and record["raters"] == 4
    assert "monai" in record["versions"] and set(record["lesions"]) == {it["id"] for it in items}
    raw = json.loads(synth12.read_text())
    for item in raw["training"]:  # relative paths in the file
        assert item["image"] == f"imagesTr/{item['id']}.nii.gz"
        assert item["label"] == [f"labelsTr/{item['id']}_rater{r}.nii.gz" for r in range(4)]
        assert item["patient"] == item["id"]


def test_synth_arrays(synth12):
    record = json.loads((synth12.parent / "synth.json").read_text())
    n_missing = 0
    for item in _all_items(synth12):
        img = nib.load(item["image"])
        assert img.shape == (96, 96, 24) and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, np.diag([0.8, 0.8, 2.0, 1.0]))
        image = np.asarray(img.dataobj)
        masks = np.stack([_array(p) for p in item["label"]])
        assert masks.dtype == np.uint8 and masks.shape == (4, 96, 96, 24)
        assert set(np.unique(masks)) <= {0, 1}
        for r, p in enumerate(item["label"]):
            np.testing.assert_allclose(nib.load(p).affine, img.affine)
        marked = masks.reshape(4, -1).any(1)
        assert marked.any(), f"{item['id']}: no rater marks the lesion"
        info = record["lesions"][item["id"]]
        assert sorted(np.flatnonzero(~marked).tolist()) == info["missed_by"]
        if not marked.all():
            n_missing += 1
            assert info["radius"] < SMALL_RADIUS, "only small lesions may be missed"
        union = masks.any(0)
        # never touching the border
        for axis in range(3):
            assert not union.take([0, -1], axis=axis).any(), f"{item['id']}: a mask touches the border"
        assert union.any((0, 1)).sum() >= 3, "the lesion spans several slices"
        # CT-like intensities: lung background, soft-tissue lesion
        assert -900 < np.median(image[~union]) < -800
        core = masks[marked].all(0)
        if core.any():
            assert np.mean(image[core]) > -150
    assert n_missing >= 1, "with 12 cases some small lesion should have a rater who missed it"


def test_synth_raters_disagree_on_boundaries(synth12):
    dices, differing = [], 0
    for item in _all_items(synth12):
        masks = np.stack([_array(p) for p in item["label"]]).astype(bool)
        marked = [m for m in masks if m.any()]
        if len(marked) < 2:
            continue
        if any((a != marked[0]).any() for a in marked[1:]):
            differing += 1
        for a in range(len(marked)):
            for b in range(a + 1, len(marked)):
                inter = (marked[a] & marked[b]).sum()
                dices.append(2 * inter / (marked[a].sum() + marked[b].sum()))
        # disagreement is a boundary effect: every disputed voxel lies within a few voxels of the agreed core
        core = np.logical_and.reduce(marked)
        disputed = np.logical_or.reduce(marked) & ~core
        if core.any() and disputed.any():
            dist_mm = distance_transform_edt(~core, sampling=(0.8, 0.8, 2.0))
            assert dist_mm[disputed].max() < 6.0
    assert differing >= 8, "raters should draw different outlines"
    assert 0.6 < np.mean(dices) < 0.97, f"mean pairwise Dice {np.mean(dices):.2f} is not LIDC-like"


def test_synth_deterministic(tmp_path):
    kwargs = dict(raters=3, seed=7, shape=(64, 64, 16))
    a = synthesize(tmp_path / "a", cases=2, **kwargs)
    b = synthesize(tmp_path / "b", cases=3, **kwargs)
    c = synthesize(tmp_path / "c", cases=2, raters=3, seed=8, shape=(64, 64, 16))
    for name in ["imagesTr/case000.nii.gz", "imagesTr/case001.nii.gz"] + [
        f"labelsTr/case00{n}_rater{r}.nii.gz" for n in range(2) for r in range(3)
    ]:
        x, y = _array(a.parent / name), _array(b.parent / name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    first = "imagesTr/case000.nii.gz"
    assert _array(a.parent / first).tobytes() != _array(c.parent / first).tobytes()
    assert json.loads(a.read_text()) == json.loads(synthesize(tmp_path / "a2", cases=2, **kwargs).read_text())


def test_synth_bad_arguments(tmp_path):
    for kwargs in (dict(cases=0), dict(raters=0), dict(shape=(10, 10, 3)), dict(split=(0.5, 0.5, 0.5))):
        out = tmp_path / "out"
        with pytest.raises(InputError):
            synthesize(out, **kwargs)
        _assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- datalist


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("small"), cases=4, raters=3, seed=1, shape=(64, 64, 16))


def test_load_datalist_absolute_paths(small_synth):
    items = _all_items(small_synth)
    assert len(items) == 4
    for item in items:
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert len(item["label"]) == 3 and all(Path(p).is_absolute() and Path(p).is_file() for p in item["label"])
        assert item["patient"] == item["id"]


def test_loadimaged_stacks_raters_as_channels(small_synth):
    item = load_datalist(small_synth, "training")[0]
    data = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(item)
    assert tuple(data["image"].shape) == (1, 64, 64, 16)
    assert tuple(data["label"].shape) == (3, 64, 64, 16)
    for r, p in enumerate(item["label"]):
        np.testing.assert_array_equal(data["label"][r].numpy(), _array(p))
    np.testing.assert_array_equal(data["image"][0].numpy(), _array(item["image"]))


def test_write_datalist_roundtrip_and_ids_kept(tmp_path):
    img = write_nifti(tmp_path / "data" / "3.nii.gz", np.zeros((8, 9, 4), np.float32), np.eye(4))
    mask = np.zeros((8, 9, 4), np.uint8)
    lab = [write_nifti(tmp_path / "data" / f"3_r{r}.nii.gz", mask, np.eye(4)) for r in range(2)]
    out = tmp_path / "lists"
    (out / "3").mkdir(parents=True)  # a folder named like the id must not turn the id into a path
    item = {"id": "3", "patient": "p1", "image": img, "label": lab, "box": [1, 2, 0, 5, 6, 3]}
    path = write_datalist(out, {"training": [item]})
    raw = json.loads(path.read_text())
    assert raw["validation"] == [] and raw["test"] == []
    assert raw["training"][0]["image"] == "../data/3.nii.gz"
    loaded = load_datalist(path, "training")[0]
    assert loaded["id"] == "3" and loaded["patient"] == "p1" and loaded["box"] == [1, 2, 0, 5, 6, 3]
    assert loaded["image"] == str(img.resolve()) and loaded["label"] == [str(p.resolve()) for p in lab]
    assert load_datalist(path, "test") == []


def _datalist_with(tmp_path: Path, item: dict) -> Path:
    path = tmp_path / "dl" / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": [item], "validation": [], "test": []}))
    return path


def test_load_datalist_errors(tmp_path, small_synth):
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match="nope.json"):
        load_datalist(missing, "training")
    with pytest.raises(InputError, match=r"datalist.json.*'train'"):
        load_datalist(small_synth, "train")
    good = load_datalist(small_synth, "training")[0]

    no_label = _datalist_with(tmp_path, {"id": "x", "image": good["image"]})
    with pytest.raises(InputError, match="label") as e:
        load_datalist(no_label, "training")
    assert str(no_label) in str(e.value)

    gone_image = _datalist_with(tmp_path, {"id": "x", "image": "missing.nii.gz", "label": good["label"]})
    with pytest.raises(InputError, match="missing.nii.gz.*does not exist"):
        load_datalist(gone_image, "training")

    labels = good["label"][:2] + ["r9.nii.gz"]
    gone_rater = _datalist_with(tmp_path, {"id": "x", "image": good["image"], "label": labels})
    with pytest.raises(InputError, match=r"r9.nii.gz.*rater 2"):
        load_datalist(gone_rater, "training")

    box = [0, 0, 0, 64, 5, 5]  # i_max 64 in a 64-voxel axis
    bad_box = _datalist_with(tmp_path, {"id": "x", "image": good["image"], "label": good["label"], "box": box})
    with pytest.raises(InputError, match="outside the image"):
        load_datalist(bad_box, "training")
    flat_box = _datalist_with(tmp_path, {"id": "x", "image": good["image"], "label": good["label"],
                                         "box": [3, 0, 0, 3, 5, 5]})
    with pytest.raises(InputError, match="datalist.*zero area in the slice plane"):
        load_datalist(flat_box, "training")

    other = write_nifti(tmp_path / "other.nii.gz", np.zeros((5, 5, 5), np.uint8), np.eye(4))
    wrong_shape = _datalist_with(tmp_path, {"id": "x", "image": good["image"], "label": [str(other)]})
    with pytest.raises(InputError, match="other.nii.gz.*shape"):
        load_datalist(wrong_shape, "training")
    first = nib.load(good["label"][0])
    moved = first.affine.copy()
    moved[:3, 3] += 2.5  # 2.5 mm off: another grid, though of the same shape
    shifted = write_nifti(tmp_path / "shifted.nii.gz", np.asarray(first.dataobj), moved)
    wrong_grid = _datalist_with(tmp_path, {"id": "x", "image": good["image"], "label": [str(shifted)]})
    with pytest.raises(InputError, match=r"shifted.nii.gz: rater mask's affine differs from its image's "
                                         r"\(largest difference 2.5\)"):
        load_datalist(wrong_grid, "training")
    assert load_datalist(wrong_grid, "training", check_headers=False)  # headers unread: the loader's check then


# ----------------------------------------------------------------------------------------------- splits


def test_split_by_patient():
    items = [{"id": f"s{n}", "patient": f"p{n % 7}"} for n in range(30)]
    a = split_by_patient(items, "0.6,0.2,0.2", seed=3)
    assert a == split_by_patient(items, (0.6, 0.2, 0.2), seed=3)
    assert sum(len(v) for v in a.values()) == 30
    patients = {s: {it["patient"] for it in a[s]} for s in SPLITS}
    assert [len(patients[s]) for s in SPLITS] == [4, 2, 1]  # 7 patients: 4.2, 1.4, 1.4 by largest remainder
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"])
    assert not patients["validation"] & patients["test"]
    assert any(split_by_patient(items, "0.6,0.2,0.2", seed=s) != a for s in range(4, 10))
    everything = split_by_patient(items, "0,0,1")
    assert len(everything["test"]) == 30 and not everything["training"] and not everything["validation"]


@pytest.mark.parametrize("bad", ["0.5,0.5,0.5", "0.5,0.5", "a,b,c", "-0.2,0.6,0.6", (1, 0)])
def test_parse_split_rejects(bad):
    with pytest.raises(InputError, match="split"):
        parse_split(bad)


# ---------------------------------------------------------------------------------------------- lidc-folder


def _jpeg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)


def _lidc_tree(root: Path, cases: int = 5, size: tuple[int, int] = (32, 40)) -> Path:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[: size[0], : size[1]]
    for n in range(cases):
        folder = root / "training" / str(n)
        image = (rows * 3 + cols + 10 * n) % 256  # asymmetric: a transpose or flip would show
        _jpeg(folder / f"image_{n + 1}.jpg", image)
        for r in range(4):
            mask = ((rows - 10 - r) ** 2 + (cols - 25) ** 2 < 30 + 10 * rng.random()) * 255
            _jpeg(folder / f"label{r}_.jpg", mask)
    return root


def test_lidc_folder_orientation_and_values(tmp_path):
    src = _lidc_tree(tmp_path / "src")
    datalist = convert("lidc-folder", src, tmp_path / "out", split="0,0,1")
    items = load_datalist(datalist, "test")
    assert [it["id"] for it in items] == ["0", "1", "2", "3", "4"] and not load_datalist(datalist, "training")
    item = items[2]
    jpeg = np.asarray(Image.open(src / "training" / "2" / "image_3.jpg"))
    image = _array(item["image"])
    assert image.shape == (32, 40, 1) and image.dtype == np.float32
    for r, c in [(0, 0), (3, 17), (31, 39), (20, 5)]:
        assert image[r, c, 0] == jpeg[r, c]
    np.testing.assert_array_equal(image[..., 0], jpeg)
    for r, p in enumerate(item["label"]):
        mask = _array(p)
        expected = np.asarray(Image.open(src / "training" / "2" / f"label{r}_.jpg")) > 127
        assert mask.dtype == np.uint8 and mask.shape == (32, 40, 1)
        np.testing.assert_array_equal(mask[..., 0], expected)
    data = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(item)
    assert tuple(data["image"].shape) == (1, 32, 40, 1) and tuple(data["label"].shape) == (4, 32, 40, 1)
    assert float(data["image"][0, 3, 17, 0]) == jpeg[3, 17]
    record = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert record["format"] == "lidc-folder" and record["cases"] == 5 and record["raters"] == 4


def test_lidc_folder_real_sample(tmp_path):
    if not (LIDC_SAMPLE / "training").is_dir():
        pytest.skip(f"the LIDC-IDRI sample is not at {LIDC_SAMPLE} (shared data folder absent)")
    datalist = convert("lidc-folder", LIDC_SAMPLE, tmp_path / "out", seed=0)
    items = _all_items(datalist)
    assert len(items) == 19 and all(len(it["label"]) == 4 for it in items)
    assert {it["id"] for it in items} == {p.name for p in (LIDC_SAMPLE / "training").iterdir() if p.is_dir()}
    counts = [len(load_datalist(datalist, s)) for s in SPLITS]
    assert counts == [11, 4, 4]
    empty_rater_cases = 0
    for item in items:
        folder = LIDC_SAMPLE / "training" / item["id"]
        jpeg = np.asarray(Image.open(next(folder.glob("image_*.jpg"))))
        image = _array(item["image"])
        assert image.shape == (128, 128, 1)
        np.testing.assert_array_equal(image[:, :, 0], jpeg)
        masks = np.stack([_array(p)[..., 0] for p in item["label"]])
        assert set(np.unique(masks)) <= {0, 1}
        np.testing.assert_array_equal(masks[1], np.asarray(Image.open(folder / "label1_.jpg")) > 127)
        empty_rater_cases += int(not masks.reshape(4, -1).any(1).all())
    assert empty_rater_cases >= 1, "the sample has raters who drew nothing"


def test_lidc_folder_bad_sources(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="missing"):
        convert("lidc-folder", tmp_path / "missing", out)
    _assert_nothing_written(out)

    (tmp_path / "empty" / "training").mkdir(parents=True)
    with pytest.raises(InputError, match="no case folders"):
        convert("lidc-folder", tmp_path / "empty", out)
    _assert_nothing_written(out)

    src = _lidc_tree(tmp_path / "corrupt")
    (src / "training" / "3" / "label1_.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(InputError, match=r"training/3/label1_.jpg.*unreadable"):
        convert("lidc-folder", src, out)
    _assert_nothing_written(out)

    src = _lidc_tree(tmp_path / "three-raters")
    (src / "training" / "4" / "label3_.jpg").unlink()
    with pytest.raises(InputError, match=r"training/4.*3 rater masks"):
        convert("lidc-folder", src, out)
    _assert_nothing_written(out)

    src = _lidc_tree(tmp_path / "shape")
    _jpeg(src / "training" / "1" / "label2_.jpg", np.zeros((16, 16)))
    with pytest.raises(InputError, match=r"training/1/label2_.jpg.*shape"):
        convert("lidc-folder", src, out)
    _assert_nothing_written(out)

    with pytest.raises(InputError, match="unknown format"):
        convert("lidc-jpeg", src, out)
    with pytest.raises(InputError, match="sum to 1"):
        convert("lidc-folder", src, out, split="0.6,0.6,0.2")
    _assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- lidc-pickle


def _lidc_pickle(path: Path, series: int = 5, slices: int = 3) -> dict:
    rng = np.random.default_rng(1)
    data = {}
    for s in range(series):
        uid = f"1.3.6.1.4.1.14519.5.2.1.{1000 + s}"
        for k in range(slices):
            image = rng.random((16, 16)).astype(np.float32)
            masks = [(rng.random((16, 16)) > 0.7).astype(np.uint8) for _ in range(4)]
            data[f"LIDC-IDRI-{s:04d}_slice{k}"] = {"image": image, "masks": masks, "series_uid": uid}
    path.write_bytes(pickle.dumps(data))
    return data


def test_lidc_pickle_split_by_series(tmp_path):
    src = tmp_path / "data_lidc.pickle"
    data = _lidc_pickle(src)
    datalist = convert("lidc-pickle", src, tmp_path / "out", split="0.6,0.2,0.2", seed=2)
    by_split = {s: load_datalist(datalist, s) for s in SPLITS}
    assert [len({it["patient"] for it in by_split[s]}) for s in SPLITS] == [3, 1, 1]
    assert [len(by_split[s]) for s in SPLITS] == [9, 3, 3]
    seen: dict[str, str] = {}
    for split, items in by_split.items():
        for item in items:
            assert seen.setdefault(item["patient"], split) == split, "a series is split across lists"
            source = data[item["id"]]
            assert item["patient"] == source["series_uid"]
            np.testing.assert_array_equal(_array(item["image"])[..., 0], source["image"])
            for r, p in enumerate(item["label"]):
                np.testing.assert_array_equal(_array(p)[..., 0], source["masks"][r])


def test_lidc_pickle_bad_sources(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="bad.pickle.*not a readable pickle"):
        convert("lidc-pickle", bad, out)
    src = tmp_path / "d.pickle"
    data = _lidc_pickle(src, series=2, slices=2)
    key = sorted(data)[-1]
    data[key]["masks"][2] = np.zeros((8, 8), np.uint8)
    src.write_bytes(pickle.dumps(data))
    with pytest.raises(InputError, match=f"d.pickle.*{key}.*shape"):
        convert("lidc-pickle", src, out)
    del data[key]["masks"]
    src.write_bytes(pickle.dumps(data))
    with pytest.raises(InputError, match="masks"):
        convert("lidc-pickle", src, out)
    src.write_bytes(pickle.dumps({}))
    with pytest.raises(InputError, match="no cases"):
        convert("lidc-pickle", src, out)
    _assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------- qubiq


def _nii(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.5, 0.5, 1.0, 1.0])), str(path))


def _qubiq_tree(root: Path, cases: int = 4, raters: int = 3, tasks: int = 1, channels: int = 1) -> Path:
    rng = np.random.default_rng(2)
    for n in range(1, cases + 1):
        case = root / "Training" / f"case{n:02d}"
        shape = (20, 24) if channels == 1 else (20, 24, channels)
        _nii(case / "image.nii.gz", rng.normal(100, 20, shape).astype(np.float32))
        for t in range(1, tasks + 1):
            for s in range(1, raters + 1):
                _nii(case / f"task{t:02d}_seg{s:02d}.nii.gz", (rng.random((20, 24)) > 0.5).astype(np.uint8))
    return root


def test_qubiq_single_task(tmp_path):
    src = _qubiq_tree(tmp_path / "brain-growth")
    datalist = convert("qubiq", src, tmp_path / "out", split="0.5,0.25,0.25", seed=1)
    items = _all_items(datalist)
    assert sorted(it["id"] for it in items) == ["case01", "case02", "case03", "case04"]
    assert [len(load_datalist(datalist, s)) for s in SPLITS] == [2, 1, 1]
    for item in items:
        case = src / "Training" / item["id"]
        image = nib.load(item["image"])
        assert image.shape == (20, 24, 1)
        np.testing.assert_allclose(image.affine, np.diag([0.5, 0.5, 1.0, 1.0]))
        np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 0], _array(case / "image.nii.gz"))
        assert len(item["label"]) == 3
        for s, p in enumerate(item["label"], start=1):
            np.testing.assert_array_equal(_array(p)[..., 0], _array(case / f"task01_seg{s:02d}.nii.gz"))


def test_qubiq_multi_task_multi_channel(tmp_path):
    src = _qubiq_tree(tmp_path / "brain-tumor", tasks=3, channels=4)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="task01, task02, task03"):
        convert("qubiq", src, out)
    _assert_nothing_written(out)
    datalist = convert("qubiq", src, out, split="0,0,1", task=2)
    item = load_datalist(datalist, "test")[0]
    assert nib.load(item["image"]).shape == (20, 24, 1, 4)
    np.testing.assert_array_equal(_array(item["label"][1])[..., 0], _array(src / "Training/case01/task02_seg02.nii.gz"))
    data = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(item)
    assert tuple(data["image"].shape) == (4, 20, 24, 1) and tuple(data["label"].shape) == (3, 20, 24, 1)
    source = _array(src / "Training/case01/image.nii.gz")
    np.testing.assert_array_equal(data["image"][3, :, :, 0].numpy(), source[..., 3])


def test_qubiq_bad_sources(tmp_path):
    out = tmp_path / "out"
    src = _qubiq_tree(tmp_path / "mismatch")
    _nii(src / "Training" / "case03" / "task01_seg02.nii.gz", np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match=r"case03/task01_seg02.nii.gz.*shape"):
        convert("qubiq", src, out)
    _assert_nothing_written(out)

    src = _qubiq_tree(tmp_path / "fewer")
    (src / "Training" / "case02" / "task01_seg03.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case02.*2 rater masks"):
        convert("qubiq", src, out)
    _assert_nothing_written(out)

    (tmp_path / "nocases" / "Training").mkdir(parents=True)
    with pytest.raises(InputError, match="no case folders"):
        convert("qubiq", tmp_path / "nocases", out)
    _assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------ groups


def test_lidc_folder_groups_json_and_csv(tmp_path, caplog):
    src = _lidc_tree(tmp_path / "src", cases=6, size=(16, 16))
    groups = {"0": "a", "1": "a", "2": "b", "3": "b", "4": "c", "5": "c"}
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    for seed in range(4):
        out = tmp_path / f"json{seed}"
        datalist = convert("lidc-folder", src, out, split="0.34,0.33,0.33", seed=seed, groups=tmp_path / "groups.json")
        patients = {s: {it["patient"] for it in load_datalist(datalist, s)} for s in SPLITS}
        assert all(len(p) == 1 for p in patients.values()) and set().union(*patients.values()) == {"a", "b", "c"}
        assert all(it["patient"] == groups[it["id"]] for it in _all_items(datalist))
    record = json.loads((tmp_path / "json0" / "convert.json").read_text())
    assert record["groups"] == str((tmp_path / "groups.json").absolute()) and record["patients"] == 3
    (tmp_path / "groups.csv").write_text("id,patient,site\n" + "".join(f"{k},{v},x\n" for k, v in groups.items()))
    datalist = convert("lidc-folder", src, tmp_path / "csv", groups=tmp_path / "groups.csv", groups_column="patient")
    assert all(it["patient"] == groups[it["id"]] for it in _all_items(datalist))
    caplog.clear()
    with caplog.at_level("WARNING", logger="ambisam.data.convert"):
        convert("lidc-folder", src, tmp_path / "none")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "split is by case" in warnings[0].getMessage()
    assert json.loads((tmp_path / "none" / "convert.json").read_text())["groups"] is None


def test_groups_rejected(tmp_path):
    src = _lidc_tree(tmp_path / "src", cases=3, size=(16, 16))
    bad = {
        "partial.json": json.dumps({"0": "a", "1": "a"}),
        "unknown.json": json.dumps({"x": "a", "y": "b"}),
        "list.json": json.dumps(["a", "b"]),
        "broken.json": "{",
        "nocol.csv": "id,site\n0,a\n1,a\n2,b\n",
    }
    for name, text in bad.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"out_{name}"
        with pytest.raises(InputError, match=name):
            convert("lidc-folder", src, out, groups=path, groups_column="patient" if name.endswith(".csv") else None)
        _assert_nothing_written(out)
    with pytest.raises(InputError, match="missing.json"):
        convert("lidc-folder", src, tmp_path / "o", groups=tmp_path / "missing.json")
    with pytest.raises(InputError, match="groups_column"):
        convert("lidc-folder", src, tmp_path / "o", groups=tmp_path / "nocol.csv")


def test_lidc_folder_real_sample_split_by_nodule(tmp_path):
    if not (LIDC_SAMPLE / "groups.json").is_file():
        pytest.skip(f"the LIDC-IDRI sample's groups.json is not at {LIDC_SAMPLE} (shared data folder absent)")
    groups = json.loads((LIDC_SAMPLE / "groups.json").read_text())
    for seed in range(3):
        datalist = convert("lidc-folder", LIDC_SAMPLE, tmp_path / f"out{seed}", seed=seed,
                           groups=LIDC_SAMPLE / "groups.json")
        split_of: dict[str, str] = {}
        for split in SPLITS:
            for item in load_datalist(datalist, split):
                assert item["patient"] == groups[item["id"]]
                assert split_of.setdefault(item["patient"], split) == split, f"{item['patient']} in two splits"
        assert len(split_of) == len(set(groups.values())) == 7
        assert {s for s in split_of.values()} == set(SPLITS)


def test_qubiq_bad_nifti_files_are_refused_naming_the_file(tmp_path):
    import gzip

    out = tmp_path / "out"
    good = tmp_path / "good.nii.gz"
    _nii(good, np.ones((20, 24), np.float32))
    whole = good.read_bytes()
    nan = np.ones((20, 24), np.float32)
    nan[0, 0] = np.nan
    cases = {  # case02's file -> (its content, the problem)
        "image.nii.gz": [(whole[: len(whole) // 2], "not a readable NIfTI image"),
                         (gzip.compress(b"\x00" * 40 + whole[40:400]), "not a readable NIfTI image"),
                         (np.ones((20, 24, 3, 2), np.float32), "does not match image image.nii.gz"),
                         (nan, "has 1 NaN or infinite intensities")],
        "task01_seg02.nii.gz": [((np.ones((20, 24)) * 3).astype(np.uint8), "mask values must be 0/1"),
                                (np.full((20, 24), 0.4, np.float32), "found 0.4")],
    }
    n = 0
    for name, bad in cases.items():
        for content, problem in bad:
            n += 1
            src = _qubiq_tree(tmp_path / f"src{n}", cases=2, raters=2)
            target = src / "Training" / "case02" / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                _nii(target, content)
            with pytest.raises(InputError) as err:
                convert("qubiq", src, out)
            # a wrong-dimensional image: the message names the first mask and the image it does not match
            named = src / "Training" / "case02" / "task01_seg01.nii.gz" if "match" in problem else target
            assert problem in err.value.problem and err.value.path == str(named), (n, err.value)
            _assert_nothing_written(out)
    # an 8-bit 0/255 mask is a mask, not bad input: it converts, binarised
    src = _qubiq_tree(tmp_path / "src255", cases=2, raters=2)
    _nii(src / "Training" / "case02" / "task01_seg02.nii.gz", (np.eye(20, 24) * 255).astype(np.uint8))
    datalist = convert("qubiq", src, out)
    case02 = next(it for it in _all_items(datalist) if it["id"] == "case02")
    np.testing.assert_array_equal(_array(case02["label"][1])[..., 0], np.eye(20, 24, dtype=np.uint8))
