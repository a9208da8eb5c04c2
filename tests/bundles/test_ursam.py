"""The ursam bundle against BUNDLE_CONTRACT.md on a small generated multi-organ CT set: properties, inference
outputs per organ and the multi-label volume, organ box files, the strategy table of evaluate.json, bad inputs.
UR-SAM is training-free for SAM: no weights file is loaded or needed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ambisam.errors import InputError, find_input_error
from bundle_checks import ROOT, check_bad_inputs, check_cli_bad_input, plain_workflow, run_workflow, torchrun

BUNDLE = "ursam"
ORGANS = ["liver", "spleen", "kidney_left"]  # FLARE22 order: the class map's, the outputs'


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    """Three 40 x 40 x 8 abdominal CTs with three labelled organs (one test case), and one inference run."""
    from ambisam.data import synthesize_organs

    tmp = tmp_path_factory.mktemp("ursam")
    datalist = synthesize_organs(tmp / "data", cases=3, seed=1, shape=(40, 40, 8), organs=ORGANS,
                                 split=(0.34, 0.33, 0.33))
    out = tmp / "inference"
    wf = run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), output_dir=str(out),
                      prompt="manual")
    return tmp, datalist, out, wf


def _test_item(datalist: Path) -> dict:
    (item,) = json.loads(datalist.read_text())["test"]
    return item


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_properties(organs):
    tmp, datalist, _, _ = organs
    wf = plain_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent),
                        output_dir=str(tmp / "props"))
    wf.initialize()
    assert not wf.check_properties()


def test_inference_writes_each_organs_maps_and_one_label_volume_in_the_input_geometry(organs):
    _, datalist, out, _ = organs
    item = _test_item(datalist)
    case = item["id"]
    src = nib.load(datalist.parent / item["image"])
    truth = _load(datalist.parent / item["label"][0])
    class_map = json.loads(datalist.read_text())["labels"]
    s = len(ORGANS)
    shapes = {"_mask": (*src.shape, s), "_mean": (*src.shape, s), "_uncertainty": (*src.shape, s),
              "_uncertain": (*src.shape, s), "_samples": (*src.shape, 3 * s), "_labels": src.shape}
    for suffix, shape in shapes.items():
        img = nib.load(out / f"{case}{suffix}.nii.gz")
        assert img.shape == shape, suffix
        assert np.allclose(img.affine, src.affine), suffix
    mask, mean = _load(out / f"{case}_mask.nii.gz"), _load(out / f"{case}_mean.nii.gz")
    unc, uncertain = _load(out / f"{case}_uncertainty.nii.gz"), _load(out / f"{case}_uncertain.nii.gz")
    samples, labels = _load(out / f"{case}_samples.nii.gz"), _load(out / f"{case}_labels.nii.gz")
    assert 0 <= mean.min() and mean.max() <= 1 and 0 <= unc.min() and unc.max() <= 1
    assert set(np.unique(mask)) <= {0, 1} and set(np.unique(uncertain)) <= {0, 1}
    per_organ = samples.reshape(*src.shape, s, 3)
    agree = (per_organ == per_organ[..., :1]).all(-1)
    assert np.all(unc[agree] == 0) and not agree.all()  # the augmented boxes disagree somewhere
    assert np.all(unc[uncertain > 0] > 0)  # M_unc = u > T_unc and T_unc >= min u >= 0
    assert set(np.unique(labels)) <= {0, *class_map.values()}
    for s, name in enumerate(ORGANS):
        organ = truth == class_map[name]
        found = mask[..., s] > 0
        # inside the organ's box (the simulated manual box moves a side by at most 20 * 40 / 1024 px) and its slices
        low, high = np.argwhere(organ).min(0), np.argwhere(organ).max(0)
        box = np.zeros_like(organ)
        box[max(low[0] - 2, 0) : high[0] + 3, max(low[1] - 2, 0) : high[1] + 3, low[2] : high[2] + 1] = True
        assert found.any() and not found[~box].any(), name
        assert np.all(labels[found] != 0)  # every organ voxel is labelled, by it or by a more probable organ
    liver = truth == class_map["liver"]
    dice = 2 * (mask[..., 0].astype(bool) & liver).sum() / (mask[..., 0].sum() + liver.sum())
    assert dice > 0.45, dice  # real LiteMedSAM on a 40 x 40 synthetic liver, a simulated manual box (0.57 measured)
    assert np.isin(labels[mask.any(-1)], list(class_map.values())).all()
    record = json.loads((out / f"{case}.json").read_text())
    assert record["num_structures"] == len(ORGANS) and record["num_samples"] == 3 and record["weights"] is None
    assert record["method_settings"]["prompt"] == "manual" and record["method_settings"]["organs"] == ORGANS
    assert all("model.pt" not in path for path in record["weights_sha256"])
    assert not list(out.glob(".*"))


def test_an_organ_box_file_in_world_coordinates_prompts_one_volume(organs):
    tmp, datalist, _, _ = organs
    item = _test_item(datalist)
    image = datalist.parent / item["image"]
    truth = _load(datalist.parent / item["label"][0])
    affine = nib.load(image).affine
    liver = np.argwhere(truth == json.loads(datalist.read_text())["labels"]["liver"])
    low, high = liver.min(0), liver.max(0)
    world = (affine @ np.c_[np.stack([low, high]), np.ones(2)].T)[:3].T.reshape(-1).tolist()
    box_file = tmp / "liver.json"
    box_file.write_text(json.dumps({"coordinates": "world", "boxes": {"liver": world}}))
    out = tmp / "boxfile"
    run_workflow(BUNDLE, ("inference",), "infer", image=str(image), box=str(box_file), prompt="box_file",
                 organs=["liver"], output_dir=str(out))
    case = item["id"]
    mask = _load(out / f"{case}_mask.nii.gz")
    assert mask.shape == truth.shape  # one organ: written 3D
    inside = np.zeros_like(mask, dtype=bool)
    inside[low[0] : high[0] + 1, low[1] : high[1] + 1, low[2] : high[2] + 1] = True
    assert mask.any() and not mask[~inside].any()  # every voxel found lies in the box


def test_auto_prompting_finds_each_organs_box_with_a_trained_localiser(organs):
    """The wiring of prompt 'auto' (the localiser's accuracy is tests/test_localiser.py's): an untrained localiser's
    weights, the supports from the datalist's training list; every organ gets a box inside the image, its mask stays
    in it, and the run records the localiser's checksum."""
    import torch

    from ambisam.networks.localiser import RelativePositionLocaliser
    from ambisam.weights import file_sha256

    from ambisam.data import synthesize_organs

    tmp, _, _, _ = organs
    # the localiser reads 3 mm patches of at least 48 mm: 32 x 32 x 10 voxels of 1.6 x 1.6 x 5 mm
    datalist = synthesize_organs(tmp / "auto_data", cases=3, seed=2, shape=(32, 32, 10), organs=["liver"],
                                 split=(0.34, 0.33, 0.33))
    torch.manual_seed(0)
    weights = tmp / "localiser.pt"
    torch.save(RelativePositionLocaliser().state_dict(), weights)
    out = tmp / "auto"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), output_dir=str(out),
                 localiser_path=str(weights), organs=["liver"])
    case = _test_item(datalist)["id"]
    record = json.loads((out / f"{case}.json").read_text())
    settings = record["method_settings"]
    assert settings["prompt"] == "auto" and settings["localiser_sha256"] == file_sha256(weights)
    assert _load(out / f"{case}_mask.nii.gz").shape == _load(datalist.parent / _test_item(datalist)["image"]).shape


