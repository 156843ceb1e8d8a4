"""Two engines of one model given one --kvsched-disk-tier-dir (found by review, /tmp/rev_tierw r6: the second one's
start-up scan removed every .tmp file under DIR/<identity>/, the first one's writes in flight among them, which then
failed): one engine owns the directory, the other runs without the disk level and says who holds it, and a scan
spares the temporary files of writers still alive."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

from kvsched.adapters.vllm import tier_disk
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_levels import TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

IDENT = "cd" * 16
KEY = b"\x07" * 32


def levels(root: Path, ident: str = IDENT) -> TierLevels:
    return TierLevels(LevelsConfig(disk_dir=str(root), disk_gb=1.0), ident, {"model": "m"}, 1000, 1)


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_a_start_up_scan_spares_a_live_writers_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """The reviewer's interleaving: engine B's start-up scan runs between engine A's write and its rename."""
    a = DiskFiles(tmp_path, IDENT, {"model": "m"})
    stale = a.dir / "07" / f".{KEY.hex()}.r0.kv.{dead_pid()}.1.tmp"  # a crashed engine's, at an earlier run
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    real_replace = os.replace
    seen: list[bool] = []

    def replace_after_peer_start(src, dst):
        seen.append(Path(src).exists())
        DiskFiles(tmp_path, IDENT, {"model": "m"}).scan()  # engine B starts now
        seen.append(Path(src).exists())
        return real_replace(src, dst)

    monkeypatch.setattr(tier_disk.os, "replace", replace_after_peer_start)
    a.write(KEY, b"framed block")
    monkeypatch.setattr(tier_disk.os, "replace", real_replace)
    assert seen == [True, True] and a.read(KEY) == b"framed block"
    assert not stale.exists()  # a dead writer's leftover still goes


def test_a_second_engine_on_the_same_directory_runs_without_the_disk_level(tmp_path: Path, caplog) -> None:
    first = levels(tmp_path)
    assert first.disk is not None
    with caplog.at_level(logging.WARNING, logger="vllm.kvsched.fp8_tier"):
        second = levels(tmp_path)  # the engine keeps serving: no exception
    assert second.disk is None
    assert f"{tmp_path / IDENT} is in use by another engine" in caplog.text and f"pid {os.getpid()}" in caplog.text
    assert levels(tmp_path, "ef" * 16).disk is not None  # another model's engine has its own subdirectory
    del first, second
    gc.collect()
    assert levels(tmp_path).disk is not None  # the first engine is gone (a restart): its directory is free again


def test_an_engine_started_while_another_held_the_directory_takes_it_once_freed(tmp_path: Path, caplog) -> None:
    """Found by review: the claim was tried once, at start, so in a rolling update (the old engine draining while
    its replacement starts) the replacement never had the disk level. It tries again every DISK_RETRY_S, quietly."""
    from kvsched.adapters.vllm.tier_levels import DISK_RETRY_S

    old = levels(tmp_path)
    old.disk_files.write(KEY, b"the old engine's block")
    now = [1000.0]
    new = levels(tmp_path)
    new.clock = lambda: now[0]
    new._disk_retry_at = now[0] + DISK_RETRY_S  # as made at start, on this clock
    assert new.disk is None
    caplog.clear()  # the start's warning said it
    with caplog.at_level(logging.WARNING, logger="vllm.kvsched.fp8_tier"):
        now[0] += DISK_RETRY_S
        new.take_ops()  # the old engine still runs: no level, no second warning
        assert new.disk is None and "in use" not in caplog.text
        del old
        gc.collect()  # the old engine is gone: its lock with it
        new.take_ops()  # not yet due
        assert new.disk is None
        now[0] += DISK_RETRY_S
        new.take_ops()
    assert new.disk is not None and new.disk.holds(KEY)  # the old engine's files are indexed: a restart reads them
    assert new.disk_files.read(KEY) == b"the old engine's block"
