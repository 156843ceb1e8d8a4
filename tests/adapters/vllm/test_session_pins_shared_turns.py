"""The two leftovers of shared inferred sessions on vLLM's real scheduler and block pool (no model: the harness
samples the tokens). (a) A client's retry after its first request was aborted is no other user's repeat: the retry's
end hint then ends the session (vLLM's finish status, `compat.finished_normally`). (b) Two users' different answers
to one prompt are both pinned: each user's next turn hits its whole chain after a flood evicted everything unpinned."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, free_blocks, run_until_idle, step  # noqa: E402
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
    assert kp.resolver.sharing("retry") == (False, False) and key in kp.policy.sessions
    run_until_idle(s)
    s.add_request(f.make([*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4, request_id="a2", xargs={"session_end": 1}))
    assert not kp.resolver.shared_turn("a2") and key in kp.policy.sessions  # it continued the retry's answer
    run_until_idle(s)
    assert key not in kp.policy.sessions and not kp.pinned
    assert kp.stats()["inferred_shared_ends_ignored"] == 0


def test_two_users_different_answers_to_one_prompt_are_both_pinned(harness_cfg, clock):
    """A and B send the same first prompt and get different answers (tokens 7 and 9). Before: B's start released A's
    answer blocks and B's finish pinned B's chain alone, so a flood evicted A's answer and A's next turn hit its
    prompt only (64 tokens). Now the pin holds both chains (8 blocks) and both next turns hit 96 tokens."""
    s, f = sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    kp = s.kvsched
    tokens = {"b1": 9}

    def run() -> list:
        news = []
        while s.has_requests():
            out, _ = step(s, sample=lambda rid: tokens.get(rid, FAKE_TOKEN))
            news.extend(out.scheduled_new_reqs)
        return news

    s.add_request(f.make(FIRST, 40, request_id="a1"))
    run()
    [(key, rec)] = kp.policy.sessions.items()
    a_chain = [b.block_id for b in kp.pinned[key][0]]
    assert len(a_chain) == 6
    s.add_request(f.make(FIRST, 40, request_id="b1"))
    assert kp.resolver.sharing("b1") == (True, True)
    run()
    held = [b.block_id for b in kp.pinned[key][0]]
    assert held[:6] == a_chain and len(held) == 8 and rec.pinned_blocks == 8
    assert all(kp.block_refs[i] == 1 for i in held)
    flood = free_blocks(s) * BLOCK  # every block no pin holds is taken, then freed: anything unpinned is evicted
    s.add_request(f.make(list(range(2000, 2000 + flood)), 1, request_id="flood", xargs={"kvsched_infer": 0}))
    run()
    s.add_request(f.make([*FIRST, *[9] * 40, *MESSAGE], 4, request_id="b2"))
    s.add_request(f.make([*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4, request_id="a2"))
    assert {n.req_id: n.num_computed_tokens for n in run()} == {"b2": 96, "a2": 96}


@pytest.mark.parametrize("apart", [None, "tenant", "cache_salt"])
def test_another_users_identical_prompt_after_an_abort_is_a_retry_unless_its_key_or_salt_differs(harness_cfg, clock,
                                                                                                 apart):
    """A's first request is aborted after its prefill; B sends the same prompt with a role hint. Without a session
    field, an API key (the middleware's `kvsched_tenant`) or a `cache_salt` of its own, B's request is the very
    tokens A's retry would be, and no answer exists that only A could repeat: it joins A's session as A's retry (not
    shared, so its hints are the session's: its role replaces A's; `kvsched.core.shared_turns`). Under another tenant
    or salt it is a session of its own, and A's session keeps its role (lineage indexes per tenant, compares salts)."""
    from vllm.v1.request import RequestStatus

    s, f = sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    kp = s.kvsched
    own = {"tenant": ({"kvsched_tenant": "key-a"}, {"kvsched_tenant": "key-b"}, None, None),
           "cache_salt": ({}, {}, "salt-a", "salt-b")}.get(apart, ({}, {}, None, None))
    s.add_request(f.make(FIRST, 40, request_id="a1", xargs={**own[0], "agent_role": "orchestrator"},
                         cache_salt=own[2]))
    step(s)
    step(s)
    s.finish_requests("a1", RequestStatus.FINISHED_ABORTED)
    [(a_key, a_rec)] = kp.policy.sessions.items()
    s.add_request(f.make(FIRST, 4, request_id="b1", xargs={**own[1], "agent_role": "worker"}, cache_salt=own[3]))
    b_key = kp.requests["b1"][0]
    assert kp.resolver.sharing("b1") == (False, False)
    run_until_idle(s)
    if apart is None:
        assert b_key == a_key and a_rec.role == "worker"  # one session: B's hints are taken as A's retry's
    else:
        assert b_key != a_key and a_rec.role == "orchestrator" and kp.policy.sessions[b_key].role == "worker"
        assert (b_key.tenant, b_key.cache_salt) == (own[1].get("kvsched_tenant"), own[3])
