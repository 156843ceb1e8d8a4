"""A prefix-cache reset with the disk level configured, on vLLM's real scheduler (no model, no worker: the test acks
the disk writes as the worker would). Found by review: the reset emptied the host tier only, the disk level went on
serving the KV from before it (new weights: wrong KV under valid checksums), and the connector's reset answered False,
which makes vLLM's pause and sleep (clear_cache) fail."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


@pytest.mark.parametrize("reset_connector", [False, True])
def test_a_reset_turns_the_disk_level_off_until_a_restart(harness_cfg, clock, tmp_path, reset_connector):
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    tier = kv_transfer_config(0.01, disk_dir=str(tmp_path), disk_gb=0.01)
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))  # 10 full blocks
    s.add_request(f.make(history, 4, session_id="A"))
    run_until_idle(s)
    step(s)
    levels = s.connector.levels
    written = list(levels.disk.pending)
    levels.written([(k, True) for k in written], disk_full=False)  # the worker wrote them
    assert len(written) >= 10
    before = s.kvsched.stats()  # found by review: the levels' series vanished after the reset
    assert s.reset_prefix_cache(reset_connector=reset_connector) is True
    after = s.kvsched.stats()
    assert after["disk_tier_written_blocks"] == before["disk_tier_written_blocks"] >= 10  # counters stay
    assert before["disk_tier_capacity_bytes"] > 0 and after["disk_tier_capacity_bytes"] == 0  # the level is off
    assert s.connector.levels is None and s.connector.directory.used_slots == 0
    s.add_request(f.make(history + [3] * 20, 4, session_id="B"))  # the same prefix, after new weights
    planned = 0
    while s.has_requests():
        out, _ = step(s)
        meta = out.kv_connector_metadata
        planned += len(meta.loads) + len(meta.prefetches) + (len(meta.levels.fetches) if meta.levels else 0) \
            if meta is not None else 0
    assert planned == 0  # nothing of the KV from before the reset is read again
