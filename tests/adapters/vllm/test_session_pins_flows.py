"""Engine flows of kvsched's scheduler found by review (vLLM's real scheduler, no model: see harness.py): a reset
that fails, a turn preempted and then aborted."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory, free_blocks, run_until_idle, step, usable_blocks  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402


def _pinned_block_ids(s) -> set[int]:
    return {b.block_id for groups in s.kvsched.pinned.values() for g in groups for b in g}


def test_a_reset_that_fails_anyway_keeps_the_pins_and_sessions(harness_cfg, clock):
    """Found by review: every pin was dropped and every session forgotten before a reset that a running request made
    fail (`reset_running_requests` off); with it on, the reset preempts the request and the pins go first."""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([3] * 64, 2, session_id="x"))
    run_until_idle(s)
    s.add_request(f.make([9] * 40, 50, request_id="busy"))
    step(s)
    assert s.reset_prefix_cache() is False
    assert [str(k.session_id) for k in s.kvsched.pinned] == ["x"] and s.kvsched.policy.sessions
    assert s.reset_prefix_cache(True) is True and not s.kvsched.pinned
    run_until_idle(s)  # the preempted request runs again; its (inferred) session is pinned: no block leaked
    assert free_blocks(s) + len(_pinned_block_ids(s)) == usable_blocks(s)


def test_a_turn_preempted_then_aborted_keeps_the_pin_it_hit(harness_cfg, clock):
    """Found by review: preemption frees the turn's blocks, so its abort reported no reusable prefix and the session's
    whole pin (an intact head that very turn had hit) was released; aborted while running, the pin stays."""
    from dataclasses import replace

    from vllm.v1.request import RequestStatus

    s, f = _sched(replace(harness_cfg, num_blocks=24, max_num_seqs=8), clock=clock), RequestFactory(BLOCK)
    head = list(range(100, 164))  # 4 full blocks
    s.add_request(f.make(head, 1, session_id="x"))
    run_until_idle(s)
    s.add_request(f.make([7] * 160, 150, request_id="y"))  # another user's long decode
    s.add_request(f.make(head + [3] * 16, 150, session_id="x", request_id="x2"))
    for _ in range(400):
        step(s)
        if s.requests["x2"].status == RequestStatus.PREEMPTED:
            break
    assert s.requests["x2"].status == RequestStatus.PREEMPTED
    pinned = _pinned_block_ids(s)
    assert pinned
    s.finish_requests("x2", RequestStatus.FINISHED_ABORTED)
    assert _pinned_block_ids(s) == pinned and s.kvsched.policy.counters["released_turn"] == 0
    s.finish_requests("y", RequestStatus.FINISHED_ABORTED)  # its own (inferred) session is pinned now: no leak
    assert free_blocks(s) + len(_pinned_block_ids(s)) == usable_blocks(s) and pinned <= _pinned_block_ids(s)


def test_a_session_ended_while_a_request_of_it_runs_is_not_pinned_again(harness_cfg, clock):
    """Found by review: the end flag (on a short side request) or the admin end while another request of the session
    ran left its record alive for that request, whose finish pinned the session again until its TTL."""
    prompt = list(range(100, 180))  # 5 blocks
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(prompt, 40, session_id="x", request_id="long"))
    step(s)
    s.add_request(f.make(prompt + [1] * 20, 1, session_id="x", request_id="bye", xargs={"session_end": 1}))
    run_until_idle(s)
    assert not s.kvsched.pinned and not s.kvsched.policy.sessions and free_blocks(s) == usable_blocks(s)
    assert s.kvsched.policy.counters["sessions_ended"] == 1
    s.add_request(f.make(prompt, 40, session_id="y", request_id="long-y"))
    step(s)
    assert s("end", "y")["ended"] == 1
    run_until_idle(s)
    assert not s.kvsched.pinned and free_blocks(s) == usable_blocks(s)
    s.add_request(f.make(prompt, 2, session_id="y"))  # the id's next conversation is pinned as usual
    run_until_idle(s)
    assert [str(k.session_id) for k in s.kvsched.pinned] == ["y"]