def test_evaluate_writes_the_strategy_table(organs):
    tmp, datalist, _, _ = organs
    eval_dir = tmp / "evaluate"
    run_workflow(BUNDLE, ("inference", "evaluate"), "eval", dataset_dir=str(datalist.parent), eval_dir=str(eval_dir),
                 prompt="manual")
    result = json.loads((eval_dir / "strategies.json").read_text())
    assert result["structures"] == ORGANS and result["cases"] == 1 and result["num_augmented_boxes"] == 3
    assert list(result["dice"]) == ["prompt", "ensemble", "unc_fpc", "unc_fnc", "unc_fpnc", "ursam"]
    for row, values in result["dice"].items():
        assert list(values) == [*ORGANS, "mean"]
        assert all(0.0 <= v <= 1.0 for v in values.values()), row
        assert values["mean"] == pytest.approx(np.mean([values[o] for o in ORGANS]))
    assert result["dice"]["prompt"]["mean"] > 0.3  # SAM with a perturbed box on 40 x 40 slices: well above empty
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["uncertainty_auroc"].values())
    table = (eval_dir / "strategies.md").read_text()
    assert "| UR-SAM |" in table and "| Unc-FPNC |" in table and "AUROC" in table
    assert (eval_dir / "strategies.csv").read_text().splitlines()[0] == "strategy," + ",".join(ORGANS) + ",mean"


@pytest.mark.parametrize("override, expected", [
    ({"organs": ["liver", "appendix"], "prompt": "manual"}, "unknown structure(s) ['appendix']"),
    ({"prompt": "auto", "localiser_path": "/nonexistent/localiser.pt"}, "needs a trained localiser"),
])
def test_bad_inputs_are_one_message_and_write_nothing(organs, override, expected):
    tmp, datalist, _, _ = organs
    out = tmp / f"bad_{next(iter(override))}"
    with pytest.raises(Exception) as error:
        run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), output_dir=str(out),
                     **override)
    found = find_input_error(error.value)
    assert isinstance(found, InputError) and expected in str(found), error.value
    assert not out.exists() or not any(out.iterdir())


