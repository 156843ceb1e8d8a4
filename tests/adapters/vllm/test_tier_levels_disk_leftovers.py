"""The disk level's three leftovers (tier_levels with a real host-tier directory, the fetch book, a real worker and its
files; the worker's reports go through the connector's own `absorb_worker_meta`):

1. a fetch thread killed by a BaseException that is not an Exception left every fetch it held or had queued
   unreported: pins and host slots held for good, the request waiting to its deadline;
2. a block the full disk declines was counted at each of the host tier's two offers (the cost of each offer:
   tests/core/test_disk_tier_decline.py);
3. the worker gave queued fetches up once the read in front of them had run 30 s, whatever the scheduler's deadline
   for them: now at the moment the scheduler takes them for stuck, its deadline plus STUCK_AFTER_S.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from kvsched.adapters.vllm.tier_fetches import STUCK_AFTER_S
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from tests.adapters.vllm.test_tier_levels_disk_order import CHAIN, spilling, written
from tests.adapters.vllm.test_tier_levels_disk_reads import BOUND_S, Engine

MAX_FETCH_RESTARTS = 3  # tier_levels_fetch's (imported there: the module is new with the fix)


class Killed(BaseException):
    """Not an Exception: what a library's SystemExit or asyncio's CancelledError does to the fetch thread."""


def one_block_a_chunk(e: Engine, tmp_path: Path) -> None:
    e.worker.cfg = LevelsConfig(disk_dir=str(tmp_path / "disk"), fetch_mb=1e-6)  # at least one block: one a chunk


def died(e: Engine) -> threading.Thread:
    """The worker's current fetch thread, once it has ended (bounded)."""
    thread: threading.Thread = e.worker.fetcher._thread
    thread.join(BOUND_S)
    assert not thread.is_alive(), "the fetch thread did not die"
    return thread


def kill_reads(e: Engine) -> list[bytes]:
    """Every disk read from now on kills the thread reading it; returns the keys it was asked for."""
    asked: list[bytes] = []

    def read(key: bytes) -> bytes | None:
        asked.append(key)
        raise Killed("a library gave up")

    e.files.read = read  # type: ignore[method-assign]
    return asked


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_fetch_thread_reports_the_chunk_it_held_and_its_queue_and_another_thread_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    e = Engine(tmp_path)
    one_block_a_chunk(e, tmp_path)
    e.turn("a", CHAIN[:3])
    good = e.files.read
    asked = kill_reads(e)
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    old = e.worker.fetcher
    with caplog.at_level(logging.ERROR, "vllm.kvsched.fp8_tier"):
        e.step()  # three chunks queued; the first read kills the thread (before or after the others are queued)
        died(e)
        e.report()
    assert asked == [CHAIN[0]]  # the chunk it held; the two behind it were never read
    assert not e.disk.reading and not e.book.slots, "the dead thread's fetches kept their pins and slots"
    assert e.conn.stats["levels_fetch_thread_deaths"] == 1 and caplog.text.count("died (Killed") == 1
    assert e.lv.counters["disk_read_failures"] == 3 and e.disk.match(CHAIN, 0, 3) == 3  # the files are kept
    assert e.worker.fetcher is not old and e.worker.fetcher.alive
    e.files.read = good  # type: ignore[method-assign]
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    e.step()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert e.lv.counters["disk_restored_blocks"] == 3 and not e.disk.reading


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_fetch_threads_that_keep_dying_are_not_restarted_for_ever_then_fetches_are_refused_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:2])
    kill_reads(e)
    with caplog.at_level(logging.ERROR, "vllm.kvsched.fp8_tier"):
        for deaths in range(1, MAX_FETCH_RESTARTS + 2):
            assert e.lv.promote("a", CHAIN, 0, 2, e.host) == 2
            e.step()
            died(e)
            e.report()
            assert not e.disk.reading and not e.book.slots
            assert e.conn.stats["levels_fetch_thread_deaths"] == deaths
    from kvsched.adapters.vllm.tier_levels_fetch import MAX_FETCH_RESTARTS as bound

    assert bound == MAX_FETCH_RESTARTS and e.worker.fetches.refusing
    assert caplog.text.count("died (Killed") == 2  # the first, and the last
    dropped = e.conn.stats["levels_dropped_fetch_jobs"]
    assert e.lv.promote("a", CHAIN, 0, 2, e.host) == 2
    e.step()
    e.report()  # refused in the step that planned them: nothing waits for a thread that is not there
    assert not e.disk.reading and not e.book.slots and e.conn.stats["levels_dropped_fetch_jobs"] == dropped + 1


def test_a_block_the_disk_declines_twice_in_one_eviction_counts_once(tmp_path: Path) -> None:
    """The disk holds x's blocks 0-2; the full host tier holds x only and must make room: x's block 3 is offered,
    declined, kept while another may go, offered again, declined again, and dropped (as with no disk level)."""
    lv, h = spilling(tmp_path, blocks=3, slots=4)
    lv.turn_finished("x", [(k, i) for i, k in enumerate(CHAIN[:3])], None)
    assert written(lv) == []
    h.demote("x", [(k, i) for i, k in enumerate(CHAIN[:4])], 0)
    assert len(h.demote("z", [(b"z" * 32, 9)], 0)) == 1
    assert CHAIN[3] not in h.slot_of and h.counters["declined_evictions"] == 1
    assert lv.stats()["disk_tier_spills_declined"] == 1, "one block declined twice counted as two"
    assert lv.disk is not None and lv.disk.counters["eviction_searches"] == 1  # the second offer searched nothing


def test_a_queued_fetch_is_kept_exactly_as_long_as_the_scheduler_counts_on_it(tmp_path: Path) -> None:
    """a's restore of blocks 0-2: the read of block 0 hangs. The request waits until the book's deadline; the book
    takes the fetches for stuck STUCK_AFTER_S later, and the worker gives the queued ones up then, not before (it
    gave them up once the read had run 30 s: 2 s and more before the book stopped counting on them)."""
    e = Engine(tmp_path)
    one_block_a_chunk(e, tmp_path)
    now = [100.0]
    e.worker.clock = e.book.clock = lambda: now[0]
    e.turn("a", CHAIN[:3])
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    gate, reading = e.gate_reads()
    fetches = e.step().fetches
    assert reading.wait(BOUND_S)
    deadline = e.book.slots[fetches[1].slot].deadline
    assert all(f.keep_s == pytest.approx(deadline + STUCK_AFTER_S - 100.0) for f in fetches)
    assert e.book.must_wait("r", fetches[1].key)  # the request waits until the deadline ...
    now[0] = deadline
    assert not e.book.must_wait("r", fetches[1].key)  # ... and no longer
    now[0] = deadline + STUCK_AFTER_S - 0.01
    e.book.expire()
    e.report()
    assert len(e.disk.reading) == 3 and len(e.book.slots) == 3, "given up while the scheduler still counted on it"
    assert e.book.counters["stuck_fetches"] == 0
    now[0] = deadline + STUCK_AFTER_S + 1e-6
    e.book.expire()
    assert e.book.counters["stuck_fetches"] == 3
    e.report()
    assert e.disk.reading == {CHAIN[0]: 1} and set(e.book.slots) == {fetches[0].slot}  # the hung read keeps its own
    assert e.conn.stats["levels_fetches_given_up"] == 2
    gate.set()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert not e.disk.reading and not e.book.slots and e.lv.counters["disk_restored_blocks"] == 1
