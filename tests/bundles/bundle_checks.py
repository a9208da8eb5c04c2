"""What every bundle's tests check (BUNDLE_CONTRACT.md, "Tests each bundle has"), written once; each
tests/bundles/test_<name>.py calls these with its bundle's name and settings."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from ambisam.bundle import flatten_config
from ambisam.errors import find_input_error

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_SUFFIXES = ("_mask", "_mean", "_uncertainty", "_variance", "_samples")


def configs(bundle: str, *names: str) -> list[str]:
    return [str(ROOT / "bundles" / bundle / "configs" / f"{n}.json") for n in names]


def workflow(bundle: str, names: tuple[str, ...], workflow_type: str, **override) -> ConfigWorkflow:
    """A bundle workflow as the package's runner builds it (the shared base resolved, so overrides may be nested)."""
    from ambisam.bundle import bundle_workflow

    return bundle_workflow(bundle, names, workflow_type, **override)


def plain_workflow(bundle: str, names: tuple[str, ...], workflow_type: str, **override) -> ConfigWorkflow:
    """The bundle workflow exactly as ``python -m monai.bundle run`` builds it (MONAI resolves the macros;
    ``override`` top-level ids only)."""
    cfg = ROOT / "bundles" / bundle / "configs"
    return ConfigWorkflow(
        config_file=configs(bundle, *names),
        meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )


def run_workflow(bundle: str, names: tuple[str, ...], workflow_type: str, **override) -> ConfigWorkflow:
    wf = workflow(bundle, names, workflow_type, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def small_dataset(
    path: Path, cases: int = 4, raters: int = 4, seed: int = 3, split=(0.5, 0.25, 0.25), **synthetic
) -> Path:
    """A small synthetic multi-rater data set of 64x64x10 volumes: by default 2 training, 1 validation, 1 test;
    ``synthetic``: more options of ``synthesize`` (e.g. ``rater_styles=True``)."""
    from ambisam.data import synthesize

    return synthesize(path, cases=cases, raters=raters, seed=seed, shape=(64, 64, 10), split=split, **synthetic)


def train_overrides(tmp: Path, dataset_dir: Path, **extra) -> dict:
    return {
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(tmp / "models"),
        "output_dir": str(tmp / "runs"),
        "max_epochs": 1,
        "val_interval": 1,
        "num_samples": 4,
        **extra,
    }


def check_properties(
    bundle: str,
    tmp: Path,
    dataset_dir: Path,
    ckpt_path: Path,
    stages: tuple[tuple[str, ...], ...] = (("train",),),
    **train_extra,
) -> None:
    """``ConfigWorkflow.check_properties()`` for each training stage's configs (``stages``, with ``train_extra``
    overrides) and for inference (properties resolve after ``initialize``)."""
    for names, kind, override in (
        *((stage, "train", train_overrides(tmp / "props", dataset_dir, **train_extra)) for stage in stages),
        (("inference",), "infer", {"dataset_dir": str(dataset_dir), "ckpt_path": str(ckpt_path),
                                    "output_dir": str(tmp / "props" / "inference")}),
    ):
        wf = plain_workflow(bundle, names, kind, **override)
        wf.initialize()
        missing = wf.check_properties()
        assert not missing, f"{bundle} {names}: missing properties {missing}"


def check_inference_outputs(out_dir: Path, datalist: Path, split: str, num_samples: int, probabilistic: bool,
                            weights: tuple[Path, ...] = ()) -> None:
    """Files present, in the input's shape and affine, probabilities in [0, 1], samples differ for a
    probabilistic method, uncertainty zero where all samples agree; the run's and each case's record hold the
    seed, the versions and the sha256 of every weights file in ``weights`` (the trained ones the run loaded)."""
    from ambisam.weights import file_sha256

    run = json.loads((out_dir / "run.json").read_text())
    for path in weights:
        assert run["weights_sha256"][str(Path(path).resolve())] == file_sha256(path), (path, run["weights_sha256"])
    items = json.loads(datalist.read_text())[split]
    assert items
    for item in items:
        src = nib.load(datalist.parent / item["image"])
        for suffix in OUTPUT_SUFFIXES:
            img = nib.load(out_dir / f"{item['id']}{suffix}.nii.gz")
            expected = (*src.shape, num_samples) if suffix == "_samples" else src.shape
            assert img.shape == expected, (suffix, img.shape, expected)
            assert np.allclose(img.affine, src.affine)
        mean = np.asarray(nib.load(out_dir / f"{item['id']}_mean.nii.gz").dataobj)
        unc = np.asarray(nib.load(out_dir / f"{item['id']}_uncertainty.nii.gz").dataobj)
        samples = np.asarray(nib.load(out_dir / f"{item['id']}_samples.nii.gz").dataobj)
        mask = np.asarray(nib.load(out_dir / f"{item['id']}_mask.nii.gz").dataobj)
        assert 0 <= mean.min() and mean.max() <= 1 and 0 <= unc.min() and unc.max() <= 1
        assert set(np.unique(samples)) <= {0, 1} and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask, (mean > 0.5).astype(mask.dtype))
        agree = (samples == samples[..., :1]).all(-1)
        assert np.all(unc[agree] == 0)
        if probabilistic:
            assert not agree.all(), "a probabilistic method's samples are all identical"
            assert np.all(unc[~agree] > 0)
        record = json.loads((out_dir / f"{item['id']}.json").read_text())
        assert record["num_samples"] == num_samples and "bundle_version" in record and "seed" in record
        assert record["weights_sha256"] == run["weights_sha256"]
    assert "versions" in run and run["seed"] is not None
    assert not list(out_dir.glob(".*")), "temporary files left behind"


