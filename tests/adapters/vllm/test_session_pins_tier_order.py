"""kvsched's FP8 tier on vLLM's real scheduler and block pool (no model, no worker; see harness.py): a session's pin
released in two steps, pool pressure first, its TTL later, is listed in the tier in chain order, so the tier's
eviction takes the chain's last block and what stays is a prefix a restore reaches (`kvsched.core.tier_chain`).
Before, the later release's blocks were listed after the first's, and the eviction cut the chain in the middle."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def test_a_pin_released_in_two_steps_is_a_chain_in_the_tier_and_its_eviction_keeps_a_prefix(harness_cfg, clock):
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    kp, connector = s.kvsched, s.connector
    d = kp.tier.directory
    s.add_request(f.make(list(range(100, 260)), 4, session_id="agent-1"))  # 10 full blocks
    run_until_idle(s)
    [key] = kp.policy.sessions
    chain = [k for k, _ in compat.cached_content_keys(kp.pins.pinned[key][0])]
    assert len(chain) == 10
    s.add_request(f.make([5000] * 850, 4))  # 54 blocks of a 63-block pool: the pin yields its tail
    run_until_idle(s)
    kept = len(kp.pins.pinned[key][0])
    assert 0 < kept < 10 and d.keys_of[key] == chain[kept:]
    clock.advance(kp.policy.sessions[key].ttl_s + 1.0)
    step(s)  # the TTL releases the rest: listed before the first release's blocks
    assert d.keys_of[key] == chain
    free = d.num_slots - d.used_slots
    connector.demote("w", [(((1 << 20) + j).to_bytes(4, "big") * 8, j % 60) for j in range(free)], 0)  # tier full
    i = 0
    while d.blocks_of(key) == 10:  # one more block at a time (other sessions' tails go first)
        connector.demote(f"x{i}", [(((2 << 20) + i).to_bytes(4, "big") * 8, i % 60)], 0)
        i += 1
    assert d.keys_of[key] == chain[:9] and chain[9] not in d.slot_of
    assert len(d.match(chain, 0, 10)) == 9  # a restore reaches 9 blocks (before: `kept` - 1, past a hole)
