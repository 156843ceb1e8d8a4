"""Review of the union pins of shared inferred sessions (`kvsched.core.shared_turns.JoinedPins`): a turn continuing
one answer of a union pin, and the cap on the answers one shared pin keeps (`KVSCHED_SHARED_PIN_ANSWERS`)."""

from __future__ import annotations

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import ReleaseReason
from kvsched.core.shared_turns import DEFAULT_PIN_ANSWERS, JoinedPins
from tests.core.test_shared_turns import A_ANSWER, B_ANSWER, FIRST, Engine

C_ANSWER = list(range(80, 90))


def answer(n: int) -> list[int]:
    """A distinct sampled answer: two full blocks past the first prompt, like A_ANSWER."""
    return list(range(200 + 10 * n, 210 + 10 * n))


def test_a_turn_continuing_the_answer_added_last_leaves_the_other_answer_releasable(clock):
    """The union [prompt, A's answer, B's answer]; B's next turn hits the prompt and B's answer (5 of 7 blocks).
    Before: its start released the pin's tail, 2 blocks (B's answer, which its request holds anyway), and kept A's
    answer pinned while counting the pin as all held by the running request: no release for pressure or budget
    could free A's blocks until B's turn finished (`release_for_pressure` offered nothing). Now the pin stays whole
    and releasable beyond the running request; B's finish makes its chain the pin."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    a_chain = e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    b2_prompt = [*FIRST, *B_ANSWER, 110, 111, 112]
    b2 = e.arrive(b2_prompt)
    rec = e.policy.sessions[a1[0]]
    assert rec.pinned_blocks == 7 and set(a_chain) | set(b_chain) <= e.held()
    releases = e.policy.release_for_pressure(7)
    assert [r.key for r in releases] == [a1[0]] and releases[0].reason is ReleaseReason.PRESSURE
    e.pins.apply(releases)
    assert not set(a_chain[3:]) & e.held()  # A's answer (held by no request) could be freed
    b2_chain = e.finish(b2, [113, 114])
    assert e.held() == set(b2_chain) and rec.pinned_blocks == len(b2_chain) and not rec.union_pin


def test_a_turn_continuing_the_first_answer_leaves_the_others_pinned_until_the_unions_ttl(clock):
    """A's next turn continues A's answer: the session's pin becomes its chain. Before: B's answer was dropped at that
    finish (given back uncounted, never demoted), though B had not been gone the pin's TTL. Now B's chain (prompt and
    answer) stays under a companion session with the union's history: released by the TTL the union had, as a TTL
    release (which demotes to the tier), while the session's own pin runs on from A's turn."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    union = e.policy.sessions[a1[0]]
    expires = union.expires_at
    clock.advance(10.0)
    a2 = e.arrive([*FIRST, *A_ANSWER, 70, 71, 72])
    assert union.pinned_blocks == 7  # kept while A's turn runs (beyond it: releasable)
    a2_chain = e.finish(a2, [73, 74])
    assert e.held() == set(a2_chain) | set(b_chain) and a1[0] not in e.pins.joined and not union.union_pin
    assert union.pinned_blocks == len(a2_chain) and e.pins.pinned[a1[0]] == [a2_chain]
    [(other, rec)] = [(k, r) for k, r in e.policy.sessions.items() if k != a1[0]]
    assert other == a1[0]._replace(branch=-1) and e.pins.pinned[other] == [b_chain]
    assert rec.pinned_blocks == 5 and rec.expires_at == expires and rec.turns == 2
    assert e.policy.counters["shared_answers_kept"] == 1
    e.pins.log = []
    clock.now = expires + 0.5
    e.pins.expire()
    assert [(a.op, a.session, a.reason, a.blocks) for a in e.pins.log] == [("release", other.session_id, "ttl", 5)]
    assert e.held() == set(a2_chain) and not rec.pinned and union.pinned_blocks == len(a2_chain)


def test_a_continuation_keeps_only_the_answers_it_did_not_continue_and_nothing_when_none_is_left(clock):
    """Three answers, C's next turn: the companion holds A's and B's chains, not C's answer. A union whose other
    answers a pressure release already took (only the prompt left beside C's chain) leaves no companion."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    a_chain = e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    c_chain = e.finish(e.arrive(FIRST), C_ANSWER)
    c2_chain = e.finish(e.arrive([*FIRST, *C_ANSWER, 70, 71, 72]), [73, 74])
    other = a1[0]._replace(branch=-1)
    assert e.pins.pinned[other] == [[*a_chain, *b_chain[3:]]] and not set(c_chain[3:]) & set(e.pins.pinned[other][0])
    assert e.held() == set(c2_chain) | set(a_chain) | set(b_chain)
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    b2 = e.arrive([*FIRST, *B_ANSWER, 70, 71, 72])
    e.pins.apply(e.policy.release_for_pressure(7))  # the union goes whole (beyond B's running turn)
    b2_chain = e.finish(b2, [73, 74])
    assert list(e.pins.pinned) == [a1[0]] and e.held() == set(b2_chain)


def test_an_answer_leaves_the_companion_when_its_user_is_back_and_the_companion_ends_with_the_last(clock):
    """A continued; the companion keeps B's and C's chains. B's next turn (a session of its own) hits B's answer and
    pins its chain. Before: the companion held B's answer on to the union's TTL, counted in the budget and the release
    order. Now B's answer leaves it at that finish (the companion keeps C's chain, its count C's blocks), and C's
    return ends it, record and all."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    c_chain = e.finish(e.arrive(FIRST), C_ANSWER)
    e.finish(e.arrive([*FIRST, *A_ANSWER, 70, 71, 72]), [73, 74])
    other = a1[0]._replace(branch=-1)
    assert e.pins.pinned[other] == [[*b_chain, *c_chain[3:]]]
    b2 = e.arrive([*FIRST, *B_ANSWER, 110, 111, 112])
    assert b2[0] != a1[0]
    e.finish(b2, [113, 114])
    rec = e.policy.sessions[other]
    assert e.pins.pinned[other] == [c_chain] and rec.pinned_blocks == len(c_chain) and rec.pinned_tokens == 20
    assert e.policy.pinned_blocks_total == sum(r.pinned_blocks for r in e.policy.sessions.values())
    e.finish(e.arrive([*FIRST, *C_ANSWER, 120, 121, 122]), [123, 124])
    assert other not in e.pins.pinned and other not in e.policy.sessions and not e.pins.others.chains
    assert e.policy.counters["shared_answers_returned"] == 2 and e.policy.counters["released_turn"] == 1
    assert e.policy.pinned_blocks_total == sum(r.pinned_blocks for r in e.policy.sessions.values())