def check_torchrun(bundle: str, tmp: Path) -> None:
    """multi_gpu_train.json under torchrun --nproc_per_node=2 with gloo on CPU (2 training, 2 validation cases,
    so that each rank has one of each)."""
    check_torchrun_with(bundle, tmp)


def bad_inputs(tmp: Path, source_dir: Path) -> dict[str, tuple[dict, str]]:
    """Each bad input of the contract: inference overrides -> the expected message. Built from a good case."""
    items = json.loads((source_dir / "datalist.json").read_text())["test"]
    image = source_dir / items[0]["image"]
    labels = [source_dir / p for p in items[0]["label"]]
    ref = nib.load(image)
    bad = tmp / "bad"
    bad.mkdir(exist_ok=True)

    def save(name, array, affine=ref.affine):
        path = bad / name
        nib.save(nib.Nifti1Image(array, affine), str(path))
        return str(path)

    data = np.asarray(ref.dataobj).astype(np.float32)
    label = np.asarray(nib.load(labels[0]).dataobj)
    nan = data.copy()
    nan[0, 0, 0] = np.nan
    three = label.astype(np.uint8) * 3
    garbage = bad / "garbage.nii.gz"
    garbage.write_bytes(b"not an image")
    box_file = bad / "outside.json"
    box_file.write_text(json.dumps({"box": [0, 0, 0, data.shape[0] + 5, 10, 2]}))
    zero_box = bad / "zero_area.json"
    zero_box.write_text(json.dumps({"box": [5, 5, 0, 5, 5, 2]}))
    whole = image.read_bytes()
    truncated = bad / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    corrupt = bad / "corrupt.nii.gz"  # a real gzip stream whose NIfTI header is garbage
    corrupt.write_bytes(gzip.compress(b"\x00" * 40 + whole[40:400]))
    inf = data.copy()
    inf[0, 0, 0] = np.inf
    moved = ref.affine.copy()
    moved[:3, 3] += 7.0
    try:  # a name that is not UTF-8, where the file system allows one
        odd = bad / os.fsdecode(b"scan_\xff.nii.gz")
        odd.write_bytes(b"")
        odd.unlink()
    except (OSError, UnicodeError):
        odd = None
    cases = {
        "missing file": ({"image": str(bad / "nowhere.nii.gz"), "label": str(labels[0])}, "image file not found"),
        "unreadable image": ({"image": str(garbage), "label": str(labels[0])}, "garbage.nii.gz"),
        "wrong dimensionality": ({"image": save("flat.nii.gz", data[..., 0]), "label": str(labels[0])}, "flat.nii.gz"),
        "box outside the image": ({"image": str(image), "box": str(box_file)}, "outside.json"),
        "label not 0/1": ({"image": str(image), "label": save("three.nii.gz", three)}, "three.nii.gz"),
        "fewer raters than declared": (
            {"image": str(image), "label": [str(p) for p in labels[:2]], "num_raters": 4}, "rater"),
        "NaN intensities": ({"image": save("nan.nii.gz", nan), "label": str(labels[0])}, "nan.nii.gz"),
        "no prompt": ({"image": str(image)}, "no box prompt"),
        "truncated NIfTI": ({"image": str(truncated), "label": str(labels[0])}, "truncated.nii.gz"),
        "corrupt NIfTI": ({"image": str(corrupt), "label": str(labels[0])}, "corrupt.nii.gz"),
        "Inf intensities": ({"image": save("inf.nii.gz", inf), "label": str(labels[0])}, "inf.nii.gz"),
        "rater mask of another affine": (
            {"image": str(image), "label": save("moved.nii.gz", label, moved)}, "moved.nii.gz"),
        "rater mask of another shape": (
            {"image": str(image), "label": save("cropped.nii.gz", label[:-2])}, "cropped.nii.gz"),
        "box of zero area": ({"image": str(image), "box": str(zero_box)}, "zero_area.json"),
        "volume of one voxel": (
            {"image": save("voxel.nii.gz", data[:1, :1, :1]), "label": save("voxel_mask.nii.gz", label[:1, :1, :1])},
            "voxel"),
    }
    if odd is not None:
        cases["non-UTF-8 path"] = ({"image": save(odd.name, nan), "label": str(labels[0])}, odd.name)
    return cases


