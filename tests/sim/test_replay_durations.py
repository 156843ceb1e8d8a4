"""Recorded durations (`duration_s`, engine recordings) in the replay: a request holds its blocks for its recorded time
from its admission, so a wait for memory in the replay delays its finish (found by review: it finished at arrival +
duration whatever it waited, so waiting was free)."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, TraceRequest

BS = 4


def request(t: float, session: str, block: str, duration: float) -> TraceRequest:
    # one full block + 1 token: holds 2 blocks (the full one and a partial one)
    return TraceRequest(t=t, session=session, prompt_tokens=BS + 1, output_tokens=0, blocks=[block],
                        duration_s=duration)


@pytest.mark.parametrize("policy", ["lru", "opt", "kvsched"])
def test_a_wait_for_memory_delays_the_finish(policy):
    # A pool of 2 blocks holds one request at a time. A runs 0-10; B arrives at 1, waits for A, runs 10 s from 10,
    # so it holds its blocks until 20 (not 1 + 10 = 11) and C, arriving at 12, waits until 20.
    trace = Trace.from_requests(BS, [request(0, "a", "x", 10.0), request(1, "b", "y", 10.0),
                                     request(12, "c", "z", 10.0)])
    res = replay(trace, policy, ReplayConfig(capacity_blocks=2, prefill_tps=1e12, check=True))
    assert res.wait_s == pytest.approx([0.0, 9.0, 8.0])


def test_without_a_wait_the_recorded_time_is_kept():
    # enough memory: each request finishes at arrival + duration, so C (arriving at 12) finds A and B gone, and the
    # prefill time counts only where it is longer than the recorded duration
    trace = Trace.from_requests(BS, [request(0, "a", "x", 10.0), request(1, "b", "y", 10.0),
                                     request(12, "c", "z", 0.0)])
    res = replay(trace, "lru", ReplayConfig(capacity_blocks=4, prefill_tps=1.0, check=True))
    assert np.all(res.wait_s == 0.0)
    assert res.ttft_s == pytest.approx([5.0, 5.0, 5.0])
