"""The disk level's failure modes at the engine boundary (tier_levels, tier_disk, tier_writer): what an exception in
its bookkeeping, a directory that goes away or cannot be written, or a hung disk do to the engine (found by review)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_blob import framed_len
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_levels import LevelOps, Publish, TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.adapters.vllm.tier_writer import BackgroundWriter
from kvsched.core.tier import TierConfig, TierDirectory
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of

IDENT = "ef" * 16
BLOCK = 1000
CHAIN = [bytes([i]) * 32 for i in range(8)]


def levels(tmp_path: Path, disk_gb: float | None = 1.0) -> TierLevels:
    return TierLevels(LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=disk_gb), IDENT, {"model": "t"}, BLOCK, 1)


def test_an_exception_in_the_disk_bookkeeping_switches_the_level_off_never_the_engine(tmp_path: Path,
                                                                                       caplog) -> None:
    """A turn's end and a host-tier eviction (inside a demotion) call the disk's bookkeeping on vLLM's step: what it
    raises is logged once and the disk level goes off; the step goes on."""
    lv = levels(tmp_path)
    assert lv.disk is not None

    def boom(*args: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    lv.disk.plan_writes = boom  # type: ignore[method-assign]
    host = TierDirectory(TierConfig(budget_bytes=1 * BLOCK), BLOCK, value_of=lambda owner: 0.0)
    host.on_evict = lv.on_host_evict
    host.demote("a", [(CHAIN[0], 0)])
    with caplog.at_level(logging.ERROR, logger="vllm.kvsched.fp8_tier"):
        host.demote("b", [(CHAIN[1], 1)])  # evicts a's block: a spill is planned, and raises
        assert lv.disk is None
        lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:3])], None)  # the level is off: nothing planned
        lv.session_ended("s")
    assert not lv.take_ops() and lv.counters["disk_level_errors"] == 1
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "without the disk level" in caplog.text


@pytest.mark.parametrize("where", ["turn", "end"])
def test_a_turns_end_or_a_sessions_end_that_raises_in_the_disk_is_contained(tmp_path: Path, where: str) -> None:
    lv = levels(tmp_path)
    assert lv.disk is not None
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:2])], None)
    lv.take_ops()

    def boom(*args: object) -> None:
        raise KeyError("corrupt books")

    if where == "turn":
        lv.disk.plan_writes = boom  # type: ignore[method-assign]
        lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:4])], None)
    else:
        lv.disk.drop_owner = boom  # type: ignore[method-assign]
        lv.session_ended("s")
    assert lv.disk is None and not lv.take_ops()
    lv.written([(CHAIN[0], True)], disk_full=True)  # late reports of the writes in flight: ignored
    assert "disk_tier_bytes" not in lv.stats()


def test_the_automatic_budget_counts_its_own_files_so_a_restart_deletes_none(tmp_path: Path, monkeypatch) -> None:
    """Found by review: with no size given, the budget was half the free space measured while the previous run's
    files took the rest, so every restart shrank it and deleted the KV the previous run wrote."""
    frame = framed_len(32, BLOCK)
    files = DiskFiles(tmp_path / "disk", IDENT, {})
    for k in CHAIN[:6]:  # a previous run filled its automatic budget: 6 blocks, with as much again free
        files.write(k, b"x" * frame)
    taken = os.stat(files.path(CHAIN[0])).st_blocks * 512  # a file takes whole file-system blocks
    monkeypatch.setattr(DiskFiles, "free_bytes", lambda self: 6 * taken)
    lv = levels(tmp_path, disk_gb=None)
    assert lv.disk is not None and lv.disk.capacity == 6
    assert lv.take_ops().deletes == [] and len(lv.disk.written) == 6


def test_a_read_only_directory_with_a_stale_tmp_file_starts_and_the_scan_skips_what_it_cannot_touch(
        tmp_path: Path, monkeypatch) -> None:
    """Found by review: the start-up scan unlinked a crashed write's .tmp file outside the guard around the
    directory, so on a read-only file system the engine failed to start."""
    files = DiskFiles(tmp_path / "disk", IDENT, {})
    files.write(CHAIN[0], b"x")
    stale = files.path(CHAIN[1]).with_name(".crashed.123.1.tmp")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    real_unlink = Path.unlink

    def read_only(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    assert files.scan() == [CHAIN[0]] and stale.exists()
    lv = levels(tmp_path)
    assert lv.disk is not None and list(lv.disk.written) == [CHAIN[0]]


@pytest.mark.parametrize("broken", ["scan", "free_bytes"])
def test_a_start_up_scan_or_free_space_query_that_fails_runs_without_the_disk_level(tmp_path: Path, monkeypatch,
                                                                                    caplog, broken: str) -> None:
    def fails(self: DiskFiles) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(DiskFiles, broken, fails)
    with caplog.at_level(logging.ERROR, logger="vllm.kvsched.fp8_tier"):
        lv = levels(tmp_path, disk_gb=None)
    assert lv.disk is None and not lv.take_ops() and "running without the disk level" in caplog.text


# ---- the worker side ----------------------------------------------------------------------------------------------
def worker(disk: Path) -> TierLevelsWorker:
    return TierLevelsWorker(LevelsConfig(disk_dir=str(disk)), IDENT, {"model": "t"}, 0, 1,
                            TierStore(views_of(caches()), "quantize"))


def publish(w: TierLevelsWorker, keys: list[bytes]) -> list[tuple[bytes, bool]]:
    w.before_stores(LevelOps(publishes=[Publish(k, i % 8, True, False) for i, k in enumerate(keys)]))
    assert w.writer.flush(10.0)
    return w.report()[0]


def test_a_directory_removed_while_running_is_made_again(tmp_path: Path, caplog) -> None:
    """Found by review: a write made only the 2-hex subdirectory again, so once DIR/<identity> was removed every
    later write failed, each with its own WARNING."""
    w = worker(tmp_path / "disk")
    assert all(ok for _, ok in publish(w, CHAIN[:2]))
    shutil.rmtree(tmp_path / "disk")
    with caplog.at_level(logging.WARNING, logger="vllm.kvsched.fp8_tier"):
        assert all(ok for _, ok in publish(w, CHAIN[2:6]))
    assert w.files is not None and w.files.path(CHAIN[5]).exists() and (w.files.dir / "IDENTITY.json").exists()
    assert not caplog.records and w.counters["disk_write_failures"] == 0


def test_a_write_failure_is_logged_once_per_kind_and_every_one_counted(tmp_path: Path, caplog) -> None:
    w = worker(tmp_path / "disk")
    assert w.files is not None
    codes = iter([errno.EIO] * 20 + [errno.EACCES] * 20)

    def fails(key: bytes, blob: bytes) -> None:
        code = next(codes)
        raise OSError(code, os.strerror(code))

    w.files.write = fails  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="vllm.kvsched.fp8_tier"):
        for i in range(5):
            assert not any(ok for _, ok in publish(w, [bytes([i, j]) * 16 for j in range(8)]))
    assert w.counters["disk_write_failures"] == 40
    assert len(caplog.records) == 2 and "Input/output" in caplog.records[0].getMessage()


def test_the_writers_queue_is_bounded_in_bytes_for_jobs_holding_copies() -> None:
    """Found by review: bounded by job count only (4096), a hung disk grew host memory by every step's snapshot."""
    gate = threading.Event()
    wr = BackgroundWriter("test-writer", max_bytes=100)
    assert wr.submit(gate.wait, 60) and wr.submit(lambda: None, 60)  # 60 queued: under the bound, taken
    assert not wr.submit(lambda: None, 1) and not wr.has_room()  # 120 queued: refused, counted
    assert wr.submit(lambda: None)  # a job holding nothing (a delete) is bounded by the job count only
    assert wr.counters["dropped_jobs"] == 1 and wr.queued_bytes == 120
    gate.set()
    assert wr.flush(10.0) and wr.queued_bytes == 0 and wr.submit(lambda: None, 500)  # one large job, alone, goes