#: the cases of the contract's corpus (bundle_checks.bad_inputs) that apply to an organ label map with manual prompts:
#: not "label not 0/1" (a label map holds the organs' values), "fewer raters than declared" (one map per case) or
#: the lesion box files (an organ box file is another format: tests/test_ursam_prompts.py covers its bad cases)
CORPUS = ["missing file", "unreadable image", "wrong dimensionality", "NaN intensities", "truncated NIfTI",
          "corrupt NIfTI", "Inf intensities", "rater mask of another affine", "rater mask of another shape",
          "volume of one voxel", "non-UTF-8 path", "no prompt"]


def test_the_bad_input_corpus_is_one_message_naming_the_file_and_writes_nothing(organs):
    tmp, datalist, _, _ = organs
    (tmp / "corpus").mkdir(exist_ok=True)
    check_bad_inputs(BUNDLE, tmp / "corpus", datalist.parent, None, cases=CORPUS, prompt="manual",
                     messages={"no prompt": "prompt 'manual' simulates boxes from the label"})


def test_bad_input_on_the_command_line_is_one_line(organs):
    check_cli_bad_input(BUNDLE, organs[0] / "cli", organs[0] / "no_weights_needed.pt")


def test_the_localiser_trains_under_torchrun_gloo(organs):
    """multi_gpu_train.json: the localiser's training with DDP on two CPU ranks (gloo), one epoch; rank 0 writes
    the run record and weights that load into the plain network (no DDP prefix)."""
    from ambisam.data import synthesize_organs
    from ambisam.networks.localiser import RelativePositionLocaliser
    from ambisam.weights import load_weights

    tmp = organs[0] / "torchrun"
    data = synthesize_organs(tmp / "data", cases=4, seed=3, shape=(32, 32, 10), organs=["liver"],
                             split=(0.5, 0.5, 0.0)).parent
    torchrun(BUNDLE, ("train", "multi_gpu_train"), {"dataset_dir": data, "ckpt_dir": tmp / "models",
                                                     "output_dir": tmp / "runs", "max_epochs": 1, "val_interval": 1})
    assert json.loads((tmp / "runs" / "run.json").read_text())["world_size"] == 2
    assert (tmp / "models" / "localiser_checkpoint_epoch=1.pt").is_file()
    RelativePositionLocaliser().load_state_dict(load_weights(tmp / "models" / "localiser.pt"))


def test_multi_gpu_evaluate_under_torchrun_gloo_gives_the_table_of_one_process(organs):
    """multi_gpu_evaluate.json: 3 test cases shared unevenly over 2 CPU ranks (gloo); rank 0 writes the table of
    every case, equal to one process's (each case seeded from the run's seed and its id)."""
    from ambisam.data import synthesize_organs

    tmp = organs[0] / "torchrun_evaluate"
    data = synthesize_organs(tmp / "data", cases=3, seed=4, shape=(32, 32, 8), organs=["kidney_left"],
                             split=(0.0, 0.0, 1.0)).parent
    settings = {"dataset_dir": str(data), "prompt": "manual", "num_boxes": 1}
    run_workflow(BUNDLE, ("inference", "evaluate"), "eval", **settings, eval_dir=str(tmp / "one"))
    torchrun(BUNDLE, ("inference", "evaluate", "multi_gpu_evaluate"), dict(settings, eval_dir=tmp / "two"))
    one, two = (json.loads((tmp / name / "strategies.json").read_text()) for name in ("one", "two"))
    assert one["cases"] == two["cases"] == 3 and one["case_ids"] == two["case_ids"]
    assert list(two["dice"]) == list(one["dice"]) and one["dice"]["prompt"]["mean"] > 0
    for row, values in one["dice"].items():
        assert two["dice"][row] == pytest.approx(values, rel=1e-5, abs=1e-6), row
    for organ, auroc in one["uncertainty_auroc"].items():
        assert (auroc is None and two["uncertainty_auroc"][organ] is None) or auroc == pytest.approx(
            two["uncertainty_auroc"][organ], rel=1e-5), organ


def test_metadata_names_the_organ_outputs():
    meta = json.loads((ROOT / "bundles" / BUNDLE / "configs" / "metadata.json").read_text())
    outputs = meta["network_data_format"]["post_processed_outputs"]
    assert {"pred", "uncertainty", "samples", "mean", "uncertain", "labels"} <= set(outputs)
