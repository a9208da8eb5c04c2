"""The p2sam bundle against BUNDLE_CONTRACT.md: properties, both training stages on generated data (stage 2 from
stage 1's weights, its cached embeddings the merged encoder's), resuming, inference outputs in a region of interest,
evaluation with the paper's metric conventions beside ours, torchrun with gloo for both stages, every bad input,
metadata.

Stage 1 trains the image encoder (LoRA), so each of its steps runs the encoder forward and backward: the generated
data set is 2 training volumes, and stage 1 trains one epoch once for the module."""

from __future__ import annotations

import shutil

import json
from pathlib import Path

import pytest
import torch

from ambisam.weights import file_sha256
from bundle_checks import (
    check_bad_inputs,
    check_cli_bad_input,
    check_inference_outputs,
    check_inference_without_weights,
    check_init_weights_that_need_pickle_are_refused,
    check_properties,
    check_torchrun_with,
    check_training_refuses_bad_datalists,
    check_workflow_bad_inputs,
    run_workflow,
    small_dataset,
    train_overrides,
    workflow,
)

BUNDLE = "p2sam"
STAGE1 = ("train",)
STAGE2 = ("train", "train_stage2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both stages, one epoch each, on a small generated data set (CPU), stage 2 from stage 1's weights."""
    tmp = tmp_path_factory.mktemp("p2sam")
    datalist = small_dataset(tmp / "data")
    # one epoch (one step) at the default learning rates leaves the default-prompt masks just below the threshold;
    # larger rates give a model whose masks (and prompt draws) show on the generated data
    stage1 = run_workflow(BUNDLE, STAGE1, "train", **train_overrides(tmp, datalist.parent), learning_rate=0.01)
    stage1_state = {k: v.clone() for k, v in torch.load(tmp / "models" / "model_stage1.pt", weights_only=True).items()}
    stage1_run = json.loads((tmp / "runs" / "run.json").read_text())
    stage2 = run_workflow(BUNDLE, STAGE2, "train", **train_overrides(tmp, datalist.parent), learning_rate=0.001)
    return {"tmp": tmp, "datalist": datalist, "stage1": stage1, "stage2": stage2, "stage1_state": stage1_state,
            "stage1_run": stage1_run}


def test_properties(trained):
    tmp = trained["tmp"]
    # stage 2 starts from stage 1's weights in its ckpt_dir (its run record hashes them): give the props run a copy
    (tmp / "props" / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp / "models" / "model_stage1.pt", tmp / "props" / "models" / "model_stage1.pt")
    check_properties(BUNDLE, tmp, trained["datalist"].parent, tmp / "models" / "model.pt", stages=(STAGE1, STAGE2))


def test_stage1_adapts_sam_on_non_empty_raters(trained):
    tmp = trained["tmp"]
    trainer = trained["stage1"].parser.get_parsed_content("train#trainer")
    net = trainer.network
    assert net.stage == 1 and net.capabilities.encoder == "trainable" and trainer.state.epoch == 1
    state = trained["stage1_state"]
    assert any(".lora_A_q." in k for k in state) and "assembling_weights.free_weights" in state
    assert state["assembling_weights.free_weights"].shape == (7,)
    assert (tmp / "models" / "stage1_checkpoint_epoch=1.pt").is_file()
    # lesion-centred 128 x 128 crops, one random non-empty rater, all-empty slices skipped
    parser = trained["stage1"].parser
    crops = [t for t in parser.get_parsed_content("train#preprocessing").transforms if type(t).__name__ == "LesionCropd"]
    assert len(crops) == 1 and crops[0].spatial_size == 128
    assert parser.get_parsed_content("train_rater") == "random_nonempty"
    assert parser.get_parsed_content("empty_share") == 0.0
    batch = next(iter(trainer.data_loader))
    assert (batch["rater_mask"].flatten(1).amax(1) > 0).all()  # every target is a non-empty rater's mask
    run = trained["stage1_run"]
    assert run["stage"] == 1 and run["roi_size"] == 128 and run["train_rater"] == "random_nonempty"


def test_stage2_starts_from_stage1_and_caches_the_merged_encoder(trained, litemedsam):
    import copy

    from ambisam.networks import P2Sam
    from ambisam.sam import EmbeddingCache

    tmp = trained["tmp"]
    trainer = trained["stage2"].parser.get_parsed_content("train#trainer")
    net = trainer.network
    assert net.stage == 2 and net.capabilities.encoder == "frozen" and net.capabilities.stochastic
    # every stage-1 weight arrived (frozen since): stage 2 equals a stage-2 network loaded from model_stage1.pt
    reference = P2Sam(copy.deepcopy(litemedsam), stage=2)
    result = reference.load_state_dict(trained["stage1_state"], strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("prompt_generator.", "dense_prompt_mapping.")) for k in result.missing_keys)
    final = torch.load(tmp / "models" / "model.pt", weights_only=True)
    for key, value in reference.state_dict().items():
        if not key.startswith(("prompt_generator.", "dense_prompt_mapping.")):
            assert torch.equal(final[key], value), key
    assert any(not torch.equal(final[k], v) for k, v in reference.state_dict().items()
               if k.startswith("prompt_generator."))  # stage 2 trained its own part
    # the embeddings stage 2 cached on disk are the merged encoder's
    batch = next(iter(trainer.data_loader))
    images = batch["image"][:2]
    cache = EmbeddingCache(net.backbone, cache_dir=tmp / "runs" / "embeddings")
    served = cache(images)
    assert cache.hits == 2 and cache.misses == 0
    with torch.no_grad():
        direct = net.backbone.encode(images)
        pretrained = litemedsam.encode(images)
    torch.testing.assert_close(served, direct)
    assert json.loads((tmp / "runs" / "run.json").read_text())["stage"] == 2
    assert not torch.allclose(served, pretrained, atol=1e-4)  # not the unadapted encoder's