def check_bad_inputs(bundle: str, tmp: Path, source_dir: Path, ckpt_path: Path | None,
                     cases: Sequence[str] | None = None, messages: Mapping[str, str] | None = None,
                     **extra) -> None:
    """Each bad input stops inference with an InputError naming the file, and writes nothing.

    Args:
        cases: the corpus cases that apply to the bundle (default: all of :func:`bad_inputs`).
        messages: a bundle's own expected message for a case (e.g. what its prompt mode asks for).
        extra: more inference overrides for every case (e.g. the prompt mode).
    """
    corpus = bad_inputs(tmp, source_dir)
    unknown = set(cases or ()) - set(corpus) - {"non-UTF-8 path"}  # that one only where the file system allows it
    assert not unknown, f"not corpus cases: {sorted(unknown)}"
    failures = []
    for name, (override, expected) in corpus.items():
        if cases is not None and name not in cases:
            continue
        expected = (messages or {}).get(name, expected)
        out = tmp / f"out_{name.replace(' ', '_')}"
        weights = {} if ckpt_path is None else {"ckpt_path": str(ckpt_path)}
        wf = workflow(bundle, ("inference",), "infer", **weights, output_dir=str(out), **{**extra, **override})
        try:
            wf.initialize()
            wf.run()
        except Exception as e:  # noqa: BLE001 - judged below: it must be an InputError
            failures.extend(_judge(name, e, expected, out))
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


def _judge(name: str, error: BaseException, expected: str | tuple[str, ...], out: Path) -> list[str]:
    """What is wrong with ``error`` for a bad input: it must be an InputError whose message holds ``expected`` (or
    one of them), with nothing written to ``out``."""
    found = find_input_error(error)
    problems = []
    if found is None:
        problems.append(f"{name}: not an InputError: {error!r}")
    elif not any(e in str(found) for e in ((expected,) if isinstance(expected, str) else expected)):
        problems.append(f"{name}: {found}")
    if out.exists():
        problems.append(f"{name}: output written")
    return problems


def _absolute_datalist(datalist: Path) -> dict:
    """A datalist's lists with absolute paths, so that an edited copy can live in another folder."""
    raw = json.loads(datalist.read_text())
    for item in (it for split in ("training", "validation", "test") for it in raw.get(split, [])):
        item["image"] = str(datalist.parent / item["image"])
        item["label"] = [str(datalist.parent / p) for p in item["label"]]
    return raw


