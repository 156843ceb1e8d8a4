"""The disk/shared levels' counters a worker keeps (copies that failed, write and fetch jobs its queues dropped or
that raised) reach the scheduler's statistics and /metrics, summed over workers (found by review, /tmp/rev_tierw r5:
they never left the worker process, so on a multi-process executor they were visible nowhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.fp8_tier_store import TierStore  # noqa: E402
from kvsched.adapters.vllm.tier_levels import LevelOps, Publish  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta  # noqa: E402
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of  # noqa: E402
from tests.adapters.vllm.test_tier_levels_async import Engine  # noqa: E402


def failing_worker(tmp_path: Path, rank: int, copies_failed: int) -> TierLevelsWorker:
    """A worker whose pinned host copies cannot be allocated: each publish's copy fails (logged once, then counted)."""
    w = TierLevelsWorker(LevelsConfig(disk_dir=str(tmp_path)), "cd" * 16, {}, rank, 2,
                         TierStore(views_of(caches()), "quantize"))
    w.tier.snapshot = lambda ids: (_ for _ in ()).throw(MemoryError("pinned alloc"))
    for step in range(copies_failed):
        w.before_stores(LevelOps(publishes=[Publish(bytes([step]) * 32, 0, True, False)]))
    return w


def report(w: TierLevelsWorker) -> TierWorkerMeta:
    meta = TierWorkerMeta()
    w.fill(meta)
    return meta


def test_a_workers_counters_travel_as_deltas_in_its_report(tmp_path: Path) -> None:
    w = failing_worker(tmp_path, 0, 3)
    w.writer.max_bytes = 0  # a hung disk: the queue holds its byte bound
    w.before_stores(LevelOps(publishes=[Publish(b"\x09" * 32, 0, True, False)]))
    first = report(w)
    assert first.counters == {"levels_copy_failures": 3, "levels_dropped_write_jobs": 1} and first
    assert report(w).counters == {}  # sent once: the scheduler sums them


def test_the_workers_counters_reach_the_levels_statistics_and_metrics(harness_cfg, clock, tmp_path: Path) -> None:
    from vllm.v1.outputs import KVConnectorOutput

    from kvsched.adapters.vllm.metrics import render_metrics

    e = Engine(harness_cfg, clock, tmp_path)
    both = report(failing_worker(tmp_path, 0, 3)).aggregate(report(failing_worker(tmp_path, 1, 2)))
    e.s.connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=both))
    stats = e.s.connector.tier_stats()
    assert stats["levels_copy_failures"] == 5 and stats["levels_dropped_write_jobs"] == 0
    text = render_metrics(stats).decode()
    assert "kvsched_levels_copy_failures_total 5.0" in text and "kvsched_levels_failed_fetch_jobs_total 0.0" in text
