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
    retention = RetentionConfig(max_ttl_s=0.0, default_ttl_s=0.0, payback_sampling=1, payback_from_start=True)
    cfg = ReplayConfig(capacity_blocks=capacity, retention=retention)
    lru = replay(trace, "lru", cfg)
    kv = replay(trace, "kvsched", cfg)
    assert kv.hit_tokens == lru.hit_tokens
    stats = kv.policy_stats
    assert stats["payback_real_hits"] == lru.hit_tokens // trace.block_size
    assert stats["payback_lru_hits"] == pytest.approx(stats["payback_real_hits"], rel=0.01)
    assert stats["payback_switches"] == 0
    # the pin ledger sees no pins' effect where there are none: no balance, no noise, its cap stays put
    assert stats["payback_balance"] == stats["payback_variance"] == 0
    # fed from the pool's first eviction (the default), the ghost starts empty: once full, it holds what the pool holds
    late = replay(trace, "kvsched", replace(cfg, retention=replace(retention, payback_from_start=False))).policy_stats
    assert 0 < late["payback_real_hits"] < stats["payback_real_hits"]  # the requests before it filled are not judged
    assert late["payback_lru_hits"] == pytest.approx(late["payback_real_hits"], rel=0.01)


@pytest.mark.parametrize(("ttl", "tier", "on"), [(600.0, False, True), (30.0, False, True), (600.0, True, False)])
def test_the_replay_resolves_auto_sampling_by_its_pool(ttl: float, tier: bool, on: bool) -> None:
    """KVSCHED_PAYBACK_SAMPLING=auto, as the engine resolves it: the ghost runs without the FP8 tier, at every TTL."""
    trace = generate(replace(QUICK, workflows=2))
    cfg = ReplayConfig(capacity_blocks=int(trace.peak_live_blocks() / 1.5),
                       retention=RetentionConfig(default_ttl_s=ttl, max_ttl_s=600.0),
                       tier_bytes=4096 * 64 if tier else 0, tier_block_bytes=4096 if tier else 0)
    stats = replay(trace, "kvsched", cfg).policy_stats
    assert (stats["payback_real_hits"] + stats["payback_lru_hits"] > 0) is on


@pytest.mark.parametrize("sampling", [1, 8, 16])
def test_the_simulators_id_table_samples_what_the_trackers_own_rule_does(sampling: int) -> None:
    """The simulator hands the tracker a table of sampled ids (one lookup per key in C instead of a hash per key in
    Python): the same keys must be sampled, or the replay would no longer be the engine's rule."""
    from itertools import compress

    from kvsched.core.ghost_lru import LruGhost
    from kvsched.core.pin_payback import PaybackConfig, PinPayback
    from kvsched.sim.policies import id_table

    n = 5000
    p = PinPayback(PaybackConfig(sampling=sampling), total_blocks=64 * 64)
    g = p.ghost
    assert isinstance(g, LruGhost)
    own = [k for _, k in g._sampled(iter(range(n)))]  # an iterator: the generic, per-key path
    table = id_table(n, g.threshold)
    assert list(compress(range(n), table)) == own
    assert 0 < len(own) <= n and (sampling == 1) == (len(own) == n)
    g.id_table = table
    keys = [3, 4000, 17, 4999]
    assert g._flags(keys) == bytes(table[k] for k in keys)
    assert g._flags([3, n]) is None and g._flags([3, -1]) is None  # past the table, or negative: the generic path