def check_workflow_bad_inputs(bundle: str, tmp: Path, datalist: Path, split: str = "training",
                              names: tuple[str, ...] = ("train",), **extra) -> None:
    """Each corpus case that has a label (the box cases do not apply: training and evaluation draw their boxes from
    the labels), put in place of the first case of ``split``, stops the ``names`` workflow (training; evaluation
    with ``("train", "evaluate")``, ``split="test"`` and the trained ``ckpt_path`` in ``extra``) in ``initialize``
    with an InputError naming the file, and nothing is written."""
    raw = _absolute_datalist(datalist)
    good_labels = raw[split][0]["label"]
    failures = []
    for n, (name, (override, expected)) in enumerate(bad_inputs(tmp, datalist.parent).items()):
        if "label" not in override:
            continue
        override = dict(override)
        label = override.pop("label")
        if isinstance(label, str):  # one file: the first rater's, bad or good, with the other raters' good ones
            label = [label, *good_labels[1:]]
        image = override.pop("image")
        # a datalist names a missing file in its own words; either message must name the bad file
        bad_files = tuple(Path(p).name for p in (image, label[0]) if Path(p).parent == tmp / "bad")
        edited = json.loads(json.dumps(raw))
        edited[split][0].update(image=image, label=label)
        folder = tmp / f"{split}_datalist{n}"
        folder.mkdir()
        (folder / "datalist.json").write_text(json.dumps(edited))
        out = tmp / f"{split}_run{n}"
        if "evaluate" in names:
            override["eval_dir"] = str(out / "evaluate")
        wf = workflow(bundle, names, "train", **{**train_overrides(out, folder), **extra, **override})
        try:
            wf.initialize()
        except Exception as e:  # noqa: BLE001 - judged below: it must be an InputError
            failures.extend(_judge(name, e, (expected, *bad_files), out))
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


def check_training_refuses_bad_datalists(bundle: str, tmp: Path, datalist: Path,
                                         names: tuple[str, ...] = ("train",), **extra) -> None:
    """Training on a datalist that is not JSON, or whose training or validation list is empty, stops with one
    InputError naming the datalist before anything is written (``extra``: more overrides)."""
    raw = _absolute_datalist(datalist)
    cases = {"not JSON": ('{"training": [', "not a readable JSON datalist"),
             **{f"empty {split}": (json.dumps(dict(raw, **{split: []})), f"the '{split}' list is empty")
                for split in ("training", "validation")}}
    for n, (name, (text, problem)) in enumerate(cases.items()):
        folder = tmp / f"datalist{n}"
        folder.mkdir(parents=True)
        (folder / "datalist.json").write_text(text)
        out = tmp / f"run{n}"
        with pytest.raises(Exception) as err:
            run_workflow(bundle, names, "train", **train_overrides(out, folder, **extra))
        found = find_input_error(err.value)
        assert found is not None and found.path == str(folder / "datalist.json"), (name, err.value)
        assert problem in found.problem, (name, found)
        assert not out.exists(), f"{name}: {sorted(out.rglob('*'))}"


def check_init_weights_that_need_pickle_are_refused(bundle: str, tmp: Path, names: tuple[str, ...] = ("train",)) -> None:
    """A training workflow whose ``init_weights`` need pickle to load stops at ``initialize`` with one InputError
    naming the file, before it writes anything."""
    from conftest import pickled_checkpoint

    dataset_dir = small_dataset(tmp / "data", cases=2, split=(0.5, 0.5, 0.0)).parent
    pickled = pickled_checkpoint(tmp / "pickled.pt")
    overrides = train_overrides(tmp, dataset_dir, init_weights=str(pickled))
    wf = workflow(bundle, names, "train", **overrides)
    with pytest.raises(Exception) as err:  # noqa: PT011 - judged below: it must be an InputError
        wf.initialize()
    found = find_input_error(err.value)
    assert found is not None, repr(err.value)
    assert found.path == str(pickled), found
    assert "needs pickle to load (it holds conftest.NotAWeight)" in found.problem and "is refused" in found.problem
    assert not (tmp / "runs").exists() and not (tmp / "models").exists()


def check_inference_without_weights(bundle: str, tmp: Path, train_command: str | None = None) -> None:
    """Inference with no trained weights at ``ckpt_path`` stops at ``initialize`` with one InputError saying how
    to train them (``train_command``; by default ``python -m monai.bundle run`` of the bundle's train.json, the
    one stage of a single-stage bundle), and writes nothing."""
    how = train_command or f"python -m monai.bundle run --config_file bundles/{bundle}/configs/train.json"
    wf = workflow(bundle, ("inference",), "infer", ckpt_path=str(tmp / "none.pt"), output_dir=str(tmp / "o"))
    with pytest.raises(Exception) as err:  # noqa: PT011 - judged below: it must be an InputError
        wf.initialize()
    found = find_input_error(err.value)
    assert found is not None, repr(err.value)
    assert found.path == str(tmp / "none.pt"), found
    assert f"no trained weights; train them first: {how} (or pass --ckpt_path PATH" in found.problem, found
    assert not (tmp / "o").exists()


