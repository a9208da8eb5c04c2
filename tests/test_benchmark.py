"""The benchmark command end to end on a tiny generated data set, its report and figures, its handlers, and
the baselines it adds (multimask, prompt jitter, MC dropout, Probabilistic U-Net)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

from ambisam.benchmark import METRIC_KEYS, TrainingBudget, run_benchmark
from ambisam.benchmark.report import TABLE_COLUMNS
from ambisam.errors import InputError
from ambisam.networks import (
    BoxPromptedSam,
    McDropoutSam,
    MultimaskSam,
    ProbabilisticUNet,
    PromptJitterSam,
)
from ambisam.registry import get_method


# ------------------------------------------------------------------------------------------------ baselines
@pytest.fixture(scope="module")
def embedded(example):
    """One real slice's embedding (a bright ellipse) and its box in backbone input coordinates."""
    return example["embeddings"], example["boxes"].float()


def _count_decoder_calls(backbone):
    calls = []
    handle = backbone.mask_decoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_registry_names_the_sam_baselines():
    assert get_method("multimask").network_class is MultimaskSam
    assert get_method("jitter").network_class is PromptJitterSam
    assert get_method("mc_dropout").network_class is McDropoutSam


@torch.no_grad()
def test_multimask_gives_three_distinct_hypotheses_tiled(litemedsam, embedded):
    embedding, prompt = embedded
    net = MultimaskSam(litemedsam).eval()
    logits = net.sample_logits(embedding.expand(2, -1, -1, -1), prompt.expand(2, -1), 7)
    assert logits.shape == (2, 7, *litemedsam.mask_size)
    first = logits[0]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not torch.equal(first[0], first[2])
    for i in range(3, 7):  # tiled: sample i is hypothesis i mod 3
        assert torch.equal(first[i], first[i % 3])
    _, scores = litemedsam.decode_boxes(embedding, prompt, multimask=True)
    best = int(scores[0].argmax())
    multimask, _ = litemedsam.decode_boxes(embedding, prompt, multimask=True)
    assert torch.equal(net.sample_logits(embedding, prompt, 1)[0, 0], multimask[0, best])


@torch.no_grad()
def _decoder_calls_for(backbone, num_prompts: int) -> int:
    """Decoder calls for one image's prompts: ``prompts_per_call`` at a time (2 on a CPU by default)."""
    return math.ceil(num_prompts / (backbone.prompts_per_call or backbone.CPU_PROMPTS_PER_CALL))


def test_jitter_samples_differ_decoded_from_one_embedding(litemedsam, embedded):
    embedding, prompt = embedded
    net = PromptJitterSam(litemedsam).eval()
    torch.manual_seed(0)
    calls, handle = _count_decoder_calls(litemedsam)
    try:
        logits = net.sample_logits(embedding, prompt, 6)
    finally:
        handle.remove()
    assert logits.shape == (1, 6, *litemedsam.mask_size)
    assert len(calls) == _decoder_calls_for(litemedsam, 6)  # one batched decode of the 6 boxes, no per-sample call
    masks = logits[0] > 0
    assert any(not torch.equal(masks[0], masks[i]) for i in range(1, 6))
    boxes = net.jitter_boxes(prompt, 50)
    assert boxes.shape == (1, 50, 4)
    assert (boxes >= 0).all() and (boxes <= litemedsam.image_size - 1).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    baseline = BoxPromptedSam(litemedsam).eval()
    assert torch.equal(net.sample_logits(embedding, prompt, 1), baseline.sample_logits(embedding, prompt, 1))


