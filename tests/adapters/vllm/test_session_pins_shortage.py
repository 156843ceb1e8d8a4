"""Shortages on vLLM's real scheduler (no model: see harness.py) that releasing pins cannot cure."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import harness as h  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402


def test_a_waiting_request_too_large_for_every_pin_keeps_them_until_it_can_fit(harness_cfg, clock):
    """Found by review: a waiting request that could not fit beside the running ones even with every pin released
    released them all at each step it was tried (vLLM's queue waits behind it). A session's pin then lost its value
    order: the request, admitted once the running one finished, evicted the returning session's released blocks
    before the one-turn session's pin (stock vLLM's LRU, the same). Now the pins stay until it can fit, and its
    admission releases the lowest-value one."""
    s, f = _sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    a1 = list(range(100, 244))
    a2 = a1 + [h.FAKE_TOKEN] * 2 + list(range(900, 914))  # 10 full blocks
    for prompt in (a1, a2):  # A: a session that came back (at once: the clock stands still)
        s.add_request(f.make(prompt, 2, session_id="A"))
        h.run_until_idle(s)
    s.add_request(f.make(list(range(2000, 2480)), 20, session_id="R", request_id="R"))  # 30 blocks (32 with output)
    h.step(s)
    s.add_request(f.make(list(range(5000, 5640)), 2, session_id="W"))  # W: 40 blocks: not beside R, even without A
    c = s.kvsched.policy.counters
    while "R" in s.requests:  # W waits while R runs: A's pin stays
        h.step(s)
        assert c["released_pressure"] + c["released_pressure_partial"] == 0
        assert "A" in {str(k.session_id) for k in s.kvsched.pinned}
    h.run_until_idle(s)
    assert not pool_violations(s)
    counts = h.PrefillCounts()
    s.add_request(f.make(a2 + [h.FAKE_TOKEN] * 2 + list(range(950, 970)), 2, session_id="A"))
    h.run_until_idle(s, counts=counts)
    assert counts.cached_tokens == 160  # was 0, as stock vLLM's
