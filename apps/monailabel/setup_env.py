"""Make (or reuse) the virtual environment that runs the MONAI Label server beside an ambisam install.

    python apps/monailabel/setup_env.py            # -> .venv-label/ at the repository root; prints its python

MONAI Label 0.8.5's dependency list cannot be installed into ambisam's own environment (it pins numpy<2 and
jsonschema<4 through pydicom-seg). This makes a small environment layered on the running one: a venv whose
``site-packages`` first holds MONAI Label and its server's packages (``server-requirements.txt``, installed with
``--no-deps``), then, through a ``.pth`` file, everything of the environment that runs this script (torch,
monai, ambisam, ...). Nothing of the base environment is changed or copied. The venv is rebuilt when the
requirements or the base environment change; a lock makes concurrent callers wait for one build.

Run it with the python of the environment that has ambisam installed (``.venv/bin/python``). Start the server with
the layered venv's ``bin/monailabel`` (on ``PATH``, as ``monailabel start_server ...``) or
``<venv>/bin/python -m monailabel.main start_server ...``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["REQUIREMENTS", "DEFAULT_VENV", "layered_venv", "venv_python"]

APP_DIR = Path(__file__).resolve().parent
#: MONAI Label and its server's packages, installed with --no-deps
REQUIREMENTS = APP_DIR / "server-requirements.txt"
#: the default location: the repository root's .venv-label/ (git-ignored)
DEFAULT_VENV = APP_DIR.parent.parent / ".venv-label"
_MARKER = ".ambisam-layered"


def venv_python(venv: str | os.PathLike) -> Path:
    """The python executable of a venv."""
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint(requirements: Path) -> str:
    base = sysconfig.get_paths()["purelib"]
    text = "\n".join([requirements.read_text(), sys.executable, base, sys.version])
    return hashlib.sha256(text.encode()).hexdigest()


def layered_venv(
    venv: str | os.PathLike = DEFAULT_VENV,
    requirements: str | os.PathLike = REQUIREMENTS,
    quiet: bool = True,
) -> Path:
    """Make ``venv`` (or reuse it when it is up to date) and return its python.

    Args:
        venv: where the layered venv goes.
        requirements: the packages to install into it (with ``--no-deps``).
        quiet: pass ``-q`` to pip.

    Returns:
        The path of the venv's python.

    Raises:
        RuntimeError: ``venv`` exists but was not made here; pip failed; or MONAI Label does not import afterwards
            (with pip's or python's output).
    """
    venv, requirements = Path(venv).absolute(), Path(requirements)
    python = venv_python(venv)
    fingerprint = _fingerprint(requirements)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / _MARKER
        if python.exists() and marker.is_file() and marker.read_text().strip() == fingerprint:
            return python
        if venv.exists():
            if not marker.is_file():  # never delete a folder this script did not make
                raise RuntimeError(f"{venv} exists and was not made by {Path(__file__).name}: move it, or pass --venv")
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        marker.write_text("incomplete\n")  # ours from now on: a failed build is rebuilt next time
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        base = sysconfig.get_paths()["purelib"]
        # an "import" line in a .pth file runs at start-up: addsitedir also reads the base's own .pth files
        # (the editable ambisam install among them); the layered venv's packages stay first on sys.path
        Path(site_packages, "_ambisam_base_env.pth").write_text(f"import site; site.addsitedir({base!r})\n")
        # the layered venv's python runs the base's pip (seen through the .pth) and installs into the layered venv
        pip = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-r", str(requirements)]
        done = subprocess.run(pip + (["-q"] if quiet else []), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"installing {requirements} into {venv} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        check = subprocess.run(
            [str(python), "-c", "import monailabel.main, monailabel.tasks.infer.bundle, ambisam, monai"],
            capture_output=True, text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"MONAI Label does not import in {venv}:\n{check.stderr[-3000:]}")
        marker.write_text(fingerprint + "\n")
        return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="where the layered venv goes")
    parser.add_argument("--requirements", default=str(REQUIREMENTS), help="packages installed with --no-deps")
    args = parser.parse_args(argv)
    print(layered_venv(args.venv, args.requirements, quiet=False))


if __name__ == "__main__":
    main()
