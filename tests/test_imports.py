"""Every module of the package imports on its own, whichever is imported first.

A bundle config names one module by dotted path and a script imports another; a circular import that the rest of
the suite happens to hide (because some other module was imported first) breaks exactly those users. Each module
is imported with every ``ambisam`` module dropped from ``sys.modules`` beforehand, in one process so that torch and
MONAI load once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ambisam

_PROBE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "ambisam" or m.startswith("ambisam.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    root = Path(ambisam.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # running it is the CLI, not an import
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first():
    names = _modules()
    assert "ambisam.outputs" in names and "ambisam.data.convert" in names and len(names) > 30
    done = subprocess.run([sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"modules that fail when imported first:\n{done.stdout}{done.stderr[-2000:]}"