@torch.no_grad()
def test_mc_dropout_samples_differ_and_equal_the_baseline_with_dropout_off(litemedsam, embedded):
    embedding, prompt = embedded
    net = McDropoutSam(litemedsam, dropout=0.2).eval()
    torch.manual_seed(0)
    calls, handle = _count_decoder_calls(litemedsam)
    try:
        logits = net.sample_logits(embedding, prompt, 4)
    finally:
        handle.remove()
    assert logits.shape == (1, 4, *litemedsam.mask_size) and len(calls) == _decoder_calls_for(litemedsam, 4)
    assert not torch.allclose(logits[0, 0], logits[0, 1])
    # the hooks live only during the sampling call: the shared backbone is left as it was
    assert all(not m._forward_hooks for m in net.dropout_modules())
    reference = BoxPromptedSam(litemedsam).eval().sample_logits(embedding, prompt, 1)
    net.dropout_at_sampling = False
    off = net.sample_logits(embedding, prompt, 4)
    assert torch.allclose(off, reference.expand_as(off))
    net.dropout_at_sampling = True
    assert torch.allclose(net.sample_logits(embedding, prompt, 1), reference)  # forward stays deterministic
    with pytest.raises(ValueError):
        McDropoutSam(litemedsam, sites=("nowhere",))


# ------------------------------------------------------------------------------------------ prob U-Net
def _small_prob_unet(**kwargs):
    return ProbabilisticUNet(image_size=32, features=(8, 8, 16, 16, 16, 8), prior_channels=(8, 16), fcomb_channels=8,
                             **kwargs)


def test_prob_unet_shapes():
    torch.manual_seed(0)
    net = _small_prob_unet().eval()
    images = torch.rand(2, 1, 48, 40)
    boxes = torch.tensor([[5.0, 6.0, 30.0, 25.0], [0.0, 0.0, 39.0, 47.0]])
    with torch.no_grad():
        grid = net.backbone.encode(images)
        assert grid.shape == (2, 1, 32, 32)
        prompt = net.backbone.boxes_to_input(boxes, (48, 40))
        samples = net.sample_logits(grid, prompt, 5)
        assert samples.shape == (2, 5, 32, 32)
        assert not torch.allclose(samples[:, 0], samples[:, 1])
        assert net(images, boxes).shape == (2, 1, 48, 40)  # the representative prediction: the prior mean
        assert torch.equal(net(images, boxes), net(images, boxes))
    outputs = net.train()(grid, prompt, torch.zeros(2, 1, 32, 32), training_outputs=True)
    assert outputs["logits"].shape == (2, 1, 32, 32) and outputs["kl"].shape == (2,)
    assert _small_prob_unet(use_box=False).capabilities.needs_prompt is False


def test_prob_unet_training_step_reduces_its_loss():
    torch.manual_seed(0)
    net = _small_prob_unet().train()
    images = torch.rand(4, 1, 32, 32)
    boxes = torch.tensor([[8.0, 8.0, 23.0, 23.0]]).repeat(4, 1)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, 10:22, 10:22] = 1
    from monai.bundle import ConfigParser

    loss_fn = ConfigParser({"loss": get_method("prob_unet").loss}).get_parsed_content("loss")  # the registry's
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        torch.manual_seed(1)  # the same posterior sample before and after the step
        return loss_fn(net(images, boxes, masks, training_outputs=True), masks)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach())


# ------------------------------------------------------------------------------------------------ handlers
def test_training_budget_stops_at_an_epoch_end(tmp_path):
    engine = Engine(lambda e, b: time.sleep(0.05))
    budget = TrainingBudget(seconds=0.4, record_path=tmp_path / "budget.json")
    budget.attach(engine)
    engine.run(range(3), max_epochs=20)  # ~0.15 s per epoch
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["stopped_by_budget"] and 1 <= record["epochs"] <= 3
    assert engine.state.iteration == 3 * record["epochs"]  # whole epochs only

    engine = Engine(lambda e, b: time.sleep(0.05))
    TrainingBudget(seconds=0.12, record_path=tmp_path / "long.json").attach(engine)
    engine.run(range(40), max_epochs=5)  # one epoch alone overruns: it is ended early, then training stops
    record = json.loads((tmp_path / "long.json").read_text())
    assert record["epochs"] == 1 and record["iterations"] < 40 and record["stopped_by_budget"]


def test_training_budget_validates_a_last_epoch_the_bundle_skips(tmp_path):
    class Validator:
        epochs: list = []

        def run(self, epoch):
            self.epochs.append(epoch)

    validator = Validator()
    engine = Engine(lambda e, b: None)
    TrainingBudget(None, tmp_path / "budget.json", validator=validator, val_interval=2).attach(engine)
    engine.run(range(2), max_epochs=3)  # the bundle validates epoch 2; epoch 3 is the last
    assert validator.epochs == [3]


