"""A queued tier prefetch and the session's own cached head, on vLLM's real scheduler and block pool (no model, no
worker; see harness.py). Found by review (s4_prefetch_evicts_head): the head's blocks sat in the free queue after the
session's pin expired, the restore's new blocks were taken from the queue's front, i.e. from that head, and the pin then
held [1, 2, 3, 4, 5, 6, 7, 6, 5, 4]: blocks twice, uncached head blocks, the policy counting 10 for 7."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import PrefillCounts, RequestFactory, free_blocks, run_until_idle  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402


def test_a_queued_prefetch_never_takes_the_sessions_own_cached_head(harness_cfg, clock, monkeypatch):
    from dataclasses import replace

    from kvsched.adapters.vllm import compat
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")  # the flood's blocks are free, not pinned, once it is done
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    f = RequestFactory(BLOCK)
    history = list(range(100, 260))  # 10 full blocks
    s.add_request(f.make(history, 1, session_id="A"))
    run_until_idle(s)
    key = next(iter(s.kvsched.pinned))
    clock.advance(s.kvsched.policy.sessions[key].ttl_s + 1)
    s.kvsched.expire()  # the TTL: A's 10 blocks go to the tier and stay cached in the free queue, tail first
    assert not s.kvsched.pinned and s.kvsched.tier.directory.blocks_of(key) == 10
    # a flood that takes every never-used block and A's last 4: A's first 6 stay cached at the free queue's front
    s.add_request(f.make([5000] * ((free_blocks(s) - 10 + 4) * BLOCK - 1), 1))
    run_until_idle(s)
    turn2 = f.make(history + [4] * 40, 1, session_id="A")
    head = compat.cached_prefix(s, turn2.block_hashes, 10)
    assert len(head) == 6 and all(b.ref_cnt == 0 for b in head)
    s.add_request(turn2)  # queued: its prefetch restores blocks 6..9 at once
    pin = s.kvsched.pinned[key][0]
    assert pin[:6] == head and len({b.block_id for b in pin}) == 10
    assert s.kvsched.policy.sessions[key].pinned_blocks == 10 and not pool_violations(s)
    counters = s.kvsched.prefetcher.counters
    assert counters["prefetched_blocks"] == 4 and not counters["prefetches_overlapping_head"]
    counts = PrefillCounts()
    run_until_idle(s, counts=counts)
    assert counts.cached_tokens == 10 * BLOCK and counters["useful_blocks"] == 4 and not counters["wasted_blocks"]
    assert not pool_violations(s)
