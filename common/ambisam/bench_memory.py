"""Inference's peak memory on a large volume with a small prompted region: peak RSS of the bundle run, as a user runs it.

A generated CT (``int16``, default ``512 x 512 x 300``) and a box over a few slices (default 4) go through a
bundle's ``configs/inference.json`` with ``python -m monai.bundle run`` in a fresh child process; its peak resident
memory is its own ``ru_maxrss`` (``os.wait4``) once it has exited (the parent does not count: it only writes the
inputs). The weights are the bundle's network as initialised (seeded), saved as ``model.pt``: memory does not depend
on training. Run as ``python -m ambisam bench memory`` (``--slices 600``, ``--num_samples 32`` for the larger cases;
``--root`` runs another checkout's bundles and package, e.g. to measure the main branch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_memory_case", "inference_peak_rss", "format_memory"]

#: the repository root of this checkout (``common/ambisam/`` is two levels down)
_ROOT = Path(__file__).resolve().parents[2]


def write_memory_case(folder: Path, size: int = 512, slices: int = 300, box_slices: int = 4) -> tuple[Path, Path]:
    """A CT-like ``int16`` volume with a bright ellipsoid, and a box JSON over ``box_slices`` of its middle slices.

    Args:
        folder: where to write ``ct.nii.gz`` and ``box.json``.
        size: in-plane size (``size x size``).
        slices: slices ``D``.
        box_slices: prompted slices (the box's extent along the last axis).

    Returns:
        ``(image, box)`` paths.
    """
    from ambisam.io import write_json, write_nifti

    rng = np.random.default_rng(0)
    z0 = slices // 2 - box_slices // 2
    vol = rng.normal(-700, 60, (size, size, slices)).astype(np.int16)
    lo, hi = size // 2 - size // 8, size // 2 + size // 8
    vol[lo:hi, lo:hi, z0 : z0 + box_slices] = 40  # a soft-tissue block where the box is
    image = write_nifti(folder / "ct.nii.gz", vol, np.diag([0.7, 0.7, 1.5, 1.0]))
    box = write_json(folder / "box.json", {"box": [lo, lo, z0, hi - 1, hi - 1, z0 + box_slices - 1]})
    return image, box


def _initialised_weights(bundle: str, path: Path, root: Path) -> Path:
    """The bundle's network as initialised (seed 0), saved as a plain state dict (what ``require_weights`` loads)."""
    code = (
        "import sys, torch\n"
        "from monai.bundle import ConfigParser\n"
        "torch.manual_seed(0)\n"
        "p = ConfigParser(); p.read_config(sys.argv[1])\n"
        "torch.save(p.get_parsed_content('network_def').state_dict(), sys.argv[2])\n"
    )
    config = root / "bundles" / bundle / "configs" / "inference.json"
    subprocess.run([sys.executable, "-c", code, str(config), str(path)], cwd=root, env=_env(root), check=True)
    return path


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "common"), *filter(None, [env.get("PYTHONPATH", "")])])
    return env


def inference_peak_rss(
    bundle: str = "psam",
    size: int = 512,
    slices: int = 300,
    box_slices: int = 4,
    num_samples: int = 16,
    root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Peak RSS of one ``python -m monai.bundle run --config_file bundles/<bundle>/configs/inference.json`` run.

    Args:
        bundle: the bundle (its ``inference.json``).
        size: in-plane size of the generated CT.
        slices: its slices.
        box_slices: the slices the box prompts.
        num_samples: N.
        root: the checkout whose bundles and ``common/`` package run (default: this one).
        work_dir: where the inputs, weights and outputs go (default: a temporary folder, removed afterwards).

    Returns:
        The settings, ``peak_rss_mib`` (the child's), ``seconds``, the command and the written files' MiB.

    Raises:
        subprocess.CalledProcessError: the bundle run failed (its output is printed).
    """
    root = Path(root or _ROOT).resolve()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        folder = Path(tmp)
        image, box = write_memory_case(folder, size, slices, box_slices)
        weights = _initialised_weights(bundle, folder / "model.pt", root)
        out = folder / "out"
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   f"bundles/{bundle}/configs/inference.json", "--image", str(image), "--box", str(box),
                   "--ckpt_path", str(weights), "--output_dir", str(out), "--num_samples", str(num_samples)]
        start = time.time()
        with open(folder / "run.log", "w+") as log:
            child = subprocess.Popen(command, cwd=root, env=_env(root), stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (not the weights writer's)
            child.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.time() - start
            if child.returncode:
                log.seek(0)
                print(log.read()[-8000:], file=sys.stderr)
                raise subprocess.CalledProcessError(child.returncode, command)
        peak = usage.ru_maxrss  # KiB on Linux
        written = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    return {
        "bundle": bundle, "shape": [size, size, slices], "box_slices": box_slices, "num_samples": num_samples,
        "root": str(root), "peak_rss_mib": round(peak / 1024, 1), "seconds": round(seconds, 1),
        "output_mib": round(written, 1),
        "command": " ".join(["python", *command[1:]]),
    }


def format_memory(r: dict[str, Any]) -> str:
    """One line: shape, N, prompted slices, peak RSS in GiB and MiB, seconds."""
    shape = "x".join(str(v) for v in r["shape"])
    return (f"{r['bundle']} inference, {shape} CT, box over {r['box_slices']} slices, N={r['num_samples']}: "
            f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB ({r['peak_rss_mib']:.0f} MiB), {r['seconds']:.0f} s, "
            f"outputs {r['output_mib']:.0f} MiB")


if __name__ == "__main__":
    result = inference_peak_rss()
    print(format_memory(result))
    print(json.dumps(result))
