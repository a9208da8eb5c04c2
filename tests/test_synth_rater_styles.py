"""`synth --rater-styles`: raters who draw the same way on every case (for personalised methods), and the default
synthetic data set unchanged by the option."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest

from ambisam.cli import Commands
from ambisam.data import SPLITS, datalist_raters, ensure_dataset, load_datalist, synth_case, synthesize
from ambisam.data.synth import FAINT_HU, RATER_STYLES
from ambisam.errors import InputError

SHAPE = (48, 48, 12)
GENEROUS, CONSERVATIVE, MISSES_FAINT, TYPICAL = range(4)

# sha256 of what the code before rater_styles existed wrote (commit 0e9e839), recomputed by _digests below:
# the arrays and lesion records of synth_case (seed 0, cases 0-5, shape (40, 40, 12), K = 4), and the NIfTI arrays
# plus datalist.json bytes of synthesize(cases=3, raters=3, shape=(40, 40, 12)).
ARRAYS_DIGEST = "8515cde11087a098a86fd7edbad714bf03a6b0fc5c8dce3f6a1f6f4031dd779e"
FILES_DIGEST = "862adba30fcf087887a9c2ef061700f3401581125f539f0c702e8fa5a69df9fd"


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("styled"), cases=12, raters=4, seed=0, shape=SHAPE, rater_styles=True)


def _cases(datalist: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (image, masks (K, H, W, D))}`` of every case of the datalist."""
    out = {}
    for split in SPLITS:
        for item in load_datalist(datalist, split):
            masks = np.stack([np.asarray(nib.load(p).dataobj) for p in item["label"]])
            out[item["id"]] = (np.asarray(nib.load(item["image"]).dataobj), masks)
    return out


def test_generous_typical_conservative_keep_their_order_on_every_case(styled):
    compared = 0
    for case, (_, masks) in _cases(styled).items():
        area = masks.reshape(4, -1).sum(1)
        if area[[GENEROUS, TYPICAL, CONSERVATIVE]].all():  # all three marked the lesion
            compared += 1
            assert area[GENEROUS] > area[TYPICAL] > area[CONSERVATIVE], (case, area)
    assert compared >= 8


def test_misses_faint_is_empty_on_faint_lesions_and_only_there_more_often(styled):
    record = json.loads((styled.parent / "synth.json").read_text())
    faint = set(record["faint_cases"])
    assert faint == {c for c, info in record["lesions"].items() if info["faint"]} and 0 < len(faint) < 12
    empty_elsewhere = np.zeros(4, int)
    for case, (image, masks) in _cases(styled).items():
        empty = ~masks.reshape(4, -1).any(1)
        if case in faint:
            assert empty[MISSES_FAINT] and not empty.all(), case
            assert MISSES_FAINT in record["lesions"][case]["missed_by"]
            core = masks[CONSERVATIVE] > 0 if masks[CONSERVATIVE].any() else masks.any(0)
            assert abs(image[core].mean() - FAINT_HU) < 100  # faint, yet well above the parenchyma
            assert image[core].mean() - image[~masks.any(0)].mean() > 100
        else:
            empty_elsewhere += empty
    assert empty_elsewhere[MISSES_FAINT] <= empty_elsewhere.max()  # elsewhere the same small-lesion misses


def test_the_datalist_and_the_record_name_the_styles(styled):
    assert datalist_raters(styled) == RATER_STYLES == ("generous", "conservative", "misses_faint", "typical")
    record = json.loads((styled.parent / "synth.json").read_text())
    assert record["rater_styles"] == list(RATER_STYLES) and record["style_offsets_mm"] == [1.25, -1.25, 0.0, 0.0]
    assert record["faint_hu"] == FAINT_HU and 0 < record["faint_share"] < 1


def _digests(folder: Path) -> tuple[str, str]:
    arrays = hashlib.sha256()
    for n in range(6):
        image, masks, info = synth_case(np.random.default_rng([0, n]), (40, 40, 12), 4)
        arrays.update(image.tobytes())
        arrays.update(masks.tobytes())
        arrays.update(repr(sorted(info.items())).encode())
    synthesize(folder, cases=3, raters=3, shape=(40, 40, 12))
    files = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix != ".json":
            files.update(path.name.encode())
            files.update(np.asarray(nib.load(path).dataobj).tobytes())
    files.update((folder / "datalist.json").read_bytes())
    return arrays.hexdigest(), files.hexdigest()


def test_without_styles_the_data_set_is_the_one_of_before(tmp_path):
    assert _digests(tmp_path / "plain") == (ARRAYS_DIGEST, FILES_DIGEST)
    record = json.loads((tmp_path / "plain" / "synth.json").read_text())
    assert not {k for k in record if "style" in k or "faint" in k}
    assert "raters" not in json.loads((tmp_path / "plain" / "datalist.json").read_text())


def test_styles_need_four_raters_and_ensure_dataset_passes_them(tmp_path):
    with pytest.raises(InputError, match="rater_styles needs raters=4"):
        synthesize(tmp_path / "three", cases=1, raters=3, shape=SHAPE, rater_styles=True)
    assert not (tmp_path / "three").exists()
    with pytest.raises(InputError, match="rater_styles needs raters=4"):
        synth_case(np.random.default_rng(0), SHAPE, 2, rater_styles=True)
    styled = ensure_dataset(tmp_path / "styled", cases=1, shape=SHAPE, rater_styles=True)
    assert datalist_raters(styled) == RATER_STYLES
    assert ensure_dataset(tmp_path / "styled", rater_styles=True) == styled  # used as it is
    plain = ensure_dataset(tmp_path / "plain", cases=1, shape=SHAPE)
    assert datalist_raters(plain) == ("0", "1", "2", "3")
    assert ensure_dataset(tmp_path / "plain", rater_styles=True) == plain  # a data set is used as it is
    assert datalist_raters(plain) == ("0", "1", "2", "3")


@pytest.mark.parametrize("flag", ["--rater-styles", "--rater_styles"])
def test_cli_flag(tmp_path, flag, capsys):
    out = tmp_path / "cli"
    fire.Fire(Commands(), command=["synth", str(out), "--cases", "1", flag], name="ambisam")
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    assert datalist_raters(out / "datalist.json") == RATER_STYLES
