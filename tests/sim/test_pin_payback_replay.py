"""The pin payback tracker as the simulator feeds it: its ghost LRU must count the hits a real LRU replay of the same
pool gets (what its fallback decisions stand on)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.sim.generator import QUICK, generate
from kvsched.sim.replay import ReplayConfig, replay


@pytest.mark.parametrize("pressure", [1.5, 3.0])
def test_ghost_lru_counts_the_hits_of_a_real_lru_replay(pressure: float) -> None:
    trace = generate(replace(QUICK, workflows=3))
    capacity = int(trace.peak_live_blocks() / pressure)
    # no pins (max TTL 0): kvsched's pool is the LRU pool, so the ghost and the pool must agree
    retention = RetentionConfig(max_ttl_s=0.0, default_ttl_s=0.0, payback_sampling=1)
    cfg = ReplayConfig(capacity_blocks=capacity, retention=retention)
    lru = replay(trace, "lru", cfg)
    kv = replay(trace, "kvsched", cfg)
    assert kv.hit_tokens == lru.hit_tokens
    stats = kv.policy_stats
    assert stats["payback_real_hits"] == lru.hit_tokens // trace.block_size
    assert stats["payback_lru_hits"] == pytest.approx(stats["payback_real_hits"], rel=0.01)
    assert stats["payback_switches"] == 0
    assert stats["payback_balance"] == 0  # the pin ledger sees no pins' effect where there are none: its cap stays put
