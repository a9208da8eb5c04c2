"""Model-zoo packaging for every bundle in bundles/: the metadata against the kept schema (offline), the network's
input and output (``verify_net_in_out``), TorchScript, and ``python -m ambisam export``'s zip running inference
from an empty folder in a fresh process. Weights are each bundle's freshly initialised network (the test checks
the packaging, not the accuracy)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ambisam.errors import InputError
from ambisam.registry import get_method
from ambisam.export import check_metadata, check_network, export_bundle, network_test_inputs, verify_bundle_zip

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(
    p.name
    for p in (ROOT / "bundles").iterdir()
    if (p / "configs" / "inference.json").is_file() and (p / "configs" / "metadata.json").is_file()
)
#: the bundles that train weights (and ship them); a training-free one (ursam) ships configs and docs only
TRAINED = [b for b in BUNDLES if get_method(b).trainable]
SHAPE = (48, 48, 3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    from monai.bundle import ConfigParser

    tmp = tmp_path_factory.mktemp("weights")
    found = {}
    for name in TRAINED:
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / name / "configs" / "inference.json"))
        torch.manual_seed(0)
        found[name] = tmp / f"{name}.pt"
        torch.save(parser.get_parsed_content("network_def").state_dict(), found[name])
    return found


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (the checks must run offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_is_valid_against_the_kept_schema_offline(bundle, no_network):
    check_metadata(ROOT / "bundles" / bundle)


def test_the_documented_verify_metadata_command_runs_offline_with_the_kept_schema():
    """``python -m monai.bundle verify_metadata --filepath schemas/...`` as the docs give it (one bundle: every
    bundle's metadata is verified in-process above)."""
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
         str(ROOT / "bundles" / BUNDLES[0] / "configs" / "metadata.json"),
         "--filepath", str(ROOT / "schemas" / "meta_schema_20240725.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "metadata is verified with no error" in done.stdout + done.stderr


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_in_out_as_the_metadata_declares(bundle, no_network):
    check_network(ROOT / "bundles" / bundle)


def _case(folder: Path) -> tuple[Path, Path]:
    """A 48 x 48 x 3 CT-like volume with a lesion, and a one-slice box file around it."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    image = np.random.default_rng(1).normal(-800, 30, SHAPE)
    image[..., 1][(yy - 22) ** 2 + (xx - 24) ** 2 < 64] = 40
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), str(folder / "scan.nii.gz"))
    (folder / "box.json").write_text(json.dumps({"box": [12, 12, 1, 34, 34, 1]}))
    return folder / "scan.nii.gz", folder / "box.json"


#: the bundles whose exported zip also runs inference in a fresh process (about 35 s each on the CPU): the two whose
#: inference differs most from the others' (P2SAM's region of interest and two stages' configs, ProSeg's rater table
#: in the weights); every bundle's zip is built, checked and its TorchScript model run
FRESH_PROCESS = {"p2sam", "proseg"}


@pytest.mark.parametrize("bundle", sorted(set(BUNDLES) - set(TRAINED)))
def test_a_training_free_bundle_exports_its_configs_and_docs_without_weights(bundle, tmp_path):
    zip_path = export_bundle(bundle, tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
    for required in ("configs/inference.json", "configs/evaluate.json", "configs/metadata.json", "docs/README.md",
                     "LICENSE"):
        assert f"{bundle}/{required}" in names
    assert not [n for n in names if "/models/" in n] and verify_bundle_zip(zip_path) == {}
    with pytest.raises(InputError, match="no trained weights"):
        export_bundle(bundle, tmp_path / "dist2", torchscript=True)


@pytest.mark.parametrize("bundle", TRAINED)
def test_exported_zip_runs_inference_from_an_empty_folder_in_a_fresh_process(bundle, weights, tmp_path):
    zip_path = export_bundle(bundle, tmp_path / "dist", weights=weights[bundle], torchscript=True)
    version = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())["version"]
    assert zip_path.name == f"{bundle}_v{version}.zip"  # the name monai.bundle download --source github asks for
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unzipped")
    for required in ("configs/inference.json", "configs/metadata.json", "configs/train.json", "docs/README.md",
                     "LICENSE", "models/model.pt", "models/model.ts"):
        assert f"{bundle}/{required}" in names
    assert not [n for n in names if "/runs/" in n or "checkpoint" in n or "__pycache__" in n]
    unzipped = tmp_path / "unzipped" / bundle
    assert sorted(p.name for p in (tmp_path / "unzipped").iterdir()) == [bundle]
    assert set(verify_bundle_zip(zip_path)) == {f"{bundle}/models/model.pt", f"{bundle}/models/model.ts"}

    if bundle in FRESH_PROCESS:
        assert _run_unzipped(unzipped, tmp_path) == version

    # the TorchScript model: loads on its own, carries the metadata, gives the network's prediction shape
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(unzipped / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == version and json.loads(extra["inference.json"])
    test_image, test_args = network_test_inputs(unzipped)
    with torch.no_grad():
        prediction = scripted(test_image, *test_args.values())
    channels = json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert prediction.shape == (1, channels, *test_image.shape[2:])


def _run_unzipped(unzipped: Path, tmp_path: Path) -> str:
    """Inference of the unzipped bundle from its own folder in a fresh process; returns the version it recorded."""
    image, box = _case(tmp_path / "inputs")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         "--image", str(image), "--box", str(box), "--num_samples", "2"],
        cwd=unzipped, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = unzipped / "runs" / "inference"  # bundle_root is the unzipped folder, not the repository's bundles/
    ref = nib.load(image)
    for suffix in ("_mask", "_mean", "_uncertainty", "_variance"):
        img = nib.load(out / f"scan{suffix}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert nib.load(out / "scan_samples.nii.gz").shape == (*ref.shape, 2)
    record = json.loads((out / "scan.json").read_text())
    assert Path(record["weights"]) == unzipped / "models" / "model.pt"
    return record["bundle_version"]


def test_export_without_weights_and_with_a_hosting_url(weights, tmp_path):
    bundle = BUNDLES[0]
    zip_path = export_bundle(bundle, tmp_path, weights=weights[bundle], include_weights=False,
                             weights_url="https://example.org/releases/model.pt")
    with zipfile.ZipFile(zip_path) as archive:
        assert f"{bundle}/models/model.pt" not in archive.namelist()
        large_files = archive.read(f"{bundle}/large_files.yml").decode()
    import hashlib

    md5 = hashlib.md5(weights[bundle].read_bytes()).hexdigest()
    assert 'path: "models/model.pt"' in large_files and md5 in large_files and "https://example.org" in large_files


def test_export_refuses_incomplete_bundles(tmp_path, weights):
    source = ROOT / "bundles" / BUNDLES[0]
    with pytest.raises(InputError, match="not a bundle"):
        export_bundle("no_such_bundle", tmp_path)
    broken = tmp_path / "bundles" / BUNDLES[0]
    shutil.copytree(source, broken, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    if not (broken / "LICENSE").exists():
        shutil.copy(ROOT / "LICENSE", broken / "LICENSE")
    (broken / "docs" / "README.md").unlink()
    with pytest.raises(InputError, match=r"README.md: missing"):
        export_bundle(broken, tmp_path / "dist")
    shutil.copy(source / "docs" / "README.md", broken / "docs" / "README.md")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["required_packages_version"]["ambisam"] = "0.0.1"
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="must declare ambisam"):
        export_bundle(broken, tmp_path / "dist")
    with pytest.raises(InputError, match="weights file not found"):
        export_bundle(source, tmp_path / "dist", weights=tmp_path / "none.pt")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_export_refuses_weights_that_need_pickle_and_writes_no_zip(tmp_path):
    from conftest import pickled_checkpoint

    pickled = pickled_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(InputError, match=r"needs pickle to load \(it holds conftest.NotAWeight\).*is refused") as err:
        export_bundle("psam", tmp_path / "dist", weights=pickled)
    assert err.value.path == str(pickled)
    done = subprocess.run([sys.executable, "-m", "ambisam", "export", "psam", "--out", str(tmp_path / "dist"),
                           "--weights", str(pickled)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"ambisam: error: {pickled}: needs pickle to load")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dist").exists()


def test_export_command_line_bad_input_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ambisam", "export", "no_such_bundle", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("ambisam: error: no_such_bundle: not a bundle")


def test_exported_configs_are_flattened(tmp_path):
    """The bundles take the shared base by ``%`` macros relative to the repository root; the zip holds every config
    with those sections in it, so it needs no base beside it."""
    from ambisam.bundle import BASE_CONFIG_DIR

    zip_path = export_bundle(ROOT / "bundles" / "psam", tmp_path / "dist", include_weights=False)
    base = json.loads((BASE_CONFIG_DIR / "train.json").read_text())
    with zipfile.ZipFile(zip_path) as archive:
        names = [n for n in archive.namelist() if n.startswith("psam/configs/") and n.endswith(".json")]
        texts = {n: archive.read(n).decode() for n in names}
    assert {"psam/configs/train.json", "psam/configs/evaluate.json", "psam/configs/multi_gpu_train.json"} <= set(texts)
    for name, text in texts.items():
        assert '"%' not in text, name
    train = json.loads(texts["psam/configs/train.json"])
    assert train["train"] == base["train"] and train["network_def"]["_target_"] == "ambisam.networks.ProbabilisticSam"



@pytest.fixture
def small_zip(tmp_path) -> tuple[Path, Path]:
    """psam exported with a tiny stand-in for its weights (verify checks bytes, not the network): (zip, weights)."""
    small = tmp_path / "small.pt"
    torch.save({"w": torch.arange(4.0)}, small)
    return export_bundle("psam", tmp_path / "dist", weights=small), small


def _rewritten(zip_path: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """A copy of ``zip_path`` with the members in ``replace`` given new bytes (added when new)."""
    with zipfile.ZipFile(zip_path) as source, zipfile.ZipFile(out, "w") as copy:
        for info in source.infolist():
            copy.writestr(info, replace.pop(info.filename, None) or source.read(info.filename))
        for name, data in replace.items():
            copy.writestr(name, data)
    return out


def test_exported_zip_records_its_weights_sha256_and_verify_passes_it(small_zip, capsys):
    from ambisam.cli import main
    from ambisam.weights import file_sha256

    zip_path, small = small_zip
    with zipfile.ZipFile(zip_path) as archive:
        meta = json.loads(archive.read("psam/configs/metadata.json"))
    assert meta["weights_checksums"] == [{"path": "models/model.pt", "hash_val": file_sha256(small), "hash_type": "sha256"}]
    source_meta = json.loads((ROOT / "bundles" / "psam" / "configs" / "metadata.json").read_text())
    assert {k: v for k, v in meta.items() if k != "weights_checksums"} == source_meta
    assert verify_bundle_zip(zip_path) == {"psam/models/model.pt": file_sha256(small)}
    main(["verify", str(zip_path)])
    assert f"{zip_path}: 1 weights file(s) match the recorded checksums" in capsys.readouterr().out


def test_verify_refuses_a_zip_whose_weights_do_not_match(small_zip, tmp_path, capsys):
    from ambisam.cli import main

    zip_path, small = small_zip
    other = tmp_path / "other.pt"
    torch.save({"w": torch.arange(4.0) + 1}, other)
    tampered = _rewritten(zip_path, tmp_path / "tampered.zip", {"psam/models/model.pt": other.read_bytes()})
    with pytest.raises(InputError, match="does not match the recorded") as err:
        verify_bundle_zip(tampered)
    assert err.value.path == str(tampered / "psam" / "models" / "model.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(tampered)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"ambisam: error: {tampered / 'psam' / 'models' / 'model.pt'}: sha256 ")

    added = _rewritten(zip_path, tmp_path / "added.zip", {"psam/models/extra.pt": other.read_bytes()})
    with pytest.raises(InputError, match="without a recorded checksum") as err:
        verify_bundle_zip(added)
    assert err.value.path == str(added / "psam" / "models" / "extra.pt")


def test_verify_refuses_a_zip_lacking_a_recorded_weights_file(small_zip, tmp_path, capsys):
    from ambisam.cli import main

    zip_path, _ = small_zip
    lacking = tmp_path / "lacking.zip"
    with zipfile.ZipFile(zip_path) as source, zipfile.ZipFile(lacking, "w") as copy:
        for info in source.infolist():
            if info.filename != "psam/models/model.pt":
                copy.writestr(info, source.read(info.filename))
    with zipfile.ZipFile(lacking) as archive:  # still recorded in the metadata, absent from the zip
        assert "models/model.pt" in archive.read("psam/configs/metadata.json").decode()
        assert "psam/models/model.pt" not in archive.namelist()
    missing = lacking / "psam" / "models" / "model.pt"
    with pytest.raises(InputError, match="recorded in the checksums but missing from the zip") as err:
        verify_bundle_zip(lacking)
    assert err.value.path == str(missing)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(lacking)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ambisam: error: {missing}: recorded in the checksums but missing from the zip")