def test_training_budget_does_not_count_first_time_encoding(tmp_path):
    class Clock:  # stands in for TimedEmbeddingCache: every iteration "encodes" for its whole duration
        encoding_seconds = 0.0

    clock = Clock()

    def step(engine, batch):
        time.sleep(0.05)
        clock.encoding_seconds += 0.05

    engine = Engine(step)
    TrainingBudget(seconds=0.1, record_path=tmp_path / "budget.json", clock=clock).attach(engine)
    engine.run(range(3), max_epochs=4)  # 0.6 s of wall time, but (almost) all of it encoding
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["epochs"] == 4 and not record["stopped_by_budget"]
    assert record["encoding_seconds"] == pytest.approx(0.6) and record["seconds"] < 0.1


def _base_early_stop_handlers(patience):
    """The base train.json's early-stopping entry of ``validate_handlers``, parsed with ``patience``."""
    from monai.bundle import ConfigParser

    from ambisam.bundle import BASE_CONFIG_DIR

    base = ConfigParser.load_config_file(str(BASE_CONFIG_DIR / "train.json"))
    entries = [h for h in base["validate_handlers"] if h["_target_"] == "EarlyStopHandler"]
    assert len(entries) == 1 and base["patience"] == 5
    config = {"imports": base["imports"], "patience": patience, "early_stop_min_delta": base["early_stop_min_delta"],
              "validate_handlers": entries}
    return ConfigParser(config).get_parsed_content("validate_handlers")


@pytest.mark.parametrize("patience", [2, None])
def test_early_stopping_ends_training_when_the_key_metric_stops_improving(tmp_path, patience):
    """The validator's key metric (lower is better) improves twice, then never again: with the base's early
    stopping (patience 2) training ends two validations after the best, before max_epochs; ``None`` disables it.
    The TrainingBudget records one curve point per validation and says whether early stopping ended training."""
    geds = [0.5, 0.4, 0.45, 0.41, 0.42] + [0.43] * 5
    validator = Engine(lambda e, b: None)
    validator.state.key_metric_name = "val_ged"  # as MONAI's evaluators set it

    @validator.on(Events.EPOCH_COMPLETED)
    def _metrics(engine):  # before the handlers, as MONAI computes metrics first
        engine.state.metrics = {"val_ged": geds[trainer.state.epoch - 1], "val_diversity": 0.1, "note": "text"}

    handlers = _base_early_stop_handlers(patience)
    for handler in handlers:
        handler.attach(validator)
    trainer = Engine(lambda e, b: time.sleep(0.01))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run([0]))  # ValidationHandler, interval 1
    TrainingBudget(None, tmp_path / "budget.json", validator=validator, val_interval=1).attach(trainer)
    for handler in handlers:  # the base's run list
        handler.set_trainer(trainer)
    trainer.run(range(2), max_epochs=10)

    record = json.loads((tmp_path / "budget.json").read_text())
    epochs = 4 if patience else 10
    assert trainer.state.epoch == record["epochs"] == epochs and not record["stopped_by_budget"]
    assert record["stopped_early"] is bool(patience)
    curve = record["validation_curve"]
    assert [p["epoch"] for p in curve] == list(range(1, epochs + 1))
    assert [p["val_ged"] for p in curve] == geds[:epochs] and all(p["val_diversity"] == 0.1 for p in curve)
    assert all("note" not in p for p in curve)  # float metrics only
    seconds = [p["seconds"] for p in curve]
    assert seconds == sorted(set(seconds)) and 0 < seconds[0] and seconds[-1] <= record["seconds"]


