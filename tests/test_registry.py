"""The one method registry as the tools read it: which methods can run, how the benchmark trains a method stage
by stage within one budget, and harness methods with their network, loss and overrides swapped in."""

from __future__ import annotations

import json

import pytest

from ambisam.benchmark import method_availability, method_kind, run_benchmark
from ambisam.registry import HARNESS_BUNDLE, MethodSpec, get_method, method_registry, register_method

#: a small Probabilistic U-Net (a harness method, no backbone to encode with) that the benchmark trains cheaply
_SMALL_PROB_UNET = {"image_size": 32, "features": (4, 4, 8, 8, 8, 4), "prior_channels": (4, 8), "fcomb_channels": 4}


@pytest.fixture
def registered():
    """Register specs for one test, and take them out again afterwards."""
    names = []

    def add(spec: MethodSpec) -> MethodSpec:
        names.append(spec.name)
        return register_method(spec)

    yield add
    for name in names:
        method_registry.pop(name, None)


def test_methods_without_a_network_class_or_a_bundle_are_unavailable(registered):
    classless = registered(MethodSpec("classless", "a bundle whose network is not written", "ambisam.networks.NoSuchNet",
                                      bundle="psam"))
    assert "not implemented yet" in method_availability(classless)
    for name in ("psam", "seqsam", "mcl", "p2sam", "proseg", "ursam", "baseline", "multimask", "jitter", "mc_dropout", "prob_unet"):
        assert method_availability(get_method(name)) is None, name


def test_a_method_whose_bundle_is_missing_is_unavailable(registered):
    spec = registered(MethodSpec("bundleless", "a network without its bundle", "ambisam.networks.BoxPromptedSam",
                                 bundle="no_such_bundle"))
    assert "does not exist yet" in method_availability(spec)
    partial = registered(MethodSpec("stageless", "a stage config the harness lacks", "ambisam.networks.BoxPromptedSam",
                                    stages=(("train", "train_nowhere"),)))
    assert "lacks configs/train_nowhere.json" in method_availability(partial)


def test_kinds_follow_the_spec():
    assert method_kind(get_method("psam")) == "bundle"
    assert method_kind(get_method("prob_unet")) == "trained" and get_method("prob_unet").config_bundle == HARNESS_BUNDLE
    assert method_kind(get_method("baseline")) == "training_free"


def test_unknown_method_is_one_input_error():
    from ambisam.errors import InputError

    with pytest.raises(InputError, match="unknown method 'nonsense'"):
        get_method("nonsense")


def test_benchmark_trains_stage_by_stage_within_one_budget(registered, tmp_path):
    """Two harness stages: each gets a budget record of its own, the second what the first left, and the job's
    training record adds them up."""
    from ambisam.data import synthesize

    registered(MethodSpec(
        "two_stage_unet", "a small Probabilistic U-Net trained in two stages", "ambisam.networks.ProbabilisticUNet",
        stages=(("train",), ("train",)), network_args=_SMALL_PROB_UNET,
        loss=get_method("prob_unet").loss,
        # nothing to encode (the nested ids: today's harness finalize logs the cache's stats); today's harness
        # config names no model_file: the weights stage 2 starts from are its model.pt
        overrides={"train#trainer#embedding_cache": None, "validate#inferer#cache": None, "model_file": "model.pt",
                   "val_interval": 1},
    ))
    datalist = synthesize(tmp_path / "data", cases=4, shape=(64, 64, 10), seed=3)
    (entry,) = run_benchmark(data=datalist, methods="two_stage_unet", samples=2, out=tmp_path / "out", budget=10,
                             max_epochs=1, figure_cases=0, isolate=False)
    assert entry["status"] == "ok", entry
    (training,) = entry["training"]
    first, second = training["stages"]
    assert [first["stage"], second["stage"]] == [1, 2] and first["configs"] == second["configs"] == ["train"]
    assert first["epochs"] == second["epochs"] == 1 and training["epochs"] == 2
    assert first["budget_seconds"] == pytest.approx(600.0)
    assert second["budget_seconds"] == pytest.approx(600.0 - first["seconds"])
    assert training["seconds"] == pytest.approx(first["seconds"] + second["seconds"])
    assert entry["parameters_trained"] > 0
    job_dir = tmp_path / "out" / "two_stage_unet" / "seed0"
    assert {p.name for p in (job_dir / "train").glob("budget_stage*.json")} == {"budget_stage1.json",
                                                                                "budget_stage2.json"}
    job = json.loads((job_dir / "job.json").read_text())
    assert job["method"] == "two_stage_unet"