def check_cli_bad_input(bundle: str, tmp: Path, ckpt_path: Path) -> None:
    """From the command line, a bad input ends in one line naming the file and the problem, exit status 2."""
    missing = tmp / "no_such_scan.nii.gz"
    out = tmp / "cli_out"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs(bundle, "inference")[0],
         "--image", str(missing), "--ckpt_path", str(ckpt_path), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"ambisam: error: {missing}: image file not found"
    assert "Traceback" not in done.stderr
    assert not out.exists()


#: ``python -m monai.bundle run`` with the output writer patched to SIGKILL its own process one plane into the
#: case's third file: a real kill in the middle of writing a case, at a point a test can count on
_KILLED_WHILE_WRITING = """
import os, runpy, signal, sys
import ambisam.outputs as outputs
real, files = outputs.write_nifti_planes, []

def write_nifti_planes(path, shape, dtype, affine, planes):
    files.append(path)
    if len(files) < 3:
        return real(path, shape, dtype, affine, planes)
    def planes_then_kill():
        for index, plane in enumerate(planes):
            if index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield plane
    return real(path, shape, dtype, affine, planes_then_kill())

outputs.write_nifti_planes = write_nifti_planes
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def check_inference_killed_while_writing(bundle: str, tmp: Path, dataset_dir: Path, ckpt_path: Path) -> None:
    """Inference SIGKILLed in the middle of writing a case's files leaves none of that case's files, only hidden
    temporary files of the dead process, which the next write into the folder removes."""
    from ambisam.io import remove_stale_temporaries

    out = tmp / "killed"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_WRITING, "run", "--config_file", configs(bundle, "inference")[0],
         "--dataset_dir", str(dataset_dir), "--ckpt_path", str(ckpt_path), "--output_dir", str(out),
         "--num_samples", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 3 and all(name.startswith(".") and ".tmp-" in name for name in left), left
    assert sorted(p.name for p in remove_stale_temporaries(out)) == left
    assert list(out.iterdir()) == []


def check_torchrun_with(
    bundle: str,
    tmp: Path,
    raters: int = 4,
    config: tuple[str, ...] = ("train",),
    written: tuple[str, str] = ("model.pt", "checkpoint_epoch=1.pt"),
    synthetic: dict | None = None,
    **extra,
) -> None:
    """:func:`check_torchrun` with a number of raters for the generated data set and more overrides (e.g. a
    bundle whose training step is costly trains a smaller problem): ``multi_gpu_train.json`` after ``config``
    under torchrun --nproc_per_node=2 with gloo on CPU, 2 training and 2 validation cases; ``written`` names the
    best-model and the epoch-1 checkpoint files the stage writes; ``synthetic``: options of the generated data set."""
    dataset_dir = small_dataset(tmp / "data", raters=raters, split=(0.5, 0.5, 0.0), **(synthetic or {})).parent
    torchrun(bundle, (*config, "multi_gpu_train"), train_overrides(tmp, dataset_dir, **extra))
    for name in written:
        assert (tmp / "models" / name).is_file(), name
    run = json.loads((tmp / "runs" / "run.json").read_text())
    assert run["world_size"] == 2
    shared = tmp / "runs" / "embeddings"  # both ranks' embedding caches: complete entries only, no temporary files
    entries = list(shared.iterdir()) if shared.is_dir() else []
    cached = flatten_config(configs(bundle, *config, "multi_gpu_train")).get("embedding_cache") is not None
    assert entries or not cached, f"{shared} is empty though the config caches embeddings"
    for entry in entries:
        assert not entry.name.startswith("."), entry
        assert torch.load(entry, weights_only=True)["key"] == entry.stem, entry


def torchrun(bundle: str, names: tuple[str, ...], overrides: dict, cwd: Path = ROOT) -> None:
    """``python -m monai.bundle run`` of a bundle's ``names`` configs under torchrun --nproc_per_node=2, gloo on
    CPU, one thread per rank; the run must succeed."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "monai.bundle", "run", "--config_file", str(configs(bundle, *names)),
         "--meta_file", str(ROOT / "bundles" / bundle / "configs" / "metadata.json"), *args],
        capture_output=True, text=True, timeout=900, env=env, cwd=cwd,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def check_torchrun_evaluate(bundle: str, tmp: Path, ckpt_dir: Path, config: tuple[str, ...] = ("train",)) -> None:
    """``multi_gpu_evaluate.json`` under torchrun with 2 ranks scores the same cases with the same metrics as one
    process: 3 test cases (uneven over the ranks), trained weights from ``ckpt_dir``."""
    dataset_dir = small_dataset(tmp / "data", cases=5, split=(0.2, 0.2, 0.6)).parent
    overrides = dict(train_overrides(tmp, dataset_dir), ckpt_dir=str(ckpt_dir))
    one, two = tmp / "one_process", tmp / "two_ranks"
    run_workflow(bundle, (*config, "evaluate"), "train", **overrides, eval_dir=str(one))
    torchrun(bundle, (*config, "evaluate", "multi_gpu_evaluate"), dict(overrides, eval_dir=str(two)))
    single, ranks = (json.loads((out / "metrics.json").read_text()) for out in (one, two))
    assert len(single["cases"]) == 3 and sorted(ranks["cases"]) == sorted(single["cases"])
    assert set(ranks["overall"]) == set(single["overall"])
    for name, value in single["overall"].items():
        assert (value is None and ranks["overall"][name] is None) or value == pytest.approx(
            ranks["overall"][name], rel=1e-5, abs=1e-6), name
    for name, values in single["per_case"].items():
        by_case = dict(zip(ranks["cases"], ranks["per_case"][name]))
        for case, value in zip(single["cases"], values):
            assert (value is None and by_case[case] is None) or value == pytest.approx(
                by_case[case], rel=1e-5, abs=1e-6), (name, case)


