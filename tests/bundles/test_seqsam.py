"""The seqsam bundle against BUNDLE_CONTRACT.md: properties, training and resuming on generated data,
inference outputs (the M masks in step order), evaluation metrics, torchrun with gloo, every bad input, metadata;
and the MCL baseline's override (train_mcl.json) training one epoch."""

from __future__ import annotations

import json

import pytest
import torch

from bundle_checks import (
    check_bad_inputs,
    check_cli_bad_input,
    check_inference_outputs,
    check_inference_without_weights,
    check_properties,
    check_torchrun_with,
    check_training_refuses_bad_datalists,
    check_workflow_bad_inputs,
    run_workflow,
    small_dataset,
    train_overrides,
)

BUNDLE = "seqsam"
#: every SeqSAM step is a mask decoder call and a 3x3 convolution of 272 -> 512 channels on the 64 x 64 embedding, and
#: training back-propagates through all of them, so the generated data set has 2 raters and training decodes 2 steps
#: (M = max(K, num_train_steps) = 2), not 4
SMALL = {"num_raters": 2, "num_train_steps": 2}


def _overrides(tmp, dataset_dir, **extra) -> dict:
    return train_overrides(tmp, dataset_dir, **SMALL, **extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train seqsam for one epoch on a small generated data set (CPU)."""
    tmp = tmp_path_factory.mktemp("seqsam")
    datalist = small_dataset(tmp / "data", raters=SMALL["num_raters"])
    wf = run_workflow(BUNDLE, ("train",), "train", **_overrides(tmp, datalist.parent))
    return tmp, datalist, wf


def test_properties(trained):
    """As ``bundle_checks.check_properties``, with this data set's number of raters."""
    tmp, datalist, _ = trained
    check_properties(BUNDLE, tmp, datalist.parent, tmp / "models" / "model.pt", **SMALL)


def test_train_writes_weights_and_resumes(trained):
    tmp, datalist, wf = trained
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer).__name__ == "MultiRaterTrainer" and trainer.target_key == "label"  # SeqSAM declares the set
    assert trainer.state.epoch == 1
    first_iterations = trainer.state.iteration
    assert (tmp / "models" / "model.pt").is_file() and (tmp / "models" / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(tmp / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("recurrent.") for k in state)
    assert {"loss_dice", "loss_matched"} <= set(trainer.state.output[0] if isinstance(trainer.state.output, list)
                                                else trainer.state.output)
    run = json.loads((tmp / "runs" / "run.json").read_text())
    assert run["bundle"] == BUNDLE and run["method"] == "seqsam" and run["seed"] == 0 and "torch" in run["versions"]
    assert run["weight_decay"] == 0.01 and run["num_train_steps"] == SMALL["num_train_steps"]
    # a second run with more epochs continues from epoch 1 instead of starting over
    wf2 = run_workflow(BUNDLE, ("train",), "train", **_overrides(tmp, datalist.parent, max_epochs=2))
    trainer2 = wf2.parser.get_parsed_content("train#trainer")
    assert trainer2.state.epoch == 2 and trainer2.state.iteration == 2 * first_iterations
    assert (tmp / "models" / "checkpoint_epoch=2.pt").is_file()
    assert not (tmp / "models" / "checkpoint_epoch=1.pt").exists()


def test_inference_outputs(trained):
    tmp, datalist, _ = trained
    out = tmp / "inference"
    run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent),
                 ckpt_path=str(tmp / "models" / "model.pt"), output_dir=str(out), num_samples=3, box_jitter=2)
    check_inference_outputs(out, datalist, "test", num_samples=3, probabilistic=True,
                            weights=(tmp / "models" / "model.pt",))


def test_inference_without_weights_says_how_to_train(tmp_path):
    check_inference_without_weights(BUNDLE, tmp_path)


def test_evaluate_writes_metrics_json_and_csv(trained):
    tmp, datalist, _ = trained
    out = tmp / "evaluate"
    run_workflow(BUNDLE, ("train", "evaluate"), "train", **_overrides(tmp, datalist.parent), eval_dir=str(out))
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 4
    expected = {"ged4", "diversity4", "hm_iou4", "dice_max4", "dice_mean4", "soft_dice", "ncc", "ece", "ncc_undefined_raters", "soft_dice_prob", "ece_prob", "presence_gap"}
    assert expected <= set(report["overall"])
    assert 0 <= report["overall"]["ged4"] <= 2 and len(report["cases"]) == 1
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("case,ged4") and csv[-1].startswith("mean,") and len(csv) == 3


def test_mcl_override_trains_one_epoch(trained):
    """train_mcl.json: SAM's multimask heads, winner-takes-all, weights beside seqsam's under their own names."""
    tmp, datalist, _ = trained
    wf = run_workflow(BUNDLE, ("train", "train_mcl"), "train", **_overrides(tmp / "mcl", datalist.parent),
                      **{"embedding_cache#cache_dir": str(tmp / "runs" / "embeddings")})  # seqsam's cached slices
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer.network).__name__ == "MultipleChoiceSam"
    assert type(trainer.loss_function).__name__ == "WinnerTakesAllLoss"
    assert trainer.state.epoch == 1
    models = tmp / "mcl" / "models"
    assert (models / "model_mcl.pt").is_file() and (models / "mcl_checkpoint_epoch=1.pt").is_file()
    assert not (models / "model.pt").exists()
    state = torch.load(models / "model_mcl.pt", weights_only=True)
    assert not any(k.startswith("recurrent.") for k in state)
    assert json.loads((tmp / "mcl" / "runs" / "run.json").read_text())["method"] == "mcl"


def test_bad_inputs_stop_with_one_message_and_write_nothing(trained, tmp_path):
    tmp, datalist, _ = trained
    check_bad_inputs(BUNDLE, tmp_path, datalist.parent, tmp / "models" / "model.pt")


def test_bad_input_on_the_command_line_is_one_line(trained, tmp_path):
    tmp, _, _ = trained
    check_cli_bad_input(BUNDLE, tmp_path, tmp / "models" / "model.pt")


def test_training_refuses_a_datalist_not_json_or_with_an_empty_list(trained, tmp_path):
    check_training_refuses_bad_datalists(BUNDLE, tmp_path, trained[1], **SMALL)


def test_training_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    check_workflow_bad_inputs(BUNDLE, tmp_path, trained[1], **SMALL)


def test_evaluation_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    tmp, datalist, _ = trained
    check_workflow_bad_inputs(BUNDLE, tmp_path, datalist, "test", ("train", "evaluate"),
                              ckpt_path=str(tmp / "models" / "model.pt"), **SMALL)


def test_multi_gpu_train_under_torchrun_gloo(tmp_path):
    check_torchrun_with(BUNDLE, tmp_path, raters=SMALL["num_raters"], **SMALL)
