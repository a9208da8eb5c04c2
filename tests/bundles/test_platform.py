"""The bundles share one base: each bundle's configs state what makes its method and take the rest by macro, the
base holds no macros, override files set top-level ids only (so plain ``python -m monai.bundle run`` config lists
work), and every macro resolves."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from ambisam.registry import get_method
from ambisam.bundle import BASE_CONFIG_DIR, available_bundles, flatten_config
from ambisam.bundle.config import MACRO

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = available_bundles(ROOT / "bundles")
#: the bundles that train SAM-based networks through the shared train.json (ursam is training-free for SAM: its
#: train.json trains the localiser, and its evaluation merges over inference.json)
TRAINED = sorted(b for b in BUNDLES if get_method(b).trainable)
#: at most this many identical settings between two bundles' same config, macros to the base aside (the network's
#: backbone arguments, the optimizer's parameter list, a common learning rate)
SHARED_LIMIT = 6


def _leaves(config, prefix=""):
    """``(id, value)`` of every leaf that is not a macro to the base."""
    if isinstance(config, dict):
        for k, v in config.items():
            yield from _leaves(v, f"{prefix}#{k}" if prefix else k)
    elif isinstance(config, list):
        for i, v in enumerate(config):
            yield from _leaves(v, f"{prefix}#{i}")
    elif not (isinstance(config, str) and config.startswith(MACRO)):
        yield prefix, json.dumps(config)


def _config_files(bundle: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((bundle / "configs").glob("*.json")) if p.name != "metadata.json"}


def test_there_are_bundles_to_compare():
    assert {"psam", "seqsam"} <= set(BUNDLES)


@pytest.mark.parametrize("first,second", list(itertools.combinations(sorted(BUNDLES), 2)))
def test_no_bundle_config_repeats_another(first, second):
    a, b = _config_files(BUNDLES[first]), _config_files(BUNDLES[second])
    for name in sorted(set(a) & set(b)):
        shared = set(_leaves(a[name])) & set(_leaves(b[name]))
        assert len(shared) <= SHARED_LIMIT, f"{first} and {second} both state in {name}: {sorted(shared)}"


def test_the_base_holds_no_macros_and_bundles_set_top_level_ids_only():
    for base in BASE_CONFIG_DIR.glob("*.json"):
        text = base.read_text()
        assert f'"{MACRO}' not in text, f"{base.name} holds a macro (MONAI resolves one level)"
    for name, bundle in BUNDLES.items():
        for file, config in _config_files(bundle).items():
            nested = [k for k in config if "#" in k or "::" in k]
            assert not nested, f"{name}/{file} sets nested ids {nested}: MONAI merges them before the macros resolve"


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_every_macro_resolves(bundle):
    files = [p for p in (BUNDLES[bundle] / "configs").glob("*.json") if p.name != "metadata.json"]
    for file in files:
        flat = flatten_config(file)
        assert MACRO + "common/" not in json.dumps(flat), file
    if not get_method(bundle).trainable:  # a training-free bundle's evaluation merges over its inference.json
        merged = flatten_config([BUNDLES[bundle] / "configs" / "inference.json", BUNDLES[bundle] / "configs" / "evaluate.json"])
        assert merged["split"] == "@eval_split" and merged["training_free"] is True
        return
    merged = flatten_config([BUNDLES[bundle] / "configs" / "train.json", BUNDLES[bundle] / "configs" / "evaluate.json"])
    assert merged["validate_split"] == "@eval_split" and merged["train"]["trainer"]["_target_"] == "ambisam.engines.MultiRaterTrainer"


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_the_synthetic_options_reach_ensure_dataset(bundle, tmp_path):
    from monai.bundle import ConfigParser

    from ambisam.data import datalist_raters
    from ambisam.data.synth import RATER_STYLES

    synthetic = {"rater_styles": True, "cases": 2, "shape": [48, 48, 12]}
    for name, key in (("train", "datalist"), ("inference", "dataset#data")):
        parser = ConfigParser()
        parser.read_config(BUNDLES[bundle] / "configs" / f"{name}.json")
        own = parser["synthetic"]  # the base's by macro, or the bundle's own options (proseg: rater styles)
        assert own == f"{MACRO}common/ambisam/configs/{name}.json#synthetic" or isinstance(own, dict), f"{bundle}/{name}.json"
        parser["dataset_dir"] = str(tmp_path / name)
        parser["synthetic"] = synthetic
        parser.get_parsed_content(key)
        assert datalist_raters(tmp_path / name / "datalist.json") == RATER_STYLES


@pytest.mark.parametrize("bundle", TRAINED)
def test_every_training_config_stops_early_and_no_evaluation_does(bundle):
    """Each training config list (train.json with its override files, multi-GPU included) keeps the base's early
    stopping, the run step that gives it the trainer, and the TrainingBudget; evaluate.json replaces both the
    validation handlers and the run list (an evaluation has no trainer)."""
    folder = BUNDLES[bundle] / "configs"
    overrides = [p.stem for p in folder.glob("train_*.json")] + ["multi_gpu_train"]
    for names in [["train"], *(["train", o] for o in overrides)]:
        flat = flatten_config([folder / f"{n}.json" for n in names])
        assert [h for h in flat["validate_handlers"] if h["_target_"] == "EarlyStopHandler"], names
        assert any("set_trainer(@train#trainer)" in step for step in flat["run"]), names
        assert any(h["_target_"] == "ambisam.benchmark.TrainingBudget" for h in flat["train"]["handlers"]), names
        assert isinstance(flat["max_epochs"], int) and flat["max_epochs"] >= 50, names
    flat = flatten_config([folder / "train.json", folder / "evaluate.json"])
    assert not [h for h in flat["validate_handlers"] if h["_target_"] == "EarlyStopHandler"]
    assert not any("set_trainer" in step for step in flat["run"])


@pytest.mark.parametrize("bundle", TRAINED)
def test_every_bundle_evaluates_under_torchrun_with_the_shared_multi_gpu_evaluate(bundle):
    """multi_gpu_evaluate.json takes the shared base's ids: the test split shared out unpadded, every rank's report
    writer gathering the case ids (rank 0 writes), the evaluation's own run list (a second scoring included)."""
    folder = BUNDLES[bundle] / "configs"
    stages = [p.stem for p in folder.glob("train_stage*.json")]  # p2sam evaluates its stage 2
    evaluate = flatten_config([folder / f"{n}.json" for n in ["train", *stages, "evaluate"]])
    flat = flatten_config([folder / f"{n}.json" for n in ["train", *stages, "evaluate", "multi_gpu_evaluate"]])
    sampler = flat["validate_sampler"]
    assert sampler["_target_"] == "DistributedSampler" and sampler["even_divisible"] is False and not sampler["shuffle"]
    assert flat["run"] == evaluate["run"] and flat["not_rank_zero"] == "$torch.distributed.get_rank() > 0"
    assert any("init_process_group" in step for step in flat["initialize"])
    writers = [h for h in flat["validate_handlers"] if h["_target_"] == "ambisam.engines.MetricsReportWriter"]
    assert writers and not any("_disabled_" in h for h in writers)
    assert flat["validate"]["evaluator"]["prepare_batch"].count("case_seed") == 2
    assert flat["network"] == evaluate["network"]  # no DDP wrapper: nothing is back-propagated