def test_a_later_stage_curve_follows_the_earlier_stages_time():
    from ambisam.benchmark.jobs import _joined_curve

    stages = [{"stage": 1, "seconds": 10.0, "validation_curve": [{"epoch": 2, "seconds": 4.0, "val_ged": 0.5}]},
              {"stage": 2, "seconds": 3.0, "validation_curve": [{"epoch": 2, "seconds": 1.5, "val_ged": 0.4}]}]
    assert _joined_curve(stages) == [{"epoch": 2, "seconds": 4.0, "val_ged": 0.5, "stage": 1},
                                     {"epoch": 2, "seconds": 11.5, "val_ged": 0.4, "stage": 2}]


def test_timed_embedding_cache_times_its_misses_only():
    from ambisam.benchmark import TimedEmbeddingCache
    from ambisam.networks import ImageGridBackbone

    cache = TimedEmbeddingCache(ImageGridBackbone(16))
    images = torch.rand(2, 1, 20, 20)
    first = cache(images)
    assert cache.misses == 2 and cache.encoding_seconds > 0
    spent = cache.encoding_seconds
    assert torch.equal(cache(images), first) and cache.hits == 2 and cache.encoding_seconds == spent


def test_the_timed_cache_goes_only_to_stages_that_cache_embeddings():
    """P2SAM's stage 1 trains its encoder (``embedding_cache: null``): the benchmark's shared, timed cache is set
    for its stage 2 and its evaluation only (a nested override of a null cache cannot even be applied)."""
    from ambisam.benchmark.jobs import _timed_cache

    p2sam = get_method("p2sam")
    assert _timed_cache(p2sam, p2sam.stages[0], {}, "cache") == {}
    for configs in (p2sam.stages[1], p2sam.eval_configs):
        assert _timed_cache(p2sam, configs, {}, "cache") == {
            "embedding_cache#_target_": "ambisam.benchmark.TimedEmbeddingCache", "embedding_cache#cache_dir": "cache"}
    prob_unet = get_method("prob_unet")  # its overrides drop the cache
    assert _timed_cache(prob_unet, prob_unet.stages[0], prob_unet.config_overrides(), "cache") == {}


# ------------------------------------------------------------------------------------------------ benchmark
@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    """psam and proseg (one epoch each), the jitter ensemble and the baseline on 4 generated 64x64x10 cases, N = 4;
    ursam, a multi-organ method with its own table, is listed as unavailable (p2sam, which runs, trains too slowly on a
    CPU for this test)."""
    from ambisam.data import synthesize

    tmp = tmp_path_factory.mktemp("benchmark")
    datalist = synthesize(tmp / "data", cases=4, shape=(64, 64, 10), seed=3)
    out = tmp / "out"
    entries = run_benchmark(data=datalist, methods="psam,jitter,baseline,proseg,ursam", samples=4, out=out, budget=2,
                            max_epochs=1, figure_cases=1, isolate=False)
    return out, entries, datalist


