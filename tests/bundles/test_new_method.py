"""Adding a method is one network class, one small config folder and one test parametrisation: a method defined
here, in this file, runs through the shared machinery with no code copied (the recipe of docs/architecture.md,
"How to add a method"): trained two iterations in two stages (the second from the first's weights), evaluated,
sampling a volume, and trained under torchrun with the shared multi-GPU config.

``NoisyBoxSam``: SAM's box-prompted mask plus a learned amount of Gaussian noise on its logits, trained against one
rater with BCE + Dice. It is not a method anyone should use; it is small, stochastic and trainable, which is what
the platform must carry.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from ambisam.bundle import run_stages, write_bundle_configs
from ambisam.networks import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.registry import MethodSpec, method_registry, register_method
from bundle_checks import ROOT, check_inference_outputs, check_torchrun_with, run_workflow, small_dataset, train_overrides


# ---------------------------------------------------------------------------------------- 1. the network file
class NoisyBoxSam(MaskSamplingNetwork):
    """Box-prompted SAM whose samples are its logits plus ``sigma * eps`` (``sigma`` learned)."""

    capabilities = MethodCapabilities(training_target="rater")

    def __init__(self, backbone="litemedsam", checkpoint=None, initial_sigma: float = 2.0):
        super().__init__(backbone, checkpoint)
        self.log_sigma = nn.Parameter(torch.tensor(float(initial_sigma)).log())

    def _noisy(self, embeddings, conditions, num_samples):
        logits, _ = self.backbone.decode_boxes(embeddings, conditions.boxes)  # (B, 1, s, s)
        eps = conditions.standard_normal(logits.shape[0], num_samples, 1, device=logits.device, dtype=logits.dtype)
        return logits + self.log_sigma.exp() * eps[..., None]  # (B, N, s, s)

    def draw_samples(self, embeddings, conditions: Conditions, num_samples):
        return self._noisy(embeddings, conditions, num_samples)

    def compute_training_outputs(self, embeddings, conditions: Conditions, targets):
        return {"logits": self._noisy(embeddings, conditions, 1)}


# ------------------------------------------------------------------------------------ 2. the config folder
TRAIN = {
    "bundle_name": "noisy",
    "method": "noisy",
    "learning_rate": 0.0001,
    "max_epochs": 1,
    "batch_size": 2,
    "network_def": {"_target_": "test_new_method.NoisyBoxSam", "backbone": "@backbone"},
    "loss": {"_target_": "ambisam.losses.LatentSegmentationLoss", "beta": 0.0},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
    "hyper_parameters": {"learning_rate": "@learning_rate"},
}
INFERENCE = {"bundle_name": "noisy", "method": "noisy", "network_def": TRAIN["network_def"]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The bundle folder: the configs written as every bundle's are, a metadata file borrowed from psam's."""
    folder = tmp_path_factory.mktemp("bundles") / "noisy"
    write_bundle_configs(folder, TRAIN, INFERENCE)
    (folder / "configs" / "train_stage2.json").write_text(json.dumps({"model_file": "model_stage2.pt", "checkpoint_prefix": "stage2", "learning_rate": 0.0}))
    (folder / "configs" / "metadata.json").write_text((ROOT / "bundles/psam/configs/metadata.json").read_text())
    spec = register_method(MethodSpec("noisy", "noise on SAM's logits (a test method)", "test_new_method.NoisyBoxSam",
                                      bundle=str(folder), stages=(("train",), ("train", "train_stage2"))))
    yield folder, spec
    method_registry.pop("noisy")


# ------------------------------------------------------------------------------ 3. the test parametrisation
@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory):
    folder, spec = bundle
    tmp = tmp_path_factory.mktemp("noisy")
    datalist = small_dataset(tmp / "data")
    overrides = train_overrides(tmp, datalist.parent, **{"train#trainer#epoch_length": 2})
    workflows = run_stages(folder, spec.stages, **overrides)
    return tmp, datalist, workflows


def test_the_registry_reads_the_declarations(bundle):
    _, spec = bundle
    assert spec.trainable and spec.capabilities.needs_prompt and spec.capabilities.target_key == "rater_mask"


def test_two_stages_train_two_iterations_each_the_second_from_the_first(trained):
    tmp, _, (first, second) = trained
    for workflow in (first, second):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        assert trainer.state.iteration == 2 and type(trainer).__name__ == "MultiRaterTrainer"
    stage1 = torch.load(tmp / "models" / "model.pt", weights_only=True)
    stage2 = torch.load(tmp / "models" / "model_stage2.pt", weights_only=True)
    assert stage1["log_sigma"] != torch.tensor(2.0).log()  # stage 1 trained sigma
    # stage 2 (learning rate 0) started from stage 1's weights and kept them
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    assert (tmp / "models" / "stage2_checkpoint_epoch=1.pt").is_file()
    run = json.loads((tmp / "runs" / "run.json").read_text())
    assert run["method"] == "noisy" and run["init_weights"] == str(tmp / "models" / "model.pt")


def test_evaluate_and_sample_a_volume(bundle, trained):
    folder, _ = bundle
    tmp, datalist, _ = trained
    run_workflow(folder, ("train", "evaluate"), "train", **train_overrides(tmp, datalist.parent),
                 model_file="model_stage2.pt", eval_dir=str(tmp / "evaluate"))
    report = json.loads((tmp / "evaluate" / "metrics.json").read_text())
    assert report["method"] == "noisy" and 0 <= report["overall"]["ged4"] <= 2
    out = tmp / "inference"
    run_workflow(folder, ("inference",), "infer", dataset_dir=str(datalist.parent), output_dir=str(out),
                 ckpt_path=str(tmp / "models" / "model_stage2.pt"), num_samples=3)
    check_inference_outputs(out, datalist, "test", num_samples=3, probabilistic=True,
                            weights=(tmp / "models" / "model_stage2.pt",))


def test_multi_gpu_train_under_torchrun_gloo(bundle, tmp_path, monkeypatch):
    folder, _ = bundle
    # so torchrun's ranks import this file (and the same ambisam as this process, when PYTHONPATH names one)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "bundles"), os.environ.get("PYTHONPATH", "")]))
    check_torchrun_with(folder, tmp_path)
