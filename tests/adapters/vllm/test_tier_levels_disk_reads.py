"""A block the disk level is reading for a restore keeps its file until every worker's fetch of it is over
(tier_levels with a real host-tier directory, the fetch book, a real worker and its files; the worker's reports go
through the connector's own `absorb_worker_meta`).

The reproducer: a's restore of block 2 is queued on the worker's fetch thread (a slow disk); the next step's turn end
of b needs room on the full disk, and a, the only other session, lost its tail, block 2: the worker deleted the file
before its fetch read it, and the block was recomputed (a lost hit, never wrong KV: the frame's checks stay). The pin
goes on every path: the fetch filled its slot, failed, was dropped, or never ran; an exception in the restore."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_fetches import FetchBook
from kvsched.adapters.vllm.tier_levels import DISK, LevelOps
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta
from kvsched.adapters.vllm.tier_stats import absorb_worker_meta
from kvsched.core.tier import TierConfig, TierDirectory
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of
from tests.adapters.vllm.test_tier_levels_disk_order import BLOCK, CHAIN, IDENT, host, levels

BOUND_S = 60.0  # never reached unless the code under test hangs
B = [bytes([200 + i]) * 32 for i in range(3)]


class Engine:
    """The scheduler's levels, host tier and fetch book, and one worker on the same directory."""

    def __init__(self, tmp_path: Path, blocks: int = 3, slots: int = 6) -> None:
        self.lv = levels(tmp_path, blocks)
        self.host = host(slots)
        self.host.on_evict = self.lv.on_host_evict
        self.book = FetchBook(self.host, 1, BLOCK)
        self.lv.on_fetch = self.book.started
        self.worker = TierLevelsWorker(LevelsConfig(disk_dir=str(tmp_path / "disk")), IDENT, {"model": "t"}, 0, 1,
                                       TierStore(views_of(caches(seed=7)), "quantize"))
        self.conn = SimpleNamespace(fetches=self.book, levels=self.lv, stats=Counter(), disabled_reason="")
        assert self.worker.files is not None and self.lv.disk is not None
        self.files, self.disk = self.worker.files, self.lv.disk

    def step(self) -> LevelOps:
        """One engine step's level work on the worker (deletes and writes queued, fetches started)."""
        ops = self.lv.take_ops()
        self.worker.before_stores(ops)
        self.worker.start_fetch(ops)
        return ops

    def report(self) -> None:
        """The worker's report of the step, taken in by the scheduler as the connector does."""
        meta = TierWorkerMeta()
        self.worker.fill(meta)
        absorb_worker_meta(self.conn, meta)

    def turn(self, owner: str, keys: list[bytes]) -> LevelOps:
        """`owner`'s turn ends holding `keys` (pool blocks 0..): written to disk, reported."""
        self.lv.turn_finished(owner, [(k, i) for i, k in enumerate(keys)], None)
        ops = self.step()
        assert self.worker.writer.flush(BOUND_S)
        self.report()
        return ops

    def gate_reads(self) -> tuple[threading.Event, threading.Event]:
        """The worker's disk reads wait for the first event; the second is set once one is waiting."""
        gate, reading, read = threading.Event(), threading.Event(), self.files.read

        def slow(key: bytes) -> bytes | None:
            reading.set()
            assert gate.wait(BOUND_S), "the test never opened the gate"
            return read(key)

        self.files.read = slow  # type: ignore[method-assign]
        return gate, reading


def test_a_later_steps_eviction_does_not_delete_a_file_a_queued_fetch_is_about_to_read(tmp_path: Path) -> None:
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:3])
    assert e.disk.match(CHAIN, 0, 8) == 3 and e.files.path(CHAIN[2]).exists()
    assert e.lv.promote("a", CHAIN, 2, 6, e.host) == 1  # the pool holds blocks 0-1
    gate, reading = e.gate_reads()
    (fetch,) = e.step().fetches
    assert fetch.key == CHAIN[2] and fetch.source == DISK and reading.wait(BOUND_S)  # the read is under way
    ops = e.turn("b", B[:1])  # the next step: b's turn end needs room on the full disk
    assert CHAIN[2] not in ops.deletes and e.files.path(CHAIN[2]).exists(), "a file being read was deleted"
    assert ops.deletes == [] and ops.publishes == []  # b's write finds no room: not written
    gate.set()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert e.lv.counters["disk_restored_blocks"] == 1 and e.lv.counters["disk_read_failures"] == 0
    assert e.host.match(CHAIN, 2, 1) == [fetch.slot] and e.worker.tier.slot_payload(fetch.slot) is not None
    assert not e.disk.reading  # read: block 2 may go again, b's next turn takes it
    assert e.turn("b", B[:1]).deletes == [CHAIN[2]] and not e.files.path(CHAIN[2]).exists()


def test_a_fetch_that_fails_or_is_dropped_releases_its_pin(tmp_path: Path) -> None:
    """A torn file: the frame's checks fail, the block is recomputed and its file deleted (as before), the pin goes.
    A fetch queue that drops the chunk: reported unfilled at once, the pin goes (its file, good, stays:
    test_tier_levels_disk_spill)."""
    e = Engine(tmp_path, blocks=4)
    e.turn("a", CHAIN[:4])
    e.files.path(CHAIN[2]).write_bytes(e.files.path(CHAIN[2]).read_bytes()[:-50])
    assert e.lv.promote("a", CHAIN, 2, 6, e.host) == 2
    assert e.disk.reading == {CHAIN[2]: 1, CHAIN[3]: 1}
    e.step()
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert e.lv.counters["disk_read_failures"] == 1 and e.lv.counters["disk_restored_blocks"] == 1
    assert not e.disk.reading and not e.disk.holds(CHAIN[2])
    e.host.drop_owner("a")
    e.worker.fetcher.submit = lambda job, nbytes=0: False  # type: ignore[method-assign]
    assert e.lv.promote("a", CHAIN, 3, 5, e.host) == 1 and e.disk.reading == {CHAIN[3]: 1}
    e.step()
    e.report()
    assert e.lv.counters["disk_read_failures"] == 2 and not e.disk.reading and e.disk.holds(CHAIN[3])


def test_a_reset_before_the_step_releases_the_pins_of_fetches_never_sent(tmp_path: Path) -> None:
    e = Engine(tmp_path)
    e.turn("a", CHAIN[:3])
    assert e.lv.promote("a", CHAIN, 1, 6, e.host) == 2 and len(e.disk.reading) == 2
    e.book.cancel(e.lv.close())  # as the connector's reset_cache: the levels go off
    assert not e.disk.reading and not e.book.slots


def test_blocks_given_no_host_slot_and_a_restore_that_raises_leave_no_pin(tmp_path: Path) -> None:
    """The host tier holds one slot: of the disk's run of 3, one is fetched and pinned, the others not. An exception
    in the host tier's admit (a bug) leaves nothing pinned either."""
    e = Engine(tmp_path, slots=1)
    e.turn("a", CHAIN[:3])
    assert e.lv.promote("a", CHAIN, 0, 3, e.host) == 1 and e.disk.reading == {CHAIN[0]: 1}

    class Broken(TierDirectory):
        def admit(self, *args: Any, **kwargs: Any) -> list[tuple[Any, int]]:
            raise RuntimeError("a bug in the host tier")

    with pytest.raises(RuntimeError):
        e.lv.promote("a", CHAIN, 1, 2, Broken(TierConfig(budget_bytes=4 * BLOCK), BLOCK, value_of=lambda owner: 0.0))
    assert e.disk.reading == {CHAIN[0]: 1}  # the first restore's, still in flight
