"""Outputs are written atomically, with the usual permissions, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ambisam.io import atomic_group, atomic_path, remove_stale_temporaries, write_json


def test_atomic_write_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "run.json", {"seed": 3})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"seed": 3}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_path_keeps_suffixes_and_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "case_mask.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_a_group_of_files_appears_together_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_group():
            write_json(tmp_path / "a.json", 1)
            assert list(tmp_path.iterdir())[0].name.startswith(".a.tmp-")  # written, not yet renamed
            with atomic_group():  # an inner group's files wait for the outer group
                write_json(tmp_path / "b.json", 2)
            raise RuntimeError("the case's third file failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_group():
        write_json(tmp_path / "a.json", 1)
        with atomic_group():
            write_json(tmp_path / "b.json", 2)
        assert not (tmp_path / "b.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_temporary_files_of_killed_processes_are_removed_by_the_next_write_into_the_folder(tmp_path):
    import subprocess
    import sys

    from ambisam.io import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".c0_mask.tmp-{dead.pid}-{_HOST}-x1y2.nii.gz",
        "alive": f".c0_mean.tmp-{os.getppid()}-{_HOST}-x1y2.nii.gz",  # a process that still runs
        "mine": f".c0_samples.tmp-{os.getpid()}-{_HOST}-x1y2.nii.gz",
        "other host": f".c0_variance.tmp-{dead.pid}-{_HOST}x-x1y2.nii.gz",  # its pid means nothing here
        "a user's": ".hidden.nii.gz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    write_json(tmp_path / "run.json", {})
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(names.values()) - {names["dead"]} | {"run.json"}
    assert remove_stale_temporaries(tmp_path) == []  # the sweep is idempotent


@pytest.mark.parametrize("kind, status", [("OutputError", 1), ("InputError", 2)])
def test_an_uncaught_input_or_output_error_ends_the_process_in_one_line(tmp_path, kind, status):
    """As ``python -m monai.bundle run`` shows it: MONAI wraps the error; the hook finds it and prints one line."""
    import subprocess
    import sys

    code = (f"from ambisam.errors import {kind}, install_excepthook\n"
            "install_excepthook()\n"
            "try:\n"
            f"    raise {kind}('/out/c1_mean.nii.gz', 'could not write the file: No space left on device')\n"
            "except Exception as e:\n"
            "    raise RuntimeError('Failed to evaluate workflow') from e\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == status
    assert done.stderr == "ambisam: error: /out/c1_mean.nii.gz: could not write the file: No space left on device\n"
