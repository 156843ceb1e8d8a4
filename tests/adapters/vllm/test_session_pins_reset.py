"""A reset of vLLM's prefix cache (an RLHF weight sync, `pause_generation(clear_cache=True)`, `sleep()`) on vLLM's real
scheduler (no model: see harness.py). Found by review: the reset ended every pinned session, so a turn queued or
running at the reset finished as its session's last (no pin, the record and lineage forgotten) and `sessions_ended`
counted ends no client asked for. The pins go, as releases of their own; the sessions go on."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import harness as h  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402

HISTORY = list(range(100, 260))  # 10 full blocks
RequestFactory, run_until_idle, step = h.RequestFactory, h.run_until_idle, h.step
NEXT_TURN = HISTORY + [h.FAKE_TOKEN] * 3 + list(range(900, 940))


def _ids(keys) -> list[str]:
    return sorted(str(k.session_id) for k in keys)


@pytest.mark.parametrize("running", [False, True])
def test_a_reset_releases_the_pins_and_a_turn_queued_or_running_at_it_is_pinned_when_it_ends(harness_cfg, clock,
                                                                                              running):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(HISTORY, 4, session_id="S"))
    run_until_idle(s)
    s.add_request(f.make(list(range(3000, 3100)), 4, session_id="U"))  # U: one turn, idle at the reset
    run_until_idle(s)
    s.add_request(f.make(NEXT_TURN, 40, session_id="S"))  # S's next turn: queued, or running (the reset preempts it)
    if running:
        step(s)
    assert s.reset_prefix_cache(running) is True
    stats = s.kvsched.stats()
    assert not s.kvsched.pinned and stats["released_reset"] == 2 and stats["released_end"] == 0
    assert h.free_blocks(s) == h.usable_blocks(s)
    run_until_idle(s)
    policy = s.kvsched.policy
    assert _ids(s.kvsched.pinned) == ["S"] and _ids(policy.sessions) == ["S", "U"]
    assert policy.counters["sessions_ended"] == 0 and not pool_violations(s)


def test_a_session_ended_before_the_reset_stays_ended_and_an_inferred_one_keeps_its_lineage(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(HISTORY, 4))  # no session field: inferred, its next turn is found by lineage
    run_until_idle(s)
    s.add_request(f.make(list(range(3000, 3100)), 4, session_id="X"))
    run_until_idle(s)
    s.add_request(f.make(list(range(3000, 3140)), 40, session_id="X"))
    step(s)
    assert s("end", "X")["ended"] == 1  # while its request runs: that request's finish ends it
    assert s.reset_prefix_cache(True) is True
    run_until_idle(s)
    policy = s.kvsched.policy
    assert policy.counters["sessions_ended"] == 1 and not any(str(k.session_id) == "X" for k in policy.sessions)
    s.add_request(f.make(NEXT_TURN, 4))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["inference_hits"] == 1 and stats["inferred_sessions"] == 1  # the conversation's second turn
    assert len(s.kvsched.pinned) == 1 and not pool_violations(s)
