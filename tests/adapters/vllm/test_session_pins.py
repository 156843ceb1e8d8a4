"""kvsched's scheduler on vLLM's real scheduler, KV cache manager and block pool (no model: see harness.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import (  # noqa: E402
    FAKE_TOKEN,
    KVSCHED_SCHEDULER,
    STOCK_SCHEDULER,
    PrefillCounts,
    RequestFactory,
    free_blocks,
    run_until_idle,
    step,
    usable_blocks,
)
from kvsched.core.tenancy import Caller  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402


def _pinned_block_ids(s) -> set[int]:
    return {b.block_id for groups in s.kvsched.pinned.values() for g in groups for b in g}


def _flood(s, f, counts, n=3, tokens=300):
    for i in range(n):
        s.add_request(f.make([5000 + i] * tokens, 4))
        run_until_idle(s, counts=counts)


def test_next_turn_hits_the_whole_retained_prefix_where_stock_recomputes(harness_cfg, clock):
    history = list(range(100, 260))  # 160 tokens = 10 full blocks
    results = {}
    for cls in (STOCK_SCHEDULER, KVSCHED_SCHEDULER):
        s, f, first = _sched(harness_cfg, cls, clock), RequestFactory(BLOCK), PrefillCounts()
        s.add_request(f.make(history, 4, session_id="agent-1"))
        run_until_idle(s, counts=first)
        _flood(s, f, PrefillCounts(), n=4, tokens=330)  # 4 x 21 blocks through a 63-block pool
        turn2 = PrefillCounts()
        s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="agent-1"))
        run_until_idle(s, counts=turn2)
        results[cls] = turn2.cached_tokens
    assert results[STOCK_SCHEDULER] == 0  # LRU evicted the idle session
    assert results[KVSCHED_SCHEDULER] == 160  # the whole retained prefix (10 blocks) was hit


def test_pins_hold_blocks_and_grow_with_the_next_turn(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(100)), 5, session_id="a"))
    run_until_idle(s)
    # 100 prompt + 5 output - 1 (last token has no KV yet) = 104 tokens -> 6 full blocks pinned
    assert len(_pinned_block_ids(s)) == 6
    assert free_blocks(s) == usable_blocks(s) - 6
    stats = s.kvsched.stats()
    assert stats["pinned_sessions"] == 1 and stats["pins"] == 1
    s.add_request(f.make(list(range(100)) + [1] * 20, 5, session_id="a"))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["retained_hits"] == 1 and stats["retained_hit_tokens"] == 96 and stats["released_turn"] == 0
    assert len(_pinned_block_ids(s)) == 7  # 120 + 5 - 1 tokens
    # A turn under the same id that does not continue the pinned prompt (another client, or an edited history) is a
    # branch of its own: the session's pin, TTL and end are untouched by it.
    s.add_request(f.make([9] * 50, 5, session_id="a", xargs={"ttl_s": 0.0, "session_end": 1}))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["released_turn"] == 0 and stats["branches"] == 1 and len(_pinned_block_ids(s)) == 7
    [(key, rec)] = s.kvsched.policy.sessions.items()
    assert key.branch == 0 and rec.pinned_blocks == 7 and rec.ttl_s == 30.0
    assert free_blocks(s) == usable_blocks(s) - 7


def test_pressure_releases_pins_before_anything_is_preempted(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    for i in range(3):
        s.add_request(f.make([100 + i] * 300, 4, session_id=f"s{i}"))  # 303 tokens with KV -> 18 full blocks pinned each
        run_until_idle(s)
    assert len(_pinned_block_ids(s)) == 54
    big = f.make([7] * 900, 4)  # needs 57 blocks: only possible if pins yield
    s.add_request(big)
    run_until_idle(s)
    assert big.num_preemptions == 0
    assert s.kvsched.stats()["released_pressure"] >= 2
    assert free_blocks(s) + len(_pinned_block_ids(s)) == usable_blocks(s)


def test_a_request_never_waits_on_its_own_sessions_pin(harness_cfg, clock):
    """Found by the invariant test: the only pin left belongs to the waiting request's own session and blocks it."""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([1] * 740, 2, session_id="s0"))
    run_until_idle(s)
    assert len(_pinned_block_ids(s)) == 46
    other_prefix = f.make([2] * 900, 3, session_id="s0")  # same session, a prompt that shares nothing with the pin
    s.add_request(other_prefix)
    run_until_idle(s, max_steps=50)
    assert other_prefix.is_finished() and other_prefix.num_preemptions == 0


