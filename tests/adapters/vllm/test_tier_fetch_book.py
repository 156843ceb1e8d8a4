"""The scheduler's books of the levels' background fetches (tier_fetches.FetchBook) with more than one worker: a block
counts once however many workers fetched their share of it, and a fetch one worker never reports holds its slot but
not its session."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.test_tier_levels_async import HISTORY, Engine, arrive  # noqa: E402


def two_workers(e: Engine) -> None:
    """Tensor parallel 2 on the scheduler side (the harness runs one worker; the test plays both)."""
    e.s.connector.world_size = e.book.world_size = e.levels.world_size = 2


def report(e: Engine, rank: int, fetches: list, failed: set[int]) -> TierWorkerMeta:
    """Rank `rank`'s report of `fetches` as its fetch thread left them (the ones at `failed` not served)."""
    w = TierLevelsWorker(LevelsConfig(), e.levels.identity, {}, rank, 2, e.w.tier)
    w.fetcher.results.append([(f, i not in failed) for i, f in enumerate(fetches)])
    meta = TierWorkerMeta()
    w.fill(meta)
    return meta


def test_a_fetched_block_counts_once_whatever_the_number_of_workers(harness_cfg, clock, tmp_path) -> None:
    """Found by review: each rank reported its own restored blocks and read failures, summed into the engine's counters
    (world_size times the blocks)."""
    from vllm.v1.outputs import KVConnectorOutput

    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    two_workers(e)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.levels.disk.load_index(keys[:10])  # every rank's file of each block is on disk
    e.s.add_request(ra)
    fetches = e.levels.take_ops().fetches
    assert len(fetches) == 10
    both = report(e, 0, fetches, failed={4, 5}).aggregate(report(e, 1, fetches, failed={4}))
    e.s.connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=both))
    stats = e.s.connector.tier_stats()
    assert stats["disk_tier_restored_blocks"] == 8 and stats["disk_tier_read_failures"] == 2
    assert not e.book.slots and [k in e.directory.slot_of for k in keys[3:7]] == [True, False, False, True]


def test_a_fetch_one_worker_never_reports_holds_its_slot_not_its_session(harness_cfg, clock, tmp_path,
                                                                          caplog) -> None:
    """Found by review: a fetch one rank never reported (its read hung) made its whole session unevictable for good.
    Well past its deadline it no longer protects the session; its slot stays held until the report comes."""
    from kvsched.adapters.vllm.tier_fetches import STUCK_AFTER_S, WAIT_FLOOR_S

    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    two_workers(e)
    e.book.clock = clock
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.levels.disk.load_index(keys[:10])
    e.s.add_request(ra)
    fetches = e.levels.take_ops().fetches
    e.book.reported([(x.key, x.slot, True) for x in fetches])  # rank 0: all ten
    e.book.reported([(x.key, x.slot, True) for x in fetches[:9]])  # rank 1: nine; the tenth never comes
    d, stuck = e.directory, fetches[9].slot
    def others(who: bytes) -> list[tuple[bytes, int]]:
        return [(b"%s%08d" % (who, i), i) for i in range(d.num_slots)]

    clock.advance(WAIT_FLOOR_S + STUCK_AFTER_S / 2)
    e.s.connector.build_connector_meta(None)  # once a step
    assert e.s.connector.demote("w", others(b"w")) == d.num_slots - 10  # the free slots only: "moved" is being fetched
    clock.advance(STUCK_AFTER_S)
    e.s.connector.build_connector_meta(None)
    e.s.connector.build_connector_meta(None)
    assert e.s.kvsched.stats()["levels_fetch_stuck"] == 1 and caplog.text.count("unreported") == 1
    assert e.s.connector.demote("v", others(b"v")[:9]) == 9  # the longest-standing session's blocks may go now
    assert d.blocks_of("moved") == 0 and d.blocks_of("w") == d.num_slots - 10
    assert stuck not in d.slot_of.values() and stuck in d.inflight
    e.book.reported([(fetches[9].key, stuck, True)])  # the hung read returns at last
    e.s.connector.build_connector_meta(None)
    assert not e.book.slots and stuck in d._free