def test_benchmark_results_json(benchmark_run):
    out, entries, _ = benchmark_run
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list) and [r["method"] for r in results] == ["psam", "jitter", "baseline", "proseg", "ursam"]
    assert results == json.loads(json.dumps(entries))
    for r in results[:4]:
        assert r["status"] == "ok", r
        assert r["num_samples"] == 4 and r["seeds"] == [0]
        for key in METRIC_KEYS:
            assert key in r
        for key in ("ged", "diversity", "hm_iou", "dice_max", "dice_mean", "soft_dice", "ece"):
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, (r["method"], key)
        assert r["timings"]["ms_per_sample"] > 0 and r["timings"]["sampled_slices"] > 0
        assert r["memory"]["peak_rss_mb"] > 0
        assert isinstance(r["parameters_trained"], int)
        counts = r["reliability_bins"][0]
        assert len(counts) == 10 and sum(counts) > 0
    psam, jitter, baseline, proseg = results[:4]
    assert psam["parameters_trained"] > 0 and psam["timings"]["train_seconds"] > 0
    assert psam["training"][0]["epochs"] == 1
    # one validation (the last epoch, which val_interval 2 skips), on the clock of the budget
    (point,) = psam["training"][0]["validation_curve"]
    assert point["epoch"] == 1 and 0 < point["seconds"] <= psam["training"][0]["seconds"]
    assert 0.0 <= point["val_ged"] <= 2.0 and not psam["training"][0]["stopped_early"]
    assert jitter["parameters_trained"] == 0 and baseline["parameters_trained"] == 0
    assert baseline["diversity"] == 0.0
    # NCC on probability maps: a deterministic method's identical maps still vary over the pixels (E_ss is the
    # entropy of its map), so it is defined; on its binary samples it was undefined everywhere before 0.2.x
    assert isinstance(baseline["ncc"], float)
    for r in results[:3]:
        assert 0.0 <= r["presence_gap"] <= 1.0 and 0.0 <= r["ece_prob"] <= 1.0, r["method"]
        assert r["presence_gap"] >= abs(r["samples_empty"] - r["raters_empty"]) - 1e-9
        assert float(r["ncc_undefined_raters"]).is_integer()
    assert jitter["diversity"] > 0
    # the raters' own diversity, the reference for every method's: the same test cases, the same for all
    assert 0.0 < psam["rater_diversity"] <= 1.0
    assert all(r["rater_diversity"] == pytest.approx(psam["rater_diversity"]) for r in results[:4])
    assert results[4]["status"] == "unavailable" and "ursam" in results[4]["reason"]
    assert "multi-organ method" in results[4]["reason"] and "ursam/configs/evaluate.json" in results[4]["reason"]
    # proseg runs beside the others, its personalised scoring beside the distribution metrics
    assert proseg["parameters_trained"] > 0 and proseg["training"][0]["epochs"] == 1
    assert 0.0 <= proseg["personalised_dice"] <= 1.0, proseg
    assert psam["training"][0]["stages"][0]["configs"] == ["train"] and psam["training"][0]["stages"][0]["epochs"] == 1
    record = json.loads((out / "run.json").read_text())
    assert record["job"] == "benchmark" and record["num_samples"] == 4 and "torch" in record["versions"]
    # the synthetic data's own convention, passed to every job
    assert record["intensity"]["modality"] == "ct" and record["intensity"]["source"] in ("datalist", "default")
    assert all(r["intensity"] == record["intensity"] for r in results)


def test_benchmark_markdown_table(benchmark_run):
    out, _, _ = benchmark_run
    lines = (out / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [c.format(n=4) for c in TABLE_COLUMNS]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["psam", "jitter", "baseline", "proseg"]
    assert all(len(r.strip("|").split("|")) == len(TABLE_COLUMNS) for r in rows)
    assert any("ursam" in line and "unavailable" in line for line in lines)
    assert any(line.startswith("The raters' own diversity on the test cases") for line in lines)
    assert any("prompt: `union`: the box of the raters' union" in line and "training boxes the same" in line
               for line in lines)
    assert any("figures/convergence.png" in line and "validation" in line for line in lines)


def test_benchmark_figures_are_valid_pngs(benchmark_run):
    out, _, _ = benchmark_run
    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"reliability.png", "metrics.png", "convergence.png"} <= names and any(n.startswith("case_") for n in names)
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_benchmark_reuses_completed_jobs(benchmark_run):
    out, entries, datalist = benchmark_run
    before = (out / "psam" / "seed0" / "models" / "model.pt").stat().st_mtime_ns
    again = run_benchmark(data=datalist, methods="psam,jitter,baseline,proseg,ursam", samples=4, out=out, budget=2,
                          max_epochs=1, figure_cases=1, isolate=False)
    assert [e.get("ged") for e in again] == [e.get("ged") for e in entries]
    assert (out / "psam" / "seed0" / "models" / "model.pt").stat().st_mtime_ns == before


def test_benchmark_job_in_its_own_process(benchmark_run, tmp_path):
    """The default: each job runs as `python -m ambisam.benchmark JOB.json`, its peak memory its own."""
    _, entries, datalist = benchmark_run
    (entry,) = run_benchmark(data=datalist, methods="baseline", samples=4, out=tmp_path / "out", figure_cases=0)
    assert entry["status"] == "ok" and entry["memory"]["scope"] == "job process"
    assert entry["ged"] == pytest.approx(entries[2]["ged"])  # the same prompts and samples as in-process
    assert (tmp_path / "out" / "baseline" / "seed0" / "job.json").is_file()