def test_a_burst_releases_idle_pins_before_the_pin_of_a_queued_turn(harness_cfg, clock):
    """Two requests arrive in one step: one with no session that needs a pin's blocks, then the next turn of the
    session that has been idle longest (the lowest-value pin). The idle pin yields, the queued turn hits its prefix."""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    history = [300 + i % 50 for i in range(300)]
    s.add_request(f.make(history, 4, session_id="queued"))
    run_until_idle(s)
    clock.advance(20.0)  # within the 30 s TTL
    s.add_request(f.make([200] * 300, 4, session_id="idle"))
    run_until_idle(s)
    assert [str(k.session_id) for k in s.kvsched.policy.release_order()] == ["queued", "idle"]
    assert free_blocks(s) == usable_blocks(s) - 36
    big = f.make([9] * 600, 4)  # 38 blocks of 27 free: one pin must go
    next_turn = f.make(history + [FAKE_TOKEN] * 3 + list(range(900, 940)), 4, session_id="queued")
    s.add_request(big)
    s.add_request(next_turn)
    counts = PrefillCounts()
    run_until_idle(s, counts=counts)
    assert big.num_preemptions == 0 and next_turn.num_preemptions == 0
    assert counts.cached_tokens == 288  # all 18 retained blocks of the queued turn's session
    stats = s.kvsched.stats()
    # Only the idle pin's tail was released, about the shortfall each time: big's (38 + 1 - 27 free = 12 blocks),
    # then the queued turn's (4 new blocks + 1 - 1 free = 4); nothing of the queued session.
    assert stats["released_blocks_pressure"] == 16 and stats["released_queued_blocks"] == 0
    assert {str(k.session_id) for k in s.kvsched.pinned if not k.inferred} == {"queued", "idle"}


def test_ttl_expiry_and_end_return_every_block(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([1] * 64, 2, session_id="short", xargs={"ttl_s": 2.0}))
    s.add_request(f.make([2] * 64, 2, session_id="long"))
    run_until_idle(s)
    assert len(s.kvsched.pinned) == 2
    clock.advance(2.0)
    s.kvsched.expire()
    assert [k.session_id for k in s.kvsched.pinned] == ["long"]
    assert s("end", "long") == {"ended": 1}
    assert free_blocks(s) == usable_blocks(s)
    assert s("end", "") == {"error": "session id must not be empty"}


def test_end_flag_on_last_turn_and_salted_sessions_are_separate(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([3] * 64, 2, session_id="x", cache_salt="tenant-a"))
    s.add_request(f.make([3] * 64, 2, session_id="x", cache_salt="tenant-b"))
    run_until_idle(s)
    assert len(s.kvsched.pinned) == 2
    s.add_request(f.make([3] * 64, 2, session_id="x", cache_salt="tenant-a", xargs={"session_end": 1}))
    run_until_idle(s)
    assert [k.cache_salt for k in s.kvsched.pinned] == ["tenant-b"]


def test_reset_prefix_cache_releases_pins_first(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([3] * 64, 2, session_id="x"))
    run_until_idle(s)
    assert s.reset_prefix_cache() is True
    assert free_blocks(s) == usable_blocks(s)


def test_admin_list_and_unknown_operation(harness_cfg, clock):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make([3] * 64, 2, session_id="x", xargs={"agent_role": "orchestrator"}))
    run_until_idle(s)
    clock.advance(1.5)
    [row] = s("list")["sessions"]
    assert row["session_id"] == "x" and row["role"] == "orchestrator" and row["pinned_blocks"] == 4
    assert row["idle_s"] == pytest.approx(1.5)
    assert "error" in s("frobnicate")
    s.add_request(f.make([4] * 64, 2, session_id="y", cache_salt="pepper"))
    run_until_idle(s)
    assert s("list", None, 1, None, "pinned_ids") == {"pinned_session_ids": ["x", "y"]}  # a router's index: all
    caller = Caller().as_args()  # an unsalted caller of no tenant: its own only
    assert s("list", caller, 1, None, "pinned_ids") == {"pinned_session_ids": ["x"]}