def test_eval_forward_returns_one_tensor(trained):
    net = trained["stage2"].parser.get_parsed_content("network").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 128, 128))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 128, 128)


@pytest.fixture(scope="module")
def resumed(trained):
    """Stage 2 run again with max_epochs 2: it continues from its epoch-1 checkpoint."""
    tmp, datalist = trained["tmp"], trained["datalist"]
    return run_workflow(BUNDLE, STAGE2, "train", **train_overrides(tmp, datalist.parent, max_epochs=2,
                                                                    learning_rate=0.001))


def test_stage2_resumes(trained, resumed):
    tmp = trained["tmp"]
    first = trained["stage2"].parser.get_parsed_content("train#trainer").state.iteration
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * first
    assert (tmp / "models" / "stage2_checkpoint_epoch=2.pt").is_file()
    assert (tmp / "models" / "stage1_checkpoint_epoch=1.pt").is_file()  # stage 1's own checkpoint untouched


def test_inference_outputs(trained):
    """The files of the contract. One epoch of a prompt-free SAM leave every logit below 0 on this data (LiteMedSAM
    segments nothing without a box until stage 1 has trained for a while), so the binary samples are empty and the
    prompt draws are checked where they show: in each sample's probability map, inside the region of interest."""
    from ambisam.inferers import split_sampling_output

    tmp, datalist = trained["tmp"], trained["datalist"]
    out = tmp / "inference"
    wf = run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent),
                      ckpt_path=str(tmp / "models" / "model.pt"), output_dir=str(out), num_samples=3)
    check_inference_outputs(out, datalist, "test", num_samples=3, probabilistic=False,
                            weights=(tmp / "models" / "model.pt",))
    item = json.loads(datalist.read_text())["test"][0]
    assert json.loads((out / f"{item['id']}.json").read_text())["roi_size"] == 128
    # the bundle's network and inferer, each sample's probabilities kept: the draws differ inside the window
    inferer = wf.parser.get_parsed_content("inferer")
    inferer.keep_probabilities = True
    inferer.region_output = False  # the whole volume (the bundle's inferer gives the prompted slab), to index slices
    case = wf.parser.get_parsed_content("dataset")[0]
    with torch.no_grad():
        maps = split_sampling_output(inferer(case["image"][None], wf.parser.get_parsed_content("network"),
                                             box=case["box"][None])[0], probabilities=True)
    probs = maps["probabilities"]  # (N, H, W, D)
    prompted = (case["box"][:, 0] >= 0).nonzero().flatten()
    assert len(prompted) and (probs[..., prompted] > 0).any()
    assert (probs[..., prompted].std(dim=0) > 1e-4).any(), "the prompt draws do not change the masks"
    unprompted = (case["box"][:, 0] < 0).nonzero().flatten()
    assert (probs[..., unprompted] == 0).all()


