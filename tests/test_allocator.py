"""The allocator setting: applied on glibc, never over the user's own setting, not at all when opted out."""

from __future__ import annotations

import platform

import pytest

from ambisam import allocator


@pytest.fixture
def fresh(monkeypatch):
    """The module as in a new process (it applies its settings once per process)."""
    monkeypatch.setattr(allocator, "_applied", None)
    for name in [n for n in allocator.os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    monkeypatch.delenv(allocator.OPT_OUT_VARIABLE, raising=False)
    return monkeypatch


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_keeps_freed_memory_with_every_setting(fresh):
    applied = allocator.keep_freed_memory()
    assert applied == {name: value for name, (_, value) in allocator.ALLOCATOR_SETTINGS.items()}
    assert allocator.keep_freed_memory() == applied  # once per process


def test_not_applied_over_the_users_own_allocator_setting(fresh):
    fresh.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert allocator.keep_freed_memory() == {}


def test_opt_out(fresh):
    fresh.setenv(allocator.OPT_OUT_VARIABLE, "0")
    assert allocator.keep_freed_memory() == {}


def test_other_c_libraries_are_left_alone(fresh):
    fresh.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() == {}