def test_a_hung_disk_drops_writes_past_the_byte_bound_and_reports_them_failed(tmp_path: Path) -> None:
    w = worker(tmp_path / "disk")
    assert w.files is not None
    gate = threading.Event()
    real_write = w.files.write
    w.files.write = lambda key, blob: (gate.wait(), real_write(key, blob))  # type: ignore[method-assign]
    w.writer.max_bytes = 3 * 8 * w.tier.payload_len  # three steps of 8 blocks
    steps = [[bytes([i, j]) * 16 for j in range(8)] for i in range(6)]
    for keys in steps:
        w.before_stores(LevelOps(publishes=[Publish(k, j, True, False) for j, k in enumerate(keys)]))
    assert w.writer.queued_bytes == w.writer.max_bytes and w.writer.backlog <= 3
    assert w.counters["dropped_write_jobs"] == 3  # no copy made for them: the queue had no room
    dropped = w.report()[0]  # the drops are reported failed at once: the scheduler's pending writes end
    assert sorted(dropped) == sorted((k, False) for keys in steps[3:] for k in keys)
    gate.set()
    assert w.writer.flush(10.0) and w.writer.queued_bytes == 0
    assert sorted(w.report()[0]) == sorted((k, True) for keys in steps[:3] for k in keys)


def test_the_disk_budget_counts_the_file_system_blocks_its_files_take(tmp_path: Path) -> None:
    """Found by review: the budget counted frame bytes, not the whole file-system blocks each file takes: the test
    model's frames (8,208 bytes of KV) take 12 KiB on a 4 KiB-block file system, 48% past the size given. The budget
    now counts what the files take, as the start-up scan's `found_bytes` does (and the disk's free space)."""
    payload = 8208
    frame = framed_len(32, payload)
    probe = DiskFiles(tmp_path / "probe", IDENT, {})
    probe.write(CHAIN[0], b"x" * frame)
    taken = os.stat(probe.path(CHAIN[0])).st_blocks * 512  # what the file system says one file takes
    assert taken > frame  # else this file system does not show the difference
    lv = TierLevels(LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=6 * taken / 2**30), IDENT, {"model": "t"},
                    payload, 1)
    assert lv.disk is not None and lv.disk.capacity == 6 and lv.disk.block_bytes == taken
    files = DiskFiles(tmp_path / "disk", IDENT, {})
    for k in CHAIN[:6]:
        files.write(k, b"x" * frame)
    assert len(files.scan()) == 6 and files.found_bytes == 6 * taken == lv.disk.capacity * lv.disk.block_bytes


@pytest.mark.parametrize(("reported", "unit"), [(4096, 4096), (1 << 20, 64 << 10), (4 << 20, 64 << 10), (512, 512)])
def test_the_allocation_unit_is_the_fragment_size_at_most_64_kib(tmp_path, monkeypatch, reported, unit) -> None:
    """Found by review: network file systems report their transfer size as the fragment size (NFS 1 MiB, CephFS
    4 MiB); counted as each file's allocation it made a budget 4-340x smaller than the files take."""
    import os
    from types import SimpleNamespace

    from kvsched.adapters.vllm import tier_disk

    monkeypatch.setattr(os, "statvfs", lambda _p: SimpleNamespace(f_frsize=reported))
    assert tier_disk.allocation_unit(tmp_path) == unit
