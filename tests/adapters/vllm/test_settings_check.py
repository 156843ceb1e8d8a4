"""The engine side's KVSCHED_* settings are refused at start-up like the policy core's: one line naming each."""

from __future__ import annotations

import pytest

from kvsched.adapters.vllm.settings_check import engine_setting_errors

ENGINE_VARS = ("KVSCHED_CPU_ISA", "KVSCHED_TIER_FAULT_EVERY", "KVSCHED_DISK_TIER_DIR", "KVSCHED_DISK_TIER_GB",
               "KVSCHED_STORE_URL", "KVSCHED_STORE_KV_TTL_S", "KVSCHED_STORE_STATE_TTL_S", "KVSCHED_INFER_SESSIONS",
               "KVSCHED_GHOST", "KVSCHED_TIER_FETCH_MB")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ENGINE_VARS:
        monkeypatch.delenv(var, raising=False)


def test_well_formed_settings_give_no_error(monkeypatch, tmp_path):
    assert engine_setting_errors() == []
    for var, value in (("KVSCHED_CPU_ISA", "avx2"), ("KVSCHED_TIER_FAULT_EVERY", "5"),
                       ("KVSCHED_DISK_TIER_DIR", str(tmp_path)), ("KVSCHED_DISK_TIER_GB", "1"),
                       ("KVSCHED_STORE_URL", "redis://127.0.0.1:6379/0"), ("KVSCHED_STORE_KV_TTL_S", "60"),
                       ("KVSCHED_GHOST", "python"), ("KVSCHED_TIER_FETCH_MB", "16")):
        monkeypatch.setenv(var, value)
    assert engine_setting_errors() == []
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

    assert LevelsConfig.from_extra({}).fetch_bytes == 16 * 2**20


@pytest.mark.parametrize(("var", "value", "named"), [
    ("KVSCHED_CPU_ISA", "sse9", "KVSCHED_CPU_ISA"),
    ("KVSCHED_TIER_FAULT_EVERY", "-2", "KVSCHED_TIER_FAULT_EVERY"),
    ("KVSCHED_TIER_FAULT_EVERY", "often", "KVSCHED_TIER_FAULT_EVERY"),
    ("KVSCHED_DISK_TIER_GB", "2", "--kvsched-disk-tier-dir"),  # a size without a directory
    ("KVSCHED_STORE_URL", "http://x", "http://x"),
    ("KVSCHED_STORE_KV_TTL_S", "0", "KVSCHED_STORE_KV_TTL_S"),
    ("KVSCHED_STORE_STATE_TTL_S", "soon", "KVSCHED_STORE_STATE_TTL_S"),
    ("KVSCHED_INFER_SESSIONS", "maybe", "KVSCHED_INFER_SESSIONS"),  # the policy core's, in the same list
    ("KVSCHED_GHOST", "fast", "KVSCHED_GHOST='fast'"),
    ("KVSCHED_TIER_FETCH_MB", "0", "KVSCHED_TIER_FETCH_MB must be > 0"),
    ("KVSCHED_TIER_FETCH_MB", "nan", "KVSCHED_TIER_FETCH_MB must be > 0"),
    ("KVSCHED_TIER_FETCH_MB", "lots", "KVSCHED_TIER_FETCH_MB must be a number of MiB"),
])
def test_each_malformed_setting_is_one_error_naming_it(monkeypatch, var, value, named):
    monkeypatch.setenv(var, value)
    errors = engine_setting_errors()
    assert len(errors) == 1 and named in errors[0], errors


@pytest.mark.parametrize("below", ["", "/sub"])
def test_a_disk_directory_that_is_a_file_is_refused_naming_the_variable_or_the_flag(monkeypatch, tmp_path, below):
    """Found by review: a regular file given as the disk level's directory (or as a parent of it) was accepted and
    the level silently dropped at run time."""
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
    from kvsched.core.disk_tier import DiskConfigError

    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    monkeypatch.setenv("KVSCHED_DISK_TIER_DIR", f"{afile}{below}")
    errors = engine_setting_errors()
    assert len(errors) == 1 and errors[0].startswith("KVSCHED_DISK_TIER_DIR: ") and "not a directory" in errors[0]
    monkeypatch.delenv("KVSCHED_DISK_TIER_DIR")
    with pytest.raises(DiskConfigError, match="^--kvsched-disk-tier-dir: .*not a directory"):
        LevelsConfig.from_extra({"disk_dir": f"{afile}{below}"})
    assert LevelsConfig.from_extra({"disk_dir": str(tmp_path / "new" / "dir")}).disk_dir  # made at start


def test_a_disk_directory_under_a_parent_this_user_cannot_search_is_left_to_the_levels_guard(monkeypatch, tmp_path):
    """Found by review: the directory check's `exists()` raised PermissionError for a parent the server's user may
    not search, out of the start-up checks (a traceback); before the check, that only turned the disk level off."""
    from pathlib import Path

    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

    locked = tmp_path / "locked"
    exists = Path.exists

    def guarded(self):
        if locked in (self, *self.parents):
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self)

    monkeypatch.setattr(Path, "exists", guarded)
    monkeypatch.setenv("KVSCHED_DISK_TIER_DIR", str(locked / "sub" / "kv"))
    assert engine_setting_errors() == []
    assert LevelsConfig.from_extra({"disk_dir": str(locked / "sub" / "kv")}).disk_dir