def test_benchmark_killed_mid_job_resumes_without_redoing_finished_jobs(benchmark_run, tmp_path):
    """`ambisam benchmark` SIGKILLed (its whole process group) while its second job runs; the same benchmark
    again reuses the finished job's result, runs the killed one, and scores both as an uninterrupted run."""
    import signal

    _, entries, datalist = benchmark_run
    out = tmp_path / "out"
    shutil.copytree(benchmark_run[0] / "embeddings", out / "embeddings")  # the same slices: no re-encoding
    finished = out / "baseline" / "seed0" / "result.json"
    command = [sys.executable, "-m", "ambisam", "benchmark", "--data", str(datalist), "--methods", "baseline,jitter",
               "--samples", "4", "--out", str(out), "--budget", "2", "--max_epochs", "1", "--figure_cases", "0"]
    job = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not finished.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the benchmark and its job process
    assert job.wait(timeout=60) == -signal.SIGKILL, "the benchmark ended before it could be killed mid-job"
    assert finished.is_file() and not (out / "jitter" / "seed0" / "result.json").exists()
    assert not (out / "results.json").exists()
    kept = finished.stat().st_mtime_ns
    again = run_benchmark(data=datalist, methods="baseline,jitter", samples=4, out=out, budget=2, max_epochs=1,
                          figure_cases=0, isolate=False)
    assert finished.stat().st_mtime_ns == kept, "the finished job was run again"
    assert [e["status"] for e in again] == ["ok", "ok"]
    by_method = {e["method"]: e.get("ged") for e in entries}
    assert [e["ged"] for e in again] == pytest.approx([by_method["baseline"], by_method["jitter"]])


def test_benchmark_evaluation_prompt_is_a_named_protocol(benchmark_run, tmp_path):
    """--prompt random_rater: each slice is prompted with one non-empty rater's box (seeded) instead of the
    raters' union box; the protocol is recorded in the job's settings and in metrics.json."""
    out, entries, datalist = benchmark_run
    shutil.copytree(out / "embeddings", tmp_path / "out" / "embeddings")  # the same slices: no re-encoding
    kwargs = dict(data=datalist, methods="baseline", samples=4, out=tmp_path / "out", figure_cases=0, isolate=False,
                  prompt="random_rater")
    (entry,) = run_benchmark(**kwargs)
    (again,) = run_benchmark(**kwargs, rerun=True)
    assert entry["status"] == "ok" and entry["ged"] == pytest.approx(again["ged"])  # seeded
    assert entry["ged"] != pytest.approx(entries[2]["ged"])  # other boxes than the union's
    job = json.loads((tmp_path / "out" / "baseline" / "seed0" / "job.json").read_text())
    assert job["settings"]["prompt"] == job["settings"]["train_prompt"] == "random_rater"
    metrics = json.loads((tmp_path / "out" / "baseline" / "seed0" / "evaluate" / "metrics.json").read_text())
    assert metrics["prompt"] == "random_rater" and metrics["prompt_jitter"] == 0

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": "psam,nonsense"}, "unknown method"),
        ({"samples": 0}, "samples and seeds"),
        ({"budget": -1}, "budget"),
        ({"modality": "xray"}, "modality"),
        ({"window": "400,-1000"}, "window"),
        ({"prompt": "centre"}, "prompt must be one of"),
        ({"train_prompt": "centre"}, "prompt must be one of"),
        ({"prompt_jitter": -2}, "prompt_jitter"),
    ],
)
def test_benchmark_bad_arguments_write_nothing(tmp_path, kwargs, message):
    args = {"data": tmp_path / "missing.json", "methods": "baseline", "out": tmp_path / "out"} | kwargs
    with pytest.raises(InputError, match=message):
        run_benchmark(**args)
    assert not (tmp_path / "out").exists()