def test_a_companion_ended_by_its_users_return_lets_its_tier_blocks_go(clock):
    """Pressure took B's answer from the companion into the FP8 tier (2 blocks under the companion's owner). B's next
    turn recomputes them and pins its chain: the companion, keeping no answer now, ends. Before the end dropped its
    tier blocks too, they stayed owned by a session no longer tracked (worth nothing to the value order, but held
    until evicted); now they go as an ended session's do."""
    from kvsched.core.tier import TierConfig, TierDirectory

    e = Engine(clock)
    directory = TierDirectory(TierConfig(budget_bytes=10 * 1024), 1024, lambda owner: 0.0)
    e.pins.attach_tier(directory, lambda key, blocks, start: len(directory.demote(key, blocks, start)))
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    e.finish(e.arrive([*FIRST, *A_ANSWER, 70, 71, 72]), [73, 74])
    other = a1[0]._replace(branch=-1)
    e.pins.apply(e.policy.release_for_pressure(2, exclude=[a1[0]]))
    assert directory.keys_of[other] == [f"k{b}" for b in b_chain[3:]] and e.pins.pinned[other] == [b_chain[:3]]
    e.finish(e.arrive([*FIRST, *B_ANSWER, 110, 111, 112]), [113, 114])
    assert other not in e.policy.sessions and other not in e.pins.pinned and other not in directory.keys_of


def test_a_shared_pin_keeps_at_most_its_cap_of_answers_the_oldest_added_leaves_first(clock):
    """Cap 2: A, B, then C. Before: the pin held all three answers (bounded by the pin budget only). Now A's answer
    leaves; the prompt stays, and the policy's count is what the pin holds."""
    e = Engine(clock, shared_pin_answers=2)
    a1 = e.arrive(FIRST)
    a_chain = e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    c_chain = e.finish(e.arrive(FIRST), C_ANSWER)
    assert e.held() == set(b_chain) | set(c_chain) and not set(a_chain[3:]) & e.held()
    rec = e.policy.sessions[a1[0]]
    assert rec.pinned_blocks == 7 and rec.pinned_tokens == 7 * 4 and rec.union_pin
    assert e.pins.pinned[a1[0]] == [[*b_chain, *c_chain[3:]]] and len(e.pins.joined.answers[a1[0]]) == 2


def test_the_default_cap_is_four_answers(clock):
    e = Engine(clock)
    chains = [e.finish(e.arrive(FIRST), answer(n)) for n in range(DEFAULT_PIN_ANSWERS + 2)]
    kept = set().union(*map(set, chains[2:]))
    assert e.held() == kept and len(e.held()) == 3 + 2 * DEFAULT_PIN_ANSWERS


def test_an_answer_sharing_blocks_with_a_kept_one_keeps_them():
    """Answers A = (a1, a2), B = (a1, b2), C = (c1, c2) with cap 2: A leaves, but a1 stays (B's chain holds it)."""
    content = {1: "p", 2: "a1", 3: "a2", 4: "a1", 5: "b2", 6: "c1", 7: "c2"}

    def keys(blocks: list[int]) -> list[tuple[str, int]]:
        return [(content[b], b) for b in blocks]

    j = JoinedPins(cap=2)
    pin, tokens, _ = j.join("s", [[1, 2, 3]], [[1, 4, 5]], 12, 12, 4, 100, keys)
    assert pin == [[1, 2, 3, 5]] and tokens == 16 and "s" in j
    pin, tokens, _ = j.join("s", pin, [[1, 6, 7]], 12, tokens, 4, 100, keys)
    assert pin == [[1, 2, 5, 6, 7]] and tokens == 20


def test_the_cap_is_read_from_its_variable_and_checked():
    assert RetentionConfig.from_env({"KVSCHED_SHARED_PIN_ANSWERS": "2"}).shared_pin_answers == 2
    assert RetentionConfig.from_env({}).shared_pin_answers == DEFAULT_PIN_ANSWERS == 4
    with pytest.raises(ValueError, match="KVSCHED_SHARED_PIN_ANSWERS"):
        RetentionConfig.from_env({"KVSCHED_SHARED_PIN_ANSWERS": "0"})
    with pytest.raises(ValueError, match="KVSCHED_SHARED_PIN_ANSWERS"):
        RetentionConfig.from_env({"KVSCHED_SHARED_PIN_ANSWERS": "many"})
