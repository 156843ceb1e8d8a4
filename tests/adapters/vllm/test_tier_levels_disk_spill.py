"""The disk level's three known losses (tier_levels with a real host-tier directory, the fetch book, a real worker and
its files; the worker's reports go through the connector's own `absorb_worker_meta`):

1. a spill the full disk declines lost the block from both tiers: the host tier freed it anyway;
2. a fetch a worker never reports (its read hung) kept its pin and host slot for good, and so did every fetch queued
   behind it on the worker's one fetch thread;
3. a fetch dropped (a full fetch queue) or shut down was reported as a failed read: the scheduler forgot and deleted
   a good file.
"""

from __future__ import annotations

from pathlib import Path

from kvsched.adapters.vllm.tier_levels import Spill
from tests.adapters.vllm.test_tier_levels_disk_order import CHAIN, host, levels, written
from tests.adapters.vllm.test_tier_levels_disk_reads import BOUND_S, Engine


def test_a_spill_the_full_disk_declines_stays_in_the_host_tier_and_another_block_goes(tmp_path: Path) -> None:
    """The disk holds x's blocks 0-2 and nothing else; the full host tier evicts x's block 3 (x its least recent
    session): no room on disk (a session's spill never evicts its own blocks). y's tail goes instead: to disk, which
    makes room from x (block 2, which the host tier still holds)."""
    lv = levels(tmp_path, blocks=3)
    h = host(slots=6)
    h.on_evict = lv.on_host_evict
    ys = [bytes([100 + i]) * 32 for i in range(3)]
    lv.turn_finished("x", [(k, i) for i, k in enumerate(CHAIN[:3])], None)
    assert written(lv) == [] and lv.disk is not None
    h.demote("x", [(k, i) for i, k in enumerate(CHAIN[:4])], 0)
    h.demote("y", [(k, 10 + i) for i, k in enumerate(ys[:2])], 0)  # the host tier is full
    assert len(h.demote("z", [(ys[2], 20)], 0)) == 1
    assert h.keys_of["x"] == CHAIN[:4], "x's block 3 left the host tier though the disk declined it"
    ops = lv.take_ops()
    assert ops.spills == [Spill(ys[1], 5)] and ops.deletes == [CHAIN[2]]  # y1, from its slot (x took 0-3, y 4-5)
    assert lv.stats()["disk_tier_spills_declined"] == 1 and h.counters["declined_evictions"] == 0


def test_fetches_queued_behind_a_hung_read_are_given_up_and_release_their_pins(tmp_path: Path) -> None:
    """a's restore of blocks 0-2 from disk: the read of block 0 hangs. Once the scheduler stops counting on them
    (`Fetch.keep_s`, the worker's clock: test_tier_levels_disk_leftovers), blocks 1-2, still queued, are given up:
    reported unfilled, their pins and host slots released, their files kept; a fetch planned meanwhile is given up
    at its own time. Block 0's pin and slot stay until its read returns (it may still write its slot); the given-up
    blocks are never read."""
    e = Engine(tmp_path)
    now = [0.0]
    e.worker.clock = e.book.clock = lambda: now[0]
    e.turn("a", CHAIN[:3])
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    gate, reading = e.gate_reads()
    read: list[bytes] = []
    slow = e.files.read
    e.files.read = lambda key: read.append(key) or slow(key)  # type: ignore[method-assign]
    fetches = e.step().fetches
    assert reading.wait(BOUND_S) and len(e.disk.reading) == 3
    e.report()
    assert len(e.disk.reading) == 3 and len(e.book.slots) == 3  # not yet overdue: nothing given up
    now[0] += fetches[1].keep_s
    e.report()
    assert e.disk.reading == {CHAIN[0]: 1}, "fetches that never ran kept their pins"
    assert e.lv.stats()["disk_tier_reading_blocks"] == 1  # the hung read's pin, shown
    assert set(e.book.slots) == {fetches[0].slot} and e.conn.stats["levels_fetches_given_up"] == 2
    assert e.disk.match(CHAIN, 0, 3) == 3 and all(e.files.path(k).exists() for k in CHAIN[:3])  # good files kept
    assert e.lv.promote("a", CHAIN, 1, 2, e.host) == 2  # planned while the read hangs
    later = e.step().fetches
    e.report()
    assert len(e.disk.reading) == 3 and e.conn.stats["levels_fetches_given_up"] == 2  # counted on till their time
    now[0] += later[0].keep_s
    e.report()
    assert e.disk.reading == {CHAIN[0]: 1} and e.conn.stats["levels_fetches_given_up"] == 4
    gate.set()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert not e.disk.reading and not e.book.slots and read == [CHAIN[0]]  # the others were never read
    assert e.lv.counters["disk_restored_blocks"] == 1 and e.host.match(CHAIN, 0, 3) == [fetches[0].slot]


def test_a_fetch_chunk_that_raises_is_reported_and_releases_its_pins(tmp_path: Path) -> None:
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:2])
    assert e.lv.promote("a", CHAIN, 0, 2, e.host) == 2

    def broken(*args: object) -> bool:
        raise RuntimeError("a bug in the fill")

    e.worker._fill_safely = broken  # type: ignore[method-assign,assignment]
    e.step()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert not e.disk.reading and not e.book.slots and e.conn.stats["levels_failed_fetch_jobs"] == 1
    assert e.disk.match(CHAIN, 0, 2) == 2  # the files are not at fault


def test_a_dropped_fetch_keeps_its_good_file(tmp_path: Path) -> None:
    """A full fetch queue drops the chunk: reported unfilled (the blocks are recomputed, the pins go), and the files
    stay on disk, still indexed."""
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:3])
    e.worker.fetcher.submit = lambda job, nbytes=0: False  # type: ignore[method-assign]
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    e.step()
    e.report()
    assert not e.disk.reading and not e.book.slots and e.lv.counters["disk_read_failures"] == 3
    assert e.disk.match(CHAIN, 0, 3) == 3 and all(e.files.path(k).exists() for k in CHAIN[:3]), "a good file went"


def test_a_fetch_queued_at_shutdown_keeps_its_good_file(tmp_path: Path) -> None:
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:3])
    e.worker.close(flush_s=BOUND_S)
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 3
    e.step()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert not e.disk.reading and not e.book.slots and e.lv.counters["disk_restored_blocks"] == 0
    assert e.disk.match(CHAIN, 0, 3) == 3 and all(e.files.path(k).exists() for k in CHAIN[:3]), "a good file went"
