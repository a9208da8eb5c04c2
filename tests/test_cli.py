"""The command line: the demo (main job) end to end, segment, and the sampling benchmark's output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ambisam.bench import (
    bench_methods,
    bench_sampling,
    bench_training,
    format_methods,
    format_sampling,
    format_training,
)
from ambisam.demo import collection_methods, run_demo, segment_file
from ambisam.errors import InputError
from conftest import dice, noisy_ellipse


def test_demo_methods_are_every_bundle_then_the_training_free_baselines(monkeypatch):
    """The main job reads the registry: a bundle that lands later joins it with no change to the command."""
    from ambisam import registry

    names = collection_methods()
    assert names[:6] == ["psam", "seqsam", "mcl", "p2sam", "proseg", "ursam"]
    assert {"baseline", "multimask", "jitter"} <= set(names[6:]) and "prob_unet" not in names
    monkeypatch.setitem(registry.method_registry, "newmethod",
                        registry.MethodSpec("newmethod", "a later bundle", "ambisam.networks.BoxPromptedSam",
                                            bundle="newmethod"))
    assert "newmethod" in collection_methods()[:7]


def test_demo_unknown_method_is_one_message_and_writes_nothing(tmp_path, capsys):
    from ambisam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--methods", "psam,nonsense", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code != 0 and "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_is_a_small_benchmark_of_the_collection(tmp_path, capsys):
    entries = run_demo(tmp_path, cases=4, budget=1, max_epochs=1, num_samples=3, seed=1, shape=(64, 64, 10),
                       methods=["psam", "baseline", "ursam"])
    assert [e["method"] for e in entries] == ["psam", "baseline", "ursam"]
    psam, baseline, ursam = entries
    assert psam["status"] == baseline["status"] == "ok" and ursam["status"] == "unavailable"
    assert baseline["diversity"] == 0.0 and psam["training"][0]["epochs"] == 1
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(entries))
    printed = capsys.readouterr().out
    assert "| psam" in printed and str(tmp_path / "figures") in printed  # the table and where the figures are
    assert (tmp_path / "psam" / "seed0" / "models" / "model.pt").is_file()
    run = json.loads((tmp_path / "demo.json").read_text())
    assert run["seed"] == 1 and run["methods"] == ["psam", "baseline", "ursam"] and "torch" in run["versions"]
    with Image.open(tmp_path / "figures" / "metrics.png") as png:
        assert png.format == "PNG"


def test_segment_file_and_its_errors(tmp_path):
    image, mask, box = noisy_ellipse(h=128, w=128, center=(64, 60), radii=(30, 24), seed=2)
    src = tmp_path / "slice.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(src)
    out = segment_file(str(src), ",".join(str(int(v)) for v in box), str(tmp_path / "mask.png"))
    pred = np.asarray(Image.open(out)) > 127
    assert pred.shape == mask.shape and dice(pred, mask) > 0.9

    with pytest.raises(InputError, match="box must be"):
        segment_file(str(src), "1,2,3", str(tmp_path / "bad.png"))
    with pytest.raises(InputError, match="outside the 128x128 image") as err:
        segment_file(str(src), "0,0,400,50", str(tmp_path / "bad.png"))
    assert str(src) in str(err.value)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot be read as an image"):
        segment_file(str(broken), "1,2,3,4", str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()


def test_bench_sampling_reports_the_ratio_line():
    """UR-SAM's figures: its volume prompts FLARE22's 13 organs on every slice, all from one embedding."""
    result = bench_sampling(method="ursam", num_samples=2, repeats=1, volume_slices=1)
    assert result["volume_structures"] == 13 and result["network"] == "UrSam"
    assert result["ratio"] > 0 and result["encoder_ms_per_slice"] > result["decoder_ms_one_sample"] > 0
    text = format_sampling(result)
    assert "ratio time(2)/time(1): " in text and "slices/s" in text
    # the roofline: LiteMedSAM's encoder is about 75 GFLOP per 256 x 256 slice, a decoder call a few GFLOP
    assert 50 < result["encoder_gflop"] < 100 and 0.5 < result["decoder_gflop_per_sample"] < 10
    assert result["matmul_peak_gflops"] > 0 and 0 < result["encoder_of_peak"] and 0 < result["decoder_of_peak"]
    assert result["encoder_gflops"] == pytest.approx(result["encoder_gflop"] / result["encoder_ms_per_slice"] * 1000)
    # re-encoding the slice for each of the N samples of each organ costs 13 N x (encoder + one sample) per slice
    assert result["speedup_over_reencoding"] == pytest.approx(
        13 * 2 * (result["encoder_ms_per_slice"] + result["decoder_ms_one_sample"]) / 1000
        * result["volume_slices_per_s"])
    assert "13 structures per slice" in text and "roofline (matmul peak" in text and "of peak" in text and "re-encoding each sample's slice" in text


def test_count_flops_counts_a_matrix_product_as_2mnk():
    from ambisam.bench import count_flops, matmul_peak

    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 32
    assert matmul_peak(size=64, repeats=1) > 0


def test_module_entry_point_runs_fire():
    done = subprocess.run([sys.executable, "-m", "ambisam", "synth", "--help"], capture_output=True, text=True,
                          timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "--cases" in done.stdout + done.stderr  # fire prints help to stderr when not on a terminal


def test_bad_input_is_one_clear_message(tmp_path):
    src = tmp_path / "nothing-here"
    done = subprocess.run([sys.executable, "-m", "ambisam", "convert", "--format", "lidc-folder", "--src", str(src),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"ambisam: error: {src}")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_find_input_error_unwraps_monai_compose():
    from monai.transforms import Compose, Lambda

    from ambisam.errors import find_input_error

    def bad(_):
        raise InputError("scan.nii.gz", "label holds values other than 0/1")

    with pytest.raises(RuntimeError) as err:
        Compose([Compose([Lambda(bad)])])({"x": 1})
    found = find_input_error(err.value)
    assert isinstance(found, InputError) and found.path == "scan.nii.gz"
    assert find_input_error(RuntimeError("unrelated")) is None


def test_bench_methods_table_has_a_row_per_method_and_training_speedup_only_where_trainable(monkeypatch):
    """Which measurements bench_methods asks for and how it composes them (the measurements themselves are
    bench_sampling's and bench_training's tests; each runs in a fresh process, tested below)."""
    import ambisam.bench as bench

    calls = []

    def measured(fn, **kwargs):
        calls.append((fn.__name__, kwargs))
        if fn is bench.bench_sampling:
            return dict(method=kwargs["method"], num_samples=2, encoder_ms_per_slice=900.0, decoder_ms_per_sample=10.0,
                        decoder_ms_one_sample=12.0, ratio=1.1, ratio_limit=1.02, volume_slices_per_s=1.0,
                        backbone="litemedsam", threads=2, speedup_over_reencoding=20.0, encoder_of_peak=0.3,
                        decoder_of_peak=0.1, matmul_peak_gflops=150.0, device="cpu", machine="x86_64",
                        volume_slices=1)
        return dict(stage=kwargs["stage"], encoder="frozen", speedup=14.2, step_ms_cached=10.0, step_ms_encoding=142.0)

    monkeypatch.setattr(bench, "_in_fresh_process", measured)
    results = bench_methods("baseline,psam", num_samples=2, repeats=1, volume_slices=1, threads=2, batch_size=1)
    assert calls == [
        ("bench_sampling", dict(method="baseline", structures=1, num_samples=2, repeats=1, volume_slices=1, threads=2)),
        ("bench_sampling", dict(method="psam", structures=1, num_samples=2, repeats=1, volume_slices=1, threads=2)),
        ("bench_training", dict(method="psam", stage=1, batch_size=1, repeats=1, threads=2)),
    ]
    assert [r["method"] for r in results] == ["baseline", "psam"]
    assert not results[0]["trainable"] and "training_speedup" not in results[0]
    assert results[1]["trainable"] and results[1]["training_speedup"] > 0
    table = format_methods(results).splitlines()
    assert table[0].startswith("| method |") and "ratio time(2)/time(1)" in table[0]
    rows = [line for line in table if line.startswith("| baseline") or line.startswith("| psam")]
    assert len(rows) == 2 and "training-free" in rows[0] and rows[1].rstrip("|").strip().endswith("x")


def test_each_bench_methods_measurement_runs_in_a_fresh_process():
    import os

    from ambisam.bench import _in_fresh_process

    child = _in_fresh_process(_process_record)
    assert child["pid"] != os.getpid() and child["parent"] == os.getpid()


def _process_record() -> dict:
    """Run by _in_fresh_process: which process it ran in."""
    import os

    return {"pid": os.getpid(), "parent": os.getppid()}


def test_bench_methods_table_reports_each_training_stage_of_a_method_with_several():
    sampling = dict(num_samples=2, encoder_ms_per_slice=900.0, decoder_ms_per_sample=10.0, decoder_ms_one_sample=12.0,
                    ratio=1.1, ratio_limit=1.02, volume_slices_per_s=1.0, backbone="litemedsam", threads=2,
                    speedup_over_reencoding=20.0, encoder_of_peak=0.3, decoder_of_peak=0.1, matmul_peak_gflops=150.0,
                    device="cpu", machine="x86_64", volume_slices=1, trainable=True, training_batch_size=1)
    stage1 = dict(stage=1, encoder="trainable", speedup=None, step_ms_cached=None, step_ms_encoding=2900.0)
    stage2 = dict(stage=2, encoder="frozen", speedup=14.2, step_ms_cached=10.0, step_ms_encoding=142.0)
    results = [dict(sampling, method="p2sam", training_stages=[stage1, stage2]),
               dict(sampling, method="psam", training_stages=[dict(stage2, stage=1)], training_speedup=14.2)]
    rows = format_methods(results).splitlines()
    assert rows[2].endswith("| stage 1: encoder trains, 2900 ms/step; stage 2: 14.2x |")
    assert rows[3].endswith("| 14.2x |")


def test_bench_methods_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown method"):
        bench_methods("psam,nonsense")


def test_bench_training_times_the_trainers_own_step_with_and_without_the_cache():
    result = bench_training("psam", batch_size=1, repeats=1)
    assert result["bundle"] == "psam" and result["configs"] == ["train"] and result["batch_size"] >= 1
    assert result["stage"] == 1 and result["encoder"] == "frozen"
    assert result["step_ms_cached"] > 0 and result["step_ms_encoding"] > 0 and result["speedup"] > 0
    assert " hits" in result["cache"] and not result["cache"].startswith("embedding cache: 0 hits")
    assert "speed-up from cached embeddings" in format_training(result)


def test_bench_all_is_every_registered_method_with_a_network_and_training_free_ones_have_no_step():
    from ambisam.bench import _method_names
    from ambisam.registry import method_registry

    names = _method_names("all")
    assert set(names) <= set(method_registry) and {"psam", "baseline", "prob_unet"} <= set(names)
    assert {"p2sam", "proseg", "ursam"} <= set(names)
    with pytest.raises(InputError, match="unknown method"):
        _method_names("nonsense")
    with pytest.raises(InputError, match="training-free"):
        bench_training("baseline")


def test_bench_sampling_measures_the_network_p2sam_infers_with():
    """A bundle method's network is its evaluation's: P2SAM's stage 2, prompt-free, reading the image."""
    result = bench_sampling(method="p2sam", num_samples=2, repeats=1, volume_slices=1)
    assert result["method"] == "p2sam" and result["network"] == "P2Sam"
    assert result["configs"] == ["train", "train_stage2"] and result["ratio"] > 0
    assert "network: P2Sam (train + train_stage2)" in format_sampling(result)


