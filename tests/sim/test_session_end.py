"""A session ended while another of its requests ran: that request's finish pins nothing, in the simulator as in the
engine (`RetentionPolicy.finish_hints`, which both ask)."""

from __future__ import annotations

from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, TraceRequest

BS = 16


def test_a_request_running_when_its_session_ended_pins_nothing_when_it_finishes():
    """Found by review: the simulator pinned the ended session again (the engine did not), so the two took different
    decisions on the same input (tests/sim/test_apply_equivalence.py sends one request at a time)."""
    trace = Trace.from_requests(BS, [
        TraceRequest(t=0.0, session="s", prompt_tokens=4 * BS, output_tokens=0, blocks=[1, 2, 3, 4], duration_s=10.0),
        TraceRequest(t=1.0, session="s", prompt_tokens=5 * BS, output_tokens=0, blocks=[5], reuse=4, end=True,
                     duration_s=1.0),  # a side request that ends the session while the first still runs
        TraceRequest(t=20.0, session="t", prompt_tokens=4 * BS, output_tokens=0, blocks=[6, 7, 8, 9]),
    ])
    res = replay(trace, "kvsched", ReplayConfig(capacity_blocks=64, record_applied=True, check=True))
    assert [a.op for a in res.applied if a.session == "s"] == []  # ended before any of its turns finished
    assert [a.op for a in res.applied if a.session == "t"] == ["pin"]  # (a pin is recorded where one is made)