# ---- the invariant: pins never leak blocks, whatever happens --------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.integers(0, 4), st.integers(1, 400), st.sampled_from([None, 0.0, 1.0, 30.0])),
        st.tuples(st.just("anon"), st.integers(1, 700)),
        st.tuples(st.just("end"), st.integers(0, 4)),
        st.tuples(st.just("end_flag"), st.integers(0, 4), st.integers(1, 300)),
        st.tuples(st.just("tick"), st.floats(0.0, 40.0)),
        st.tuples(st.just("batch"), st.lists(st.tuples(st.integers(0, 4), st.integers(1, 300)), min_size=2, max_size=5)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_free_blocks_return_to_total_when_every_session_ends(harness_cfg, ops):
    from tests.conftest import FakeClock

    clock = FakeClock()
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    histories: dict[int, list[int]] = {}

    def turn(i: int, n: int, xargs: dict) -> None:
        histories[i] = histories.get(i, [1000 * (i + 1)]) + [i + 2] * n
        histories[i] = histories[i][-900:]
        s.add_request(f.make(histories[i], 3, session_id=f"s{i}", xargs=xargs))

    for op in ops:
        if op[0] == "turn":
            turn(op[1], op[2], {} if op[3] is None else {"ttl_s": op[3]})
        elif op[0] == "anon":
            s.add_request(f.make([9] * op[1], 3))
        elif op[0] == "end":
            s("end", f"s{op[1]}")
        elif op[0] == "end_flag":
            turn(op[1], op[2], {"session_end": 1})
        elif op[0] == "tick":
            clock.advance(op[1])
            s.kvsched.expire()
        else:
            for i, n in op[1]:
                turn(i, n, {})
        run_until_idle(s)
        # between steps nothing runs: every block is either free or held by a pin
        assert free_blocks(s) + len(_pinned_block_ids(s)) == usable_blocks(s)
        assert s.kvsched.policy.pinned_blocks_total == sum(r.pinned_blocks for r in s.kvsched.policy.sessions.values())
        for key, rec in s.kvsched.policy.sessions.items():  # the adapter holds exactly what the policy decided
            assert rec.pinned_blocks == sum(len(g) for g in s.kvsched.pinned.get(key, []))
    for i in range(5):
        s("end", f"s{i}")
    assert not any(not k.inferred for k in s.kvsched.pinned)
    s("end_all")  # inferred sessions (the anonymous requests) too
    assert free_blocks(s) == usable_blocks(s)
    assert not s.kvsched.pinned


def test_a_short_side_request_beside_a_long_turn_does_not_replace_its_pin(harness_cfg, clock):
    """A chat client's title request runs beside the conversation's turn under the same id, sends its one-block
    system prompt and first words and ends last: the session keeps the long turn's pin, and its next turn hits all of
    it. (A side request sharing only the system prompt is another conversation: a branch of its own.)"""
    s, f, counts = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK), PrefillCounts()
    system = list(range(100, 100 + BLOCK))  # one block
    history = system + list(range(300, 300 + 9 * BLOCK))  # 10 blocks
    s.add_request(f.make(history[:BLOCK + 3], 12, session_id="chat"))  # the title: arrives first, ends last
    s.add_request(f.make(history, 2, session_id="chat"))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["branches"] == 0  # the long turn continues the title's one-block anchor: one session
    [rec] = s.kvsched.policy.sessions.values()
    assert rec.pinned_blocks == 10 and s.kvsched.policy.counters["pins_kept_over_overlapping_turn"] == 1
    s.add_request(f.make(history + [4] * 20, 2, session_id="chat"))
    run_until_idle(s, counts=counts)
    assert counts.cached_tokens == 10 * BLOCK and s.kvsched.stats()["retained_hits"] == 1


def test_a_turn_rewritten_by_compaction_ends_the_branch_it_leaves_and_no_other(harness_cfg, clock):
    """The compaction middleware names each turn's conversation (`kvsched_conversation`, a digest of the client's
    messages) and marks a request it rewrote with the conversations it continues (`kvsched_compacted`): its prompt
    (system + summary + recent turns) continues no branch, so it starts one, and the branch whose last turn sent one of
    those conversations is ended at once (its KV freed, not held to its TTL). Found by review: the branch ended was the
    id's idle branch that finished last, whatever its conversation: another client's under the same id, or the same
    user's other chat (`user:` ids). A rewrite of another conversation, or a turn without the mark, ends nothing."""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    system = list(range(100, 100 + BLOCK))
    history = system + list(range(300, 300 + 9 * BLOCK))
    s.add_request(f.make(history, 2, session_id="c", xargs={"kvsched_conversation": "conv-a1"}))
    run_until_idle(s)
    assert len(_pinned_block_ids(s)) == 10
    s.add_request(f.make(system + [9] * (3 * BLOCK), 2, session_id="c",  # another conversation: both kept
                         xargs={"kvsched_conversation": "conv-b1"}))
    run_until_idle(s)
    assert s.kvsched.stats()["branches"] == 1 and len(_pinned_block_ids(s)) == 10 + 3
    s.add_request(f.make(history + [4] * BLOCK, 2, session_id="c", xargs={"kvsched_conversation": "conv-a2"}))
    run_until_idle(s)  # conversation a goes on: branch 0 finished last
    stranger = system + [6] * (2 * BLOCK)  # a rewrite of conversation b (or a stranger's own): not a's
    s.add_request(f.make(stranger, 2, session_id="c", xargs={"kvsched_compacted": ["conv-b1", "conv-x"],
                                                             "kvsched_conversation": "conv-b2"}))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["branches"] == 2 and stats["branches_superseded"] == 1
    assert sorted(k.branch for k in s.kvsched.policy.sessions) == [0, 2]  # b's branch 1 went, a's branch 0 stayed
    rewritten = system + [5] * (2 * BLOCK)  # a's rewrite: system + summary + the newest turn
    s.add_request(f.make(rewritten, 2, session_id="c", xargs={"kvsched_compacted": ["conv-a1", "conv-a2"],
                                                              "kvsched_conversation": "conv-a3"}))
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["branches"] == 3 and stats["branches_superseded"] == 2
    assert sorted(k.branch for k in s.kvsched.policy.sessions) == [2, 3]
    assert len(_pinned_block_ids(s)) == 3 + 3 - 1  # the two rewrites' branches (system + 2 each), system once
    assert free_blocks(s) == usable_blocks(s) - len(_pinned_block_ids(s))
    s.add_request(f.make(system + [7] * (2 * BLOCK), 2, session_id="c", xargs={"kvsched_compacted": 1}))
    run_until_idle(s)  # an older middleware's mark names no conversation: nothing ended
    assert s.kvsched.stats()["branches_superseded"] == 2


