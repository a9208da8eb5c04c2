"""Outputs are written atomically, with the usual permissions, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ambisam.io import atomic_path, write_json


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