def test_benchmark_window_for_a_modality_without_one_writes_nothing(tmp_path):
    from ambisam.data import synthesize

    datalist = synthesize(tmp_path / "data", cases=4, shape=(64, 64, 10), seed=3)
    with pytest.raises(InputError, match="window applies to modality ct only"):
        run_benchmark(data=datalist, methods="baseline", modality="none", window="0,255", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_benchmark_missing_datalist_writes_nothing(tmp_path):
    with pytest.raises(InputError, match="datalist file not found"):
        run_benchmark(data=tmp_path / "missing.json", methods="baseline", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


LIDC_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lidc-sample"


def test_benchmark_takes_the_intensity_convention_from_a_converted_datalist(tmp_path):
    """Waits for ``ambisam.data.datalist_intensity``: a converted LIDC sample says modality ``none`` itself, and
    the benchmark scores it so without ``--modality``."""
    if not LIDC_SAMPLE.is_dir():
        pytest.skip(f"the LIDC-IDRI sample is not at {LIDC_SAMPLE} (shared data folder absent)")
    done = subprocess.run([sys.executable, "-m", "ambisam", "convert", "--format", "lidc-folder", "--src",
                           str(LIDC_SAMPLE), "--out", str(tmp_path / "lidc")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = run_benchmark(data=tmp_path / "lidc" / "datalist.json", methods="baseline", seeds=1, samples=2,
                             figure_cases=0, out=tmp_path / "out", isolate=False)
    assert entry["status"] == "ok", entry
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["intensity"]["modality"] == "none" and record["intensity"]["source"] == "datalist"
    assert record["modality"] == "none" and entry["intensity"] == record["intensity"]
    job = json.loads((tmp_path / "out" / "baseline" / "seed0" / "job.json").read_text())
    assert job["modality"] == "none" and job["value_range"] == record["intensity"]["value_range"]


def test_benchmark_bad_files_in_the_datalist_are_refused_before_training(tmp_path):
    import gzip

    import nibabel as nib
    import numpy as np

    from ambisam.data import synthesize

    datalist = synthesize(tmp_path / "data", cases=4, shape=(64, 64, 10), seed=3)
    lists = json.loads(datalist.read_text())
    image = datalist.parent / lists["test"][0]["image"]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"\x00" * 40 + image.read_bytes()[40:400]))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    label = datalist.parent / lists["training"][0]["label"][0]
    three = tmp_path / "three.nii.gz"
    rater = nib.load(label)  # the bad mask keeps the rater's own grid: only its values are wrong
    nib.save(nib.Nifti1Image(np.asarray(rater.dataobj).astype(np.uint8) * 3 + 3, rater.affine), str(three))
    for split, key, bad, problem in [("test", "image", corrupt, "not a readable NIfTI file"),
                                     ("test", "image", truncated, "cannot be read as a NIfTI image"),
                                     ("training", "image", corrupt, "not a readable NIfTI file"),
                                     ("training", "image", truncated, "cannot be read as a NIfTI image"),
                                     ("training", "label", three, "mask values must be 0/1, found 3")]:
        edited = json.loads(datalist.read_text())
        entry = edited[split][0]
        entry[key] = str(bad) if key == "image" else [str(bad), *entry["label"][1:]]
        bad_list = datalist.parent / f"bad_{split}_{bad.stem}.json"  # the other paths stay relative to it
        bad_list.write_text(json.dumps(edited))
        with pytest.raises(InputError) as err:
            run_benchmark(data=bad_list, methods="baseline,psam", out=tmp_path / "out")
        assert err.value.path == str(bad) and problem in err.value.problem, (split, key, err.value)
        assert not (tmp_path / "out").exists()
    # the datalist itself: not JSON, or an empty training list for methods that train
    for name, text, problem in [("not_json.json", '{"training": [', "not a readable JSON datalist"),
                                ("empty.json", json.dumps(dict(lists, training=[])), "non-empty 'training'")]:
        (datalist.parent / name).write_text(text)
        with pytest.raises(InputError) as err:
            run_benchmark(data=datalist.parent / name, methods="baseline,psam", out=tmp_path / "out")
        assert err.value.path == str(datalist.parent / name) and problem in err.value.problem, (name, err.value)
        assert not (tmp_path / "out").exists()