@pytest.mark.parametrize("bundle", TRAINED)
def test_every_config_with_an_embedding_cache_bounds_its_ram(bundle):
    """Training, multi-GPU training and evaluation build the cache with the base's RAM bound and storage dtype."""
    from monai.bundle import ConfigParser

    folder = BUNDLES[bundle] / "configs"
    stages = [[p.stem] for p in folder.glob("train_*.json")]  # p2sam's stage 2, seqsam's MCL
    extra = [*stages, *([*s, "evaluate"] for s in stages), ["multi_gpu_train"], ["evaluate"]]
    cached = 0
    for names in [["train"], *(["train", *o] for o in extra)]:
        parser = ConfigParser(flatten_config([folder / f"{n}.json" for n in names]))
        if parser["embedding_cache"] is None:  # p2sam's stage 1 trains the encoder's LoRA: nothing to cache
            continue
        cached += 1
        assert parser.get_parsed_content("embedding_cache#max_memory_mb") == 1024, names
        assert parser.get_parsed_content("embedding_cache#storage_dtype") == "float32", names
    assert cached >= 2  # a training and its evaluation at least


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_every_inferer_takes_the_shared_box_propagation_off_by_default(bundle):
    """Inference, the validation and the evaluation (and ProSeg's personalised scoring) sample with the base's
    box_propagation, propagation_margin and propagation_start: off by default, on from a top-level override."""
    from monai.bundle import ConfigParser

    ids = {"box_propagation": False, "propagation_margin": 3, "propagation_start": "centre"}
    folder = BUNDLES[bundle] / "configs"
    parser = ConfigParser(flatten_config(folder / "inference.json"))
    inferer = parser.get_parsed_content("inferer")
    assert {k: getattr(inferer, k) for k in ids} == ids
    parser = ConfigParser(flatten_config(folder / "inference.json"))
    parser.update({"box_propagation": True, "propagation_margin": 2, "propagation_start": 7})
    inferer = parser.get_parsed_content("inferer")
    assert (inferer.box_propagation, inferer.propagation_margin, inferer.propagation_start) == (True, 2, 7)
    if bundle not in TRAINED:  # its evaluation's own inferer takes them too
        flat = flatten_config([folder / "inference.json", folder / "evaluate.json"])
        assert {k: flat["inferer"][k] for k in ids} == {k: f"@{k}" for k in ids}
        return
    stages = [p.stem for p in folder.glob("train_stage*.json")]
    for names in (["train"], ["train", *stages, "evaluate"]):
        flat = flatten_config([folder / f"{n}.json" for n in names])
        assert {k: flat[k] for k in ids} == ids, names
        inferers = [flat["validate"]["inferer"]] + ([flat["personalised"]["inferer"]] if "personalised" in flat else [])
        for config in inferers:
            assert {k: config[k] for k in ids} == {k: f"@{k}" for k in ids}, names