class ContractChecks:
    """The contract's checks as tests, written once (BUNDLE_CONTRACT.md, "Tests each bundle has"; every bundle's
    metadata is verified against the kept schema in tests/test_export.py): a bundle's test
    module subclasses this as ``class TestContract(ContractChecks)``, sets ``bundle``, and defines a module fixture
    ``trained`` whose first two items are the training folder (``models/model.pt`` in it) and the datalist.

    Attributes:
        bundle: the bundle's name.
        torchrun: :func:`check_torchrun_with` arguments (a smaller problem, the data set's options).
    """

    bundle: str = ""
    torchrun: dict = {}

    def test_properties(self, trained):
        tmp, datalist = trained[:2]
        check_properties(self.bundle, tmp, datalist.parent, tmp / "models" / "model.pt")

    def test_bad_inputs_stop_with_one_message_and_write_nothing(self, trained, tmp_path):
        tmp, datalist = trained[:2]
        check_bad_inputs(self.bundle, tmp_path, datalist.parent, tmp / "models" / "model.pt")

    def test_bad_input_on_the_command_line_is_one_line(self, trained, tmp_path):
        check_cli_bad_input(self.bundle, tmp_path, trained[0] / "models" / "model.pt")

    def test_inference_without_weights_says_how_to_train(self, tmp_path):
        check_inference_without_weights(self.bundle, tmp_path)

    def test_training_refuses_init_weights_that_need_pickle(self, tmp_path):
        check_init_weights_that_need_pickle_are_refused(self.bundle, tmp_path)

    def test_training_refuses_a_datalist_not_json_or_with_an_empty_list(self, trained, tmp_path):
        check_training_refuses_bad_datalists(self.bundle, tmp_path, trained[1])

    def test_training_refuses_bad_inputs_before_writing_anything(self, trained, tmp_path):
        check_workflow_bad_inputs(self.bundle, tmp_path, trained[1])

    def test_evaluation_refuses_bad_inputs_before_writing_anything(self, trained, tmp_path):
        tmp, datalist = trained[:2]
        check_workflow_bad_inputs(self.bundle, tmp_path, datalist, "test", ("train", "evaluate"),
                                  ckpt_path=str(tmp / "models" / "model.pt"))

    def test_multi_gpu_train_under_torchrun_gloo(self, tmp_path):
        check_torchrun_with(self.bundle, tmp_path, **self.torchrun)
