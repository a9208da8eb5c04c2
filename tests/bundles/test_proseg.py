"""The proseg bundle against BUNDLE_CONTRACT.md: properties, training and resuming on generated data with named
raters (the synthetic rater styles), the rater table saved with the weights, both inference modes (personalised:
one mask per rater, named), a rater asked for by name, evaluation with the personalised metrics beside the
distribution metrics, a datalist whose raters are not the trained ones, the ranked-by-area and anonymous modes'
wiring, torchrun with gloo, every bad input, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_checks import ContractChecks, check_inference_outputs, run_workflow, small_dataset, train_overrides, workflow

BUNDLE = "proseg"
STYLES = ["generous", "conservative", "misses_faint", "typical"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """proseg trained for one epoch on a small generated data set whose raters draw in consistent styles (CPU)."""
    tmp = tmp_path_factory.mktemp("proseg")
    datalist = small_dataset(tmp / "data", rater_styles=True)
    wf = run_workflow(BUNDLE, ("train",), "train", **train_overrides(tmp, datalist.parent))
    return tmp, datalist, wf


class TestContract(ContractChecks):
    """Properties, metadata, every bad input, the command line's one-line error, torchrun with gloo."""

    bundle = BUNDLE
    torchrun = {"synthetic": {"rater_styles": True}}


def test_train_writes_weights_with_the_rater_table_and_resumes(trained):
    tmp, datalist, wf = trained
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1
    first_iterations = trainer.state.iteration
    state = torch.load(tmp / "models" / "model.pt", weights_only=True)
    assert state["_extra_state"] == {"rater_names": STYLES, "rater_identity": "named"}
    assert state["rater_alphas"].shape == (4, 8) and any(k.startswith("statistic_heads.") for k in state)
    # the heads, the rater latents and classifier (the reference's second rate), SAM's decoder: each its own rate
    groups = wf.parser.get_parsed_content("optimizer").param_groups
    assert [g["initial_lr"] for g in groups] == [wf.parser.get_parsed_content(k) for k in
                                                 ("learning_rate", "rater_learning_rate", "backbone_learning_rate")]
    run = json.loads((tmp / "runs" / "run.json").read_text())
    assert run["bundle"] == BUNDLE and run["rater_names"] == STYLES and run["rater_order"] == "datalist"
    wf2 = run_workflow(BUNDLE, ("train",), "train", **train_overrides(tmp, datalist.parent, max_epochs=2))
    trainer2 = wf2.parser.get_parsed_content("train#trainer")
    assert trainer2.state.epoch == 2 and trainer2.state.iteration == 2 * first_iterations


def test_diverse_inference_outputs(trained):
    tmp, datalist, _ = trained
    out = tmp / "diverse"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent),
                 ckpt_path=str(tmp / "models" / "model.pt"), output_dir=str(out), num_samples=6)
    check_inference_outputs(out, datalist, "test", num_samples=6, probabilistic=False,
                            weights=(tmp / "models" / "model.pt",))
    assert not list(out.glob("*_rater-*.nii.gz"))  # the diverse mode names no rater


def test_personalised_inference_writes_one_mask_per_rater_named_and_a_rater_by_name(trained):
    tmp, datalist, _ = trained
    ckpt = str(tmp / "models" / "model.pt")
    out = tmp / "personalised"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), ckpt_path=ckpt,
                 output_dir=str(out), mode="personalised", seed=1)
    check_inference_outputs(out, datalist, "test", num_samples=4, probabilistic=False,
                            weights=(Path(ckpt),))
    case = json.loads(datalist.read_text())["test"][0]["id"]
    samples = np.asarray(nib.load(out / f"{case}_samples.nii.gz").dataobj)
    for r, name in enumerate(STYLES):  # one file per rater, named, the same mask as sample r
        assert np.array_equal(np.asarray(nib.load(out / f"{case}_rater-{name}.nii.gz").dataobj), samples[..., r])
    # deterministic: another seed gives the same masks
    again = tmp / "personalised_again"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), ckpt_path=ckpt,
                 output_dir=str(again), mode="personalised", seed=7)
    assert np.array_equal(np.asarray(nib.load(again / f"{case}_samples.nii.gz").dataobj), samples)
    # one rater by name: every sample is that rater's prediction
    one = tmp / "conservative"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), ckpt_path=ckpt,
                 output_dir=str(one), mode="personalised", rater="conservative", num_samples=3)
    chosen = np.asarray(nib.load(one / f"{case}_samples.nii.gz").dataobj)
    assert chosen.shape[-1] == 3 and all(np.array_equal(chosen[..., i], samples[..., 1]) for i in range(3))
    assert json.loads((one / f"{case}.json").read_text())["rater_id"] == 1


def test_an_unknown_rater_is_one_clear_error_and_nothing_is_written(trained):
    from ambisam.errors import find_input_error

    tmp, datalist, _ = trained
    out = tmp / "nobody"
    wf = workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent),
                  ckpt_path=str(tmp / "models" / "model.pt"), output_dir=str(out), rater="dr_x")
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    found = find_input_error(err.value)
    assert found is not None and "unknown rater 'dr_x'" in str(found) and "generous" in str(found)
    assert not out.exists()


def test_evaluate_scores_personalised_beside_distribution_metrics(trained):
    tmp, datalist, _ = trained
    out = tmp / "evaluate"
    run_workflow(BUNDLE, ("train", "evaluate"), "train", **train_overrides(tmp, datalist.parent), eval_dir=str(out))
    report = json.loads((out / "metrics.json").read_text())
    overall = report["overall"]
    assert {"ged4", "diversity4", "hm_iou4", "ncc", "presence_gap"} <= set(overall)
    for name in ("personalised_dice", "personalised_dice_hungarian", "personalised_dice_shuffled"):
        assert 0 <= overall[name] <= 1 and len(report["per_case"][name]) == 1
    assert overall["personalised_dice_hungarian"] >= overall["personalised_dice"] - 1e-9
    assert report["merged"][0]["mode"] == "personalised" and report["merged"][0]["rater_names"] == STYLES
    assert "personalised_dice" in (out / "metrics.csv").read_text().splitlines()[0]


def test_evaluation_refuses_a_datalist_whose_raters_are_not_the_trained_ones(trained, tmp_path):
    from ambisam.errors import find_input_error

    tmp, _, _ = trained
    other = small_dataset(tmp_path / "data")  # positional raters "0".."3"
    wf = workflow(BUNDLE, ("train", "evaluate"), "train", **train_overrides(tmp, other.parent),
                  eval_dir=str(tmp_path / "eval"))
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    found = find_input_error(err.value)
    assert found is not None and str(other) in str(found) and "rater ids would not match" in str(found)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("identity,order,raters", [("ranked_by_area", "area", 4), ("anonymous", "datalist", 1)])
def test_rater_identity_modes_reach_the_pipeline_and_the_network(trained, identity, order, raters):
    tmp, datalist, _ = trained
    wf = workflow(BUNDLE, ("train",), "train", **train_overrides(tmp / identity, datalist.parent),
                  rater_identity=identity)
    wf.initialize()
    network = wf.parser.get_parsed_content("network")
    assert network.rater_identity == identity and network.num_raters == raters
    assert wf.parser.get_parsed_content("rater_order") == order
    names = [type(t).__name__ for t in wf.parser.get_parsed_content("train#preprocessing").transforms]
    assert ("RankRatersByAread" in names) == (order == "area")
