"""A leftover of shared inferred sessions on vLLM's real scheduler and block pool (no model: the harness samples the
tokens). A client's retry after its first request was aborted is no other user's repeat: the retry's user's end hint
then ends the session (vLLM's finish status, `compat.finished_normally`)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402

FIRST = [*range(100, 164), 500, 501, 502]  # the first prompt: 4 full blocks and 3 tokens
MESSAGE = [700, 701, 702, 703]


def test_a_retry_after_an_aborted_request_leaves_its_users_end_hint_in_force(harness_cfg, clock):
    """A's first request runs, then is aborted (its client timed out); A sends the prompt again, then its next turn
    with an end hint. Before: the retry repeated the aborted turn's prompt, so it shared the session and A's end was
    ignored (the session and its pin stayed for the TTL). Now it ends the session."""
    from vllm.v1.request import RequestStatus

    s, f = sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    kp = s.kvsched
    s.add_request(f.make(FIRST, 40, request_id="a1"))
    step(s)
    step(s)  # its prefill and a decoded token
    s.finish_requests("a1", RequestStatus.FINISHED_ABORTED)
    [key] = kp.policy.sessions
    s.add_request(f.make(FIRST, 40, request_id="retry"))
    assert not kp.resolver.shared_turn("retry") and key in kp.policy.sessions
    run_until_idle(s)
    s.add_request(f.make([*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4, request_id="a2", xargs={"session_end": 1}))
    assert not kp.resolver.shared_turn("a2") and key in kp.policy.sessions  # it continued the retry's answer
    run_until_idle(s)
    assert key not in kp.policy.sessions and not kp.pinned
    assert kp.stats()["inferred_shared_ends_ignored"] == 0