def test_bench_training_times_a_stage_whose_encoder_trains_without_a_speedup():
    """P2SAM's stage 1 trains the encoder (LoRA): no cache, only the step (one slice, one repeat: ~3 s here)."""
    result = bench_training(method="p2sam", stage=1, batch_size=1, repeats=1)
    assert result["stage"] == 1 and result["configs"] == ["train"] and result["encoder"] == "trainable"
    assert result["speedup"] is None and result["step_ms_cached"] is None and result["step_ms_encoding"] > 0
    assert "the encoder trains in this stage: every step encodes; no cache" in format_training(result)
    with pytest.raises(InputError, match="training stages 1 to 2, got stage 3"):
        bench_training(method="p2sam", stage=3)


def test_train_names_a_method_and_refuses_a_training_free_one():
    """``ambisam train METHOD`` runs the registry's stages (tests/bundles/test_new_method.py runs two of them);
    a training-free or unknown method is one clear message."""
    for method, expected in (("baseline", "method 'baseline' is training-free: nothing to train"),
                             ("nonsense", "unknown method 'nonsense'")):
        done = subprocess.run([sys.executable, "-m", "ambisam", "train", method], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr


def test_segment_bad_inputs_are_refused_naming_the_file(tmp_path, capsys):
    import nibabel as nib

    from ambisam.cli import main

    def nifti(name, array):
        nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(tmp_path / name))
        return str(tmp_path / name)

    nan = np.random.default_rng(0).random((32, 32))
    nan[3, 3] = np.nan
    one = tmp_path / "one.png"
    Image.fromarray(np.uint8([[7]])).save(one)
    cases = {
        "missing file": (str(tmp_path / "nowhere.png"), "image file not found"),
        "not 2-D": (nifti("volume.nii.gz", np.zeros((32, 32, 5))),
                    "is not a 2D image (shape (32, 32, 5)); segment takes one slice"),
        "NaN intensities": (nifti("nan.nii.gz", nan), "has 1 NaN or infinite intensities"),
        "one pixel": (str(one), "image of 1x1 pixels is too small to segment"),
    }
    for name, (path, problem) in cases.items():
        with pytest.raises(InputError) as err:
            segment_file(path, "0,0,1,1", str(tmp_path / "mask.png"))
        assert (err.value.path, err.value.problem) == (path, problem), name
    # on the command line: one line naming the file and the problem, exit status 2, no traceback
    path, problem = cases["NaN intensities"]
    with pytest.raises(SystemExit) as done:
        main(["segment", "--image", path, "--box", "0,0,1,1", "--out", str(tmp_path / "mask.png")])
    assert done.value.code == 2
    err_text = capsys.readouterr().err
    assert err_text.strip().splitlines()[-1] == f"ambisam: error: {path}: {problem}"
    assert "Traceback" not in err_text
    assert not (tmp_path / "mask.png").exists() and not list(tmp_path.glob(".*"))
