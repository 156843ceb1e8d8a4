"""kvsched's FP8 tier on vLLM's real scheduler and block pool (no model, no worker; see harness.py): a full tier gives
up its copies of blocks vLLM's pool holds referenced (a pin) before the only copies of another session's chain
(`kvsched.core.tier_reach`; the pool is asked through `compat.pool_holds`, a prefix-cache lookup). Before, the
session that wrote into the tier longest ago lost its deepest block, which a restore would have loaded."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def test_a_full_tier_gives_up_copies_the_pool_pins_before_another_sessions_only_copies(harness_cfg, clock):
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    kp, connector = s.kvsched, s.connector
    d = kp.tier.directory
    assert d.reach.pool_holds is not None
    s.add_request(f.make(list(range(100, 260)), 4, session_id="agent-1"))  # 10 full blocks
    run_until_idle(s)
    [a] = kp.policy.sessions
    chain_a = [k for k, _ in compat.cached_content_keys(kp.pins.pinned[a][0])]
    clock.advance(kp.policy.sessions[a].ttl_s + 1.0)
    step(s)  # A's TTL: its chain is demoted, its pin released (the pool still caches the blocks, unreferenced)
    assert a not in kp.pins.pinned and d.keys_of[a] == chain_a
    assert not any(d.reach.pool_holds(k) for k in chain_a)
    s.add_request(f.make(list(range(1000, 1080)), 4, session_id="agent-2"))  # 5 full blocks, pinned
    run_until_idle(s)
    [b] = [k for k in kp.policy.sessions if k != a]
    pinned_b = compat.cached_content_keys(kp.pins.pinned[b][0])
    chain_b = [k for k, _ in pinned_b]
    assert len(chain_b) == 5 and all(d.reach.pool_holds(k) for k in chain_b)
    connector.demote(b, pinned_b, 0)  # B's tier copies while its pin holds the blocks (as after a restore)
    assert d.keys_of[b] == chain_b and list(d.keys_of) == [a, b]  # A wrote first: recency would take A's blocks
    free = d.num_slots - d.used_slots
    connector.demote("w", [(((1 << 20) + j).to_bytes(4, "big") * 8, j % 60) for j in range(free)], 0)  # tier full
    tails = len(set(d.tail_of.values()))  # the sessions' partial last blocks go first (tier.py)
    connector.demote("x", [(((2 << 20) + j).to_bytes(4, "big") * 8, j % 60) for j in range(tails + 3)], 0)
    assert d.keys_of[a] == chain_a and len(d.match(chain_a, 0, 10)) == 10  # A's only copies all stay
    assert d.keys_of[b] == chain_b[:2]  # B's 3 deepest copies went (its pin still holds them)
    assert all(d.reach.pool_holds(k) for k in chain_b)
