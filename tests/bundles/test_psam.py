"""The psam bundle against BUNDLE_CONTRACT.md: properties, training and resuming on generated data,
inference outputs, evaluation metrics, torchrun with gloo, every bad input, metadata."""

from __future__ import annotations

import json

import pytest
import torch

from bundle_checks import (
    check_bad_inputs,
    check_cli_bad_input,
    check_inference_outputs,
    check_properties,
    check_torchrun,
    run_workflow,
    small_dataset,
    train_overrides,
)

BUNDLE = "psam"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train psam for one epoch on a small generated data set (CPU)."""
    tmp = tmp_path_factory.mktemp("psam")
    datalist = small_dataset(tmp / "data")
    wf = run_workflow(BUNDLE, ("train",), "train", **train_overrides(tmp, datalist.parent))
    return tmp, datalist, wf


def test_properties(trained):
    tmp, datalist, _ = trained
    check_properties(BUNDLE, tmp, datalist.parent, tmp / "models" / "model.pt")


def test_train_writes_weights_and_resumes(trained):
    tmp, datalist, wf = trained
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1
    first_iterations = trainer.state.iteration
    assert (tmp / "models" / "model.pt").is_file() and (tmp / "models" / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(tmp / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("prior_net.") for k in state)
    run = json.loads((tmp / "runs" / "run.json").read_text())
    assert run["bundle"] == BUNDLE and run["seed"] == 0 and "torch" in run["versions"]
    # trained on the prompts it is scored with: the raters' union box (the target one random rater's mask)
    assert run["train_prompt"] == run["prompt"] == "union" and run["prompt_jitter"] == 0
    preprocessing = wf.parser.get_parsed_content("train#preprocessing")
    assert any(getattr(t, "prompt", None) == "union" for t in preprocessing.transforms)
    assert run["patience"] == 5 and run["budget_minutes"] is None
    # the base's early stopping ran at the validation (trainer set); the base's TrainingBudget recorded it
    training = json.loads((tmp / "runs" / "training.json").read_text())
    assert training["budget_seconds"] is None and not training["stopped_early"] and not training["stopped_by_budget"]
    (point,) = training["validation_curve"]
    assert point["epoch"] == 1 and point["seconds"] > 0 and 0.0 <= point["val_ged"] <= 2.0
    # a second run with more epochs continues from epoch 1 instead of starting over
    wf2 = run_workflow(BUNDLE, ("train",), "train", **train_overrides(tmp, datalist.parent, max_epochs=2))
    trainer2 = wf2.parser.get_parsed_content("train#trainer")
    assert trainer2.state.epoch == 2 and trainer2.state.iteration == 2 * first_iterations
    assert (tmp / "models" / "checkpoint_epoch=2.pt").is_file()
    assert not (tmp / "models" / "checkpoint_epoch=1.pt").exists()


def test_inference_outputs(trained):
    tmp, datalist, _ = trained
    out = tmp / "inference"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), ckpt_path=str(tmp / "models" / "model.pt"),
                 output_dir=str(out), num_samples=6, box_jitter=2)
    check_inference_outputs(out, datalist, "test", num_samples=6, probabilistic=True)


def test_inference_without_weights_says_how_to_train(tmp_path):
    from ambisam.errors import find_input_error
    from bundle_checks import workflow

    wf = workflow(BUNDLE, ("inference",), "infer", ckpt_path=str(tmp_path / "none.pt"), output_dir=str(tmp_path / "o"))
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    found = find_input_error(err.value)
    assert found is not None and "no trained weights; train them first: python -m monai.bundle run" in str(found)
    assert not (tmp_path / "o").exists()


def test_evaluate_writes_metrics_json_and_csv(trained):
    tmp, datalist, _ = trained
    out = tmp / "evaluate"
    run_workflow(BUNDLE, ("train", "evaluate"), "train", **train_overrides(tmp, datalist.parent), eval_dir=str(out))
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 4
    assert {"ged4", "diversity4", "hm_iou4", "dice_max4", "dice_mean4", "soft_dice", "ncc", "ece", "ncc_undefined_raters", "soft_dice_prob", "ece_prob", "presence_gap"} <= set(report["overall"])
    assert 0 <= report["overall"]["ged4"] <= 2 and len(report["cases"]) == 1
    assert len(report["per_case"]["ged4"]) == 1
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("case,ged4") and csv[-1].startswith("mean,") and len(csv) == 3


def test_bad_inputs_stop_with_one_message_and_write_nothing(trained, tmp_path):
    tmp, datalist, _ = trained
    check_bad_inputs(BUNDLE, tmp_path, datalist.parent, tmp / "models" / "model.pt")


def test_bad_input_on_the_command_line_is_one_line(trained, tmp_path):
    tmp, _, _ = trained
    check_cli_bad_input(BUNDLE, tmp_path, tmp / "models" / "model.pt")


def test_multi_gpu_train_under_torchrun_gloo(tmp_path):
    check_torchrun(BUNDLE, tmp_path)