def test_inference_with_a_snapshot_ensemble(trained, resumed):
    """The reference code's snapshot ensemble: N split between stage-2 checkpoints, one image embedding."""
    tmp, datalist = trained["tmp"], trained["datalist"]
    out = tmp / "inference_snapshots"
    snapshots = [str(tmp / "models" / "model.pt"), str(tmp / "models" / "stage2_checkpoint_epoch=2.pt")]
    wf = run_workflow(BUNDLE, ("inference",), "infer", dataset_dir=str(datalist.parent), snapshots=snapshots,
                      ckpt_path=str(tmp / "models" / "absent.pt"), output_dir=str(out), num_samples=4)
    network = wf.parser.get_parsed_content("network")
    assert type(network).__name__ == "SnapshotEnsemble" and network.samples_per_member(4) == [2, 2]
    check_inference_outputs(out, datalist, "test", num_samples=4, probabilistic=False,
                            weights=tuple(Path(p) for p in snapshots))
    item = json.loads(datalist.read_text())["test"][0]
    record = json.loads((out / f"{item['id']}.json").read_text())
    assert record["snapshots"] == snapshots
    # every snapshot's sha256 (the absent ckpt_path is not read), then the backbone's shipped weights
    recorded = list(record["weights_sha256"].items())
    assert recorded[:2] == [(str(Path(p).resolve()), file_sha256(p)) for p in snapshots] and len(recorded) == 3


def test_evaluate_reports_the_papers_conventions_beside_ours(trained):
    tmp, datalist = trained["tmp"], trained["datalist"]
    out = tmp / "evaluate"
    run_workflow(BUNDLE, (*STAGE2, "evaluate"), "train", **train_overrides(tmp, datalist.parent), eval_dir=str(out))
    report = json.loads((out / "metrics.json").read_text())
    overall = report["overall"]
    assert {"ged4", "hm_iou4", "dice_max4", "hm_iou_untiled4", "dice_max_pairs4"} <= set(overall)
    # the paper's conventions are the more lenient ones
    assert overall["hm_iou_untiled4"] >= overall["hm_iou4"] - 1e-9
    assert overall["dice_max_pairs4"] >= overall["dice_max4"] - 1e-9


def test_bad_inputs_stop_with_one_message_and_write_nothing(trained, tmp_path):
    check_bad_inputs(BUNDLE, tmp_path, trained["datalist"].parent, trained["tmp"] / "models" / "model.pt")


def test_bad_input_on_the_command_line_is_one_line(trained, tmp_path):
    check_cli_bad_input(BUNDLE, tmp_path, trained["tmp"] / "models" / "model.pt")


def test_inference_without_weights_says_how_to_train(tmp_path):
    # both stages, in order: monai.bundle run of train.json alone would train stage 1 only
    check_inference_without_weights(BUNDLE, tmp_path, "python -m ambisam train p2sam (its 2 training stages in order)")


def test_stage2_refuses_init_weights_that_need_pickle(tmp_path):
    check_init_weights_that_need_pickle_are_refused(BUNDLE, tmp_path, STAGE2)


def test_training_refuses_a_datalist_not_json_or_with_an_empty_list(trained, tmp_path):
    check_training_refuses_bad_datalists(BUNDLE, tmp_path, trained["datalist"])


def test_training_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    check_workflow_bad_inputs(BUNDLE, tmp_path, trained["datalist"])


def test_evaluation_refuses_bad_inputs_before_writing_anything(trained, tmp_path):
    check_workflow_bad_inputs(BUNDLE, tmp_path, trained["datalist"], "test", (*STAGE2, "evaluate"),
                              ckpt_path=str(trained["tmp"] / "models" / "model.pt"))


def test_multi_gpu_train_both_stages_under_torchrun_gloo(tmp_path):
    check_torchrun_with(BUNDLE, tmp_path, written=("model_stage1.pt", "stage1_checkpoint_epoch=1.pt"))
    # stage 2 starts from the weights stage 1 just wrote (its default init_weights)
    check_torchrun_with(BUNDLE, tmp_path, config=STAGE2, written=("model.pt", "stage2_checkpoint_epoch=1.pt"))


def test_limited_data_is_chosen_by_patient(trained):
    """``train_limit``: the paper's 500-slice setting, as a count or a fraction of the training cases."""
    tmp, datalist = trained["tmp"], trained["datalist"]
    everything = json.loads(datalist.read_text())["training"]
    for limit, expected in ((1, 1), (0.5, 1), (None, len(everything))):
        wf = workflow(BUNDLE, STAGE1, "train", **train_overrides(tmp / "limit", datalist.parent), train_limit=limit)
        data = wf.parser.get_parsed_content("train#dataset#data")
        assert len(data) == expected and {d["id"] for d in data} <= {d["id"] for d in everything}
