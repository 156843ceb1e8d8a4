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