def test_a_streaming_input_request_is_one_turn_of_its_session(harness_cfg, clock):
    """A streaming-input request's next chunk and its end marker reach add_request under the request's own id. They
    are not new turns: the session must not count them as waiting (it would never expire, never be released as idle)
    and the request's entry must go when it finishes."""
    from vllm.v1.request import RequestStatus

    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    first = f.make(list(range(100, 140)), 3, session_id="stream", resumable=True)
    s.add_request(first)

    def run_chunk() -> None:
        for _ in range(20):
            step(s)
            if first.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
                return
        raise AssertionError("the chunk did not finish")

    run_chunk()
    s.add_request(f.make(list(range(200, 240)), 3, session_id="stream", request_id=first.request_id, resumable=True))
    run_chunk()
    s.add_request(f.make([1], 1, session_id="stream", request_id=first.request_id))  # the end of the input
    run_until_idle(s)
    (key, rec), = s.kvsched.policy.sessions.items()
    assert rec.waiting == 0 and rec.active_requests == 0 and rec.pinned_blocks >= 5
    assert s.kvsched.requests == {} and s.kvsched.started == set()
    assert s.kvsched.policy.counters["requests_with_session"] == 1
    clock.advance(s.kvsched.policy.config.default_ttl_s)
    s.kvsched.expire()  # idle: its pin expires like any other
    assert rec.pinned_blocks == 0 and free_blocks(s) == usable_blocks(s)


def test_a_preempted_request_is_not_held_up_by_its_running_sessions_other_pin(harness_cfg, clock):
    """Two requests of one session, the long one's prompt continuing the short one's only: the short one finishes and
    pins 19 blocks (its prompt and answer) the long one never hits; the long one, preempted meanwhile, needs them back.
    Its session runs, so no release order offered the pin: without the last resort the request waited until the pin's
    TTL (forever while turns kept coming). The order now offers a pin beyond a running request, after the idle ones:
    the pin's tail goes, as much as the request lacks."""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    short = f.make(list(range(10, 20)), 300, session_id="a")
    long = f.make([*range(10, 20), *range(1000, 1490)], 400, session_id="a")  # 57 blocks with its output, of 63
    s.add_request(short)
    s.add_request(long)
    run_until_idle(s, max_steps=2000)  # the clock stands still: no TTL can fire
    assert short.is_finished() and long.is_finished() and long.num_preemptions >= 1
    stats = s.kvsched.stats()
    assert stats["released_pressure"] + stats["released_pressure_partial"] >= 1
    assert free_blocks(s) + len(_pinned_block_ids(s)) == usable_blocks(s)


def test_a_streaming_input_requests_later_chunks_can_end_its_session(harness_cfg, clock):
    """The end flag on a streaming-input request's last chunk (or on its end marker) ends the session when the request
    finishes, as on any last turn (found by review: only the first chunk's hints were kept, so the pin stayed to its
    TTL)."""
    from vllm.v1.request import RequestStatus

    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    first = f.make(list(range(100, 140)), 3, session_id="stream", resumable=True)
    s.add_request(first)
    for update in ({"ttl_s": 5}, {"session_end": 1}):
        for _ in range(20):
            step(s)
            if first.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
                break
        s.add_request(f.make(list(range(200, 240)), 3, session_id="stream", request_id=first.request_id,
                             resumable=True, xargs=update))
    (_, hints), = s.kvsched.requests.values()
    assert hints.ttl_s == 5 and hints.end
    s.add_request(f.make([1], 1, session_id="stream", request_id=first.request_id))  # the end of the input
    run_until_idle(s)
    assert not s.kvsched.policy.sessions and s.kvsched.requests == {} and free_blocks(s) == usable_blocks(s)

