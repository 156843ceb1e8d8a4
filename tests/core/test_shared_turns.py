"""The two leftovers of shared inferred sessions (`kvsched.core.shared_turns`): a client's retry of a prompt whose
first request was aborted or failed shares nothing (its user's end hint still ends the session), and a turn that
repeats a shared session's last prompt pins its answer beside the other user's instead of replacing it. Pure: the
lineage, the policy and the pin applier wired as the engine wires them, on a list-backed pool whose blocks are the
prompt's block contents (one block per content, as a prefix cache hit finds it)."""

from __future__ import annotations

from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.lineage import Lineage, LineageConfig
from kvsched.core.lineage_tail import tail_of
from kvsched.core.pin_apply import PinApplier
from kvsched.core.retention import Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import TurnHints
from kvsched.core.shared_turns import JoinedPins
from tests.core.test_lineage_shared import BLOCK, FIRST, hashes_of
from tests.core.test_pin_apply import ListPool

A_ANSWER = list(range(60, 70))  # FIRST is three full blocks and two tokens: each answer fills two more blocks
B_ANSWER = list(range(90, 100))


class Engine:
    """`SessionPins` and `SessionResolver` in miniature: lineage picks the session (`shared_join`, `shared_repeat`),
    the policy decides, the applier holds the blocks; a turn hits the leading run of its prompt's blocks held."""

    def __init__(self, clock, **config) -> None:
        self.lineage = Lineage(LineageConfig())
        cfg = replace(RetentionConfig(), payback_sampling=0, **config)
        self.policy = RetentionPolicy(cfg, clock, total_blocks=100, bytes_per_token=1.0)
        self.pins: PinApplier[int] = PinApplier(self.policy, ListPool(100), BLOCK)
        self.ids: dict[tuple[int, ...], int] = {}

    def block(self, h: tuple[int, ...]) -> int:
        return self.ids.setdefault(h, len(self.ids) + 1)

    def held(self) -> set[int]:
        return set(self.pins.pool.ref)

    def arrive(self, prompt: list[int], hints: TurnHints = TurnHints()):
        key = self.lineage.infer(None, None, hashes_of(prompt), prompt, BLOCK, ending=hints.end)
        shared, repeat = self.lineage.shared_join, self.lineage.shared_repeat
        self.policy.request_arrived(key, hints, shared, repeat)
        hit = 0
        for h in hashes_of(prompt)[: (len(prompt) - 1) // BLOCK]:  # vLLM hits at most the prompt less a token
            if self.block(h) not in self.held():
                break
            hit += 1
        self.pins.turn_started(key, hit * BLOCK)
        return key, hints, shared, prompt

    def finish(self, request, answer: list[int], normal: bool = True) -> list[int]:
        """The turn ends with `answer` (stopped, or aborted / failed when not `normal`); its blocks."""
        key, hints, shared, prompt = request
        hints = self.policy.finish_hints(key, hints, shared)
        full = [*prompt, *answer][:-1]  # the last sampled token has no KV
        chain = [self.block(h) for h in hashes_of(full)]
        self.pins.turn_finished(key, hints, [chain], len(chain) * BLOCK)
        if hints.end:
            self.lineage.forget(key)
        else:
            h = hashes_of(prompt)
            self.lineage.finished(key, (len(h) - 1, h[-1]), tail_of(prompt, len(h) * BLOCK),
                                  (len(chain) - 1, hashes_of(full)[-1]), normal=normal)
        return chain


# ---- (a) a retry ---------------------------------------------------------------------------------------------------
def test_a_retry_after_an_aborted_turn_shares_nothing_and_its_users_end_ends_the_session(clock):
    """A's first request ran, then was aborted (the client timed out) with a partial answer; A sends the same prompt
    again. Before: the retry repeated the session's last prompt, so the session was shared and A's next turn's end
    hint was ignored (the pin lived out its TTL). Now a prompt no turn answered is a retry: A's end ends it."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, [60], normal=False)
    retry = e.arrive(FIRST)
    assert retry[0] == a1[0] and not retry[2]
    e.finish(retry, A_ANSWER)
    a2_prompt = [*FIRST, *A_ANSWER, 70]
    a2 = e.arrive(a2_prompt, TurnHints(end=True))
    assert a2[0] == a1[0] and not a2[2]
    e.finish(a2, [71])
    assert a1[0] not in e.policy.sessions and e.policy.counters["sessions_ended"] == 1
    assert e.policy.counters["inferred_shared_ends_ignored"] == 0 and not e.held()


def test_a_retry_that_fails_again_is_still_a_retry_and_an_answered_prompt_is_shared_again(clock):
    """Two aborted requests, then the third answers: a stranger's identical prompt after that shares the session, as
    after any answered turn."""
    e = Engine(clock)
    for _ in range(2):
        r = e.arrive(FIRST)
        assert not r[2]
        e.finish(r, [60], normal=False)
    r = e.arrive(FIRST)
    assert not r[2]
    e.finish(r, A_ANSWER)
    b1 = e.arrive(FIRST)
    assert b1[0] == r[0] and b1[2]


def test_a_repeat_is_shared_while_any_turn_that_sent_the_prompt_was_answered(clock):
    """A answered; B's identical prompt shares the session, and B's request fails; B's retry still shares it (A's
    answer is A's conversation)."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    b1 = e.arrive(FIRST)
    assert b1[2]
    e.finish(b1, [90], normal=False)
    b1_again = e.arrive(FIRST)
    assert b1_again[0] == a1[0] and b1_again[2]


def test_a_retry_while_the_first_request_still_runs_is_a_session_of_its_own():
    """A session with a turn in flight is joined by nothing: the retry shares nothing either way."""
    lin = Lineage(LineageConfig())
    first = lin.infer(None, None, hashes_of(FIRST), FIRST, BLOCK)
    retry = lin.infer(None, None, hashes_of(FIRST), FIRST, BLOCK)
    assert retry != first and not lin.shared_join


# ---- (b) both answers pinned -----------------------------------------------------------------------------------------
def test_a_repeat_pins_its_answer_beside_the_other_users_answer(clock):
    """A's first turn pins its prompt and answer (5 blocks); B's identical prompt joins (shared) and gets another
    answer. Before: B's start released A's answer (it hit only the prompt), and B's finish pinned B's chain alone.
    Now both answers stay pinned (7 blocks), and each user's next turn hits its own whole chain."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    a_chain = e.finish(a1, A_ANSWER)
    assert e.held() == set(a_chain) and len(a_chain) == 5
    b1 = e.arrive(FIRST)
    assert b1[2] and e.held() == set(a_chain)  # B's start keeps A's answer
    b_chain = e.finish(b1, B_ANSWER)
    assert e.held() == set(a_chain) | set(b_chain) and len(e.held()) == 7
    rec = e.policy.sessions[a1[0]]
    assert rec.pinned_blocks == 7 and rec.pinned_tokens == 7 * BLOCK
    assert e.pins.pinned[a1[0]] == [[*a_chain, *b_chain[3:]]]  # A's chain, then B's answer (released first)


def test_the_turn_that_extends_one_answer_makes_its_chain_the_sessions_pin(clock):
    """After the union, B's next turn (extending B's answer) ends the sharing: its chain is the session's pin; A's
    answer leaves the session for a companion of its own (`kvsched.core.shared_answers`) until the union's TTL."""
    e = Engine(clock)
    a_chain = e.finish(e.arrive(FIRST), A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    b2_prompt = [*FIRST, *B_ANSWER, 110, 111, 112]
    b2 = e.arrive(b2_prompt)
    assert b2[2]  # joined while shared: its hints are not the session's alone, but it extends
    b2_chain = e.finish(b2, [113, 114])
    assert e.pins.pinned[b2[0]] == [b2_chain] and set(b_chain) <= set(b2_chain)
    assert e.held() == set(b2_chain) | set(a_chain) and [[*a_chain]] in e.pins.pinned.values()
    b3 = e.arrive([*b2_prompt, 113, 115])
    assert not b3[2]  # they diverged


def test_an_identical_answer_adds_nothing_and_a_third_users_answer_joins_too(clock):
    e = Engine(clock)
    a_chain = e.finish(e.arrive(FIRST), A_ANSWER)
    e.finish(e.arrive(FIRST), A_ANSWER)  # the same words back: the same blocks' contents
    assert e.held() == set(a_chain) and e.policy.sessions[next(iter(e.policy.sessions))].pinned_blocks == 5
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    c_chain = e.finish(e.arrive(FIRST), list(range(80, 90)))
    assert e.held() == set(a_chain) | set(b_chain) | set(c_chain) and len(e.held()) == 9


def test_the_union_stays_within_the_pin_budget_and_expires_whole(clock):
    """A budget of 6 blocks: the union (7) would pass it, so B's chain replaces A's as before; with room, the union's
    TTL releases it whole."""
    e = Engine(clock, pin_budget_fraction=0.06)
    a_chain = e.finish(e.arrive(FIRST), A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    assert e.held() == set(b_chain) and not set(a_chain[3:]) & e.held()
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    e.finish(e.arrive(FIRST), B_ANSWER)
    clock.advance(e.policy.sessions[a1[0]].ttl_s + 0.1)
    e.pins.expire()
    assert not e.held() and e.policy.counters["released_ttl"] == 1


def test_under_pressure_the_union_releases_the_answer_added_last_first(clock):
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    a_chain = e.finish(a1, A_ANSWER)
    b_chain = e.finish(e.arrive(FIRST), B_ANSWER)
    assert e.policy.release_blocks(2, ReleaseReason.PRESSURE) == [Release(a1[0], ReleaseReason.PRESSURE, 2)]
    e.pins.unpin(a1[0], 2)
    assert e.held() == set(a_chain) and not set(b_chain[3:]) & e.held()


def test_joined_pin_compares_blocks_by_content():
    """Two blocks with one content (vLLM caches a block per request that decodes it) count once; a block without a
    content key, or a union past the budget, leaves the turn's own pin."""
    content = {1: "p1", 2: "p2", 3: "a1", 4: "a2", 5: "a1", 6: "b2"}

    def keys(blocks: list[int]) -> list[tuple[str, int]]:
        return [(content[b], b) for b in blocks if b in content]

    def join(old, new, tokens, old_tokens, budget):
        return JoinedPins().join("s", old, new, tokens, old_tokens, 4, budget, keys)

    assert join([[1, 2, 3, 4]], [[1, 2, 5, 6]], 16, 16, 100) == ([[1, 2, 3, 4, 6]], 20, True)
    assert join([[1, 2, 3, 4]], [[1, 2, 5, 7]], 16, 16, 100) == ([[1, 2, 5, 7]], 16, True)  # 7: no content key
    assert join([[1, 2, 3, 4]], [[1, 2, 5, 6]], 16, 16, 4) == ([[1, 2, 5, 6]], 16, True)  # past the budget
    assert join(None, [[1, 2]], 8, 0, 100) == ([[1, 2]], 8, True)
    assert join([[1, 2, 3, 4]], [[1, 2, 5, 4]], 16, 16, 100) == ([[1, 2, 5, 4]], 16, False)  # the same answer: its own
