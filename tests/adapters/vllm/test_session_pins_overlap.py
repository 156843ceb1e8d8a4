"""A session's pin while another request of it runs, on vLLM's real scheduler (no model: see harness.py). Found by
review: the first of two overlapping requests of one session to finish pinned its prefix, and no other session's
shortage could release that pin until the session's last request finished (the reviewer's scripts: another session's
request waited 295 steps, stock vLLM 0; another session's running request was preempted, stock vLLM none)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402

HISTORY = list(range(100, 700))  # the session's 600-token turn: 37 full blocks of the 63 usable


def _overlapping_session(s, f, side_tokens: int) -> None:
    """Session S sends a side request (a title: its prompt's first 19 tokens, a long generation) with its turn; the
    turn (2 tokens out) finishes first and is pinned while the side request runs on."""
    s.add_request(f.make(HISTORY[:19], side_tokens, session_id="S"))
    s.add_request(f.make(HISTORY, 2, session_id="S"))
    for _ in range(5):
        step(s)
    rec = next(r for k, r in s.kvsched.policy.sessions.items() if str(k.session_id) == "S")
    assert rec.pinned_blocks == 37 and rec.active_requests == 1 and rec.pin_beyond_running


def test_another_sessions_request_is_admitted_at_once_from_the_pin_beyond_a_running_request(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    _overlapping_session(s, f, 300)
    t = f.make(list(range(2000, 2480)), 2, session_id="T")  # 30 blocks: 25 are free
    s.add_request(t)
    out, _ = step(s)
    assert t.request_id in {n.req_id for n in out.scheduled_new_reqs}  # was: 295 steps later
    c = s.kvsched.policy.counters
    assert c["released_pressure_partial"] == 1 and c["released_pressure"] == 0  # S's tail only
    assert not pool_violations(s)


def test_no_other_sessions_running_request_is_preempted_for_the_pin_beyond_a_running_request(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    _overlapping_session(s, f, 400)
    s.add_request(f.make(list(range(2000, 2300)), 200, session_id="T"))  # a long decode beside S's side request
    preempted = 0
    for _ in range(1000):
        if not s.has_requests():
            break
        out, _ = step(s)
        preempted += len(out.preempted_req_ids or ())
    assert preempted == 0 and not s.has_requests()  # stock vLLM: none either; was 1
    assert not pool_violations(s)
