"""Two headerless users whose identical first prompt joins them to one inferred session share it until one extends it
(`Lineage.shared_join`): meanwhile neither user's end hint ends it for the other, nor does either's TTL hint shorten
the other's pin (`RetentionPolicy.finish_hints`), nor does either's role hint replace the role set before it. Pure:
block hashes are tuples of tokens, the clock is the test's."""

from __future__ import annotations

from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.lineage import Lineage, LineageConfig
from kvsched.core.lineage_tail import tail_of
from kvsched.core.retention import Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionKey, TurnHints

BLOCK = 4
SYSTEM = list(range(1, 9))  # two full blocks
FIRST = [*SYSTEM, 50, 51, 52, 53, 54, 55]  # the first prompt both users send: three full blocks and two tokens


def hashes_of(tokens: list[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[: (i + 1) * BLOCK]) for i in range(len(tokens) // BLOCK)]


class Engine:
    """The pure core wired as the engine's adapter wires it (`SessionPins`, `SessionResolver`): lineage picks the
    session, the policy pins its turns; a request is (key, hints, joined a shared session)."""

    def __init__(self, clock) -> None:
        self.lineage = Lineage(LineageConfig())
        self.policy = RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=100,
                                      bytes_per_token=1.0)

    def arrive(self, prompt: list[int], hints: TurnHints = TurnHints()) -> tuple[SessionKey, TurnHints, bool]:
        key = self.lineage.infer(None, None, hashes_of(prompt), prompt, BLOCK, ending=hints.end)
        self.policy.request_arrived(key, hints, self.lineage.shared_join)
        self.policy.turn_started(key, 0)
        return key, hints, self.lineage.shared_join

    def finish(self, request: tuple[SessionKey, TurnHints, bool], prompt: list[int], answer: list[int]) -> list:
        key, hints, shared = request
        hints = self.policy.finish_hints(key, hints, shared)
        full = [*prompt, *answer][:-1]  # the last sampled token has no KV
        out = self.policy.turn_finished(key, hints, len(full) // BLOCK * BLOCK, len(full) // BLOCK)
        if hints.end:
            self.lineage.forget(key)
        else:
            h, done = hashes_of(prompt), hashes_of(full)
            self.lineage.finished(key, (len(h) - 1, h[-1]), tail_of(prompt, len(h) * BLOCK),
                                  (len(done) - 1, done[-1]) if done else None)
        return out


def test_a_repeated_prompt_shares_the_session_until_a_turn_extends_it():
    lin = Lineage(LineageConfig())
    a1 = lin.infer(None, None, hashes_of(FIRST), FIRST, BLOCK)
    assert not lin.shared_join
    lin.finished(a1, (2, hashes_of(FIRST)[-1]), tail_of(FIRST, 12))
    b1 = lin.infer(None, None, hashes_of(FIRST), FIRST, BLOCK)  # user B, the same first prompt
    assert b1 == a1 and lin.shared_join
    lin.finished(b1, (2, hashes_of(FIRST)[-1]), tail_of(FIRST, 12))
    a2 = [*FIRST, 60, 61, 62, 63, 64, 70, 71]  # user A's second turn: its answer and a new message
    assert lin.infer(None, None, hashes_of(a2), a2, BLOCK) == a1 and lin.shared_join  # joined while shared
    lin.finished(a1, (len(hashes_of(a2)) - 1, hashes_of(a2)[-1]), tail_of(a2, len(hashes_of(a2)) * BLOCK))
    a3 = [*a2, 80, 81, 82, 83, 84]
    assert lin.infer(None, None, hashes_of(a3), a3, BLOCK) == a1 and not lin.shared_join  # they diverged at a2


def test_a_continuation_adding_no_full_block_is_not_a_repeat():
    """A short answer and message that fill no block past the earlier prompt's: more tokens, so not shared."""
    lin = Lineage(LineageConfig())
    p1 = [*SYSTEM, 50, 51, 52, 53, 54]
    k = lin.infer(None, None, hashes_of(p1), p1, BLOCK)
    lin.finished(k, (2, hashes_of(p1)[-1]), tail_of(p1, 12))
    p2 = [*p1, 60, 61]  # still three full blocks
    assert lin.infer(None, None, hashes_of(p2), p2, BLOCK) == k and not lin.shared_join


def test_one_users_end_does_not_end_the_session_the_other_shares(clock):
    """A's first turn, then B's identical one joins A's session; B's second turn, which repeats B's answer, ends its
    session. Before: that ended the shared session, releasing the pin that holds the prompt A's next turn repeats.
    Now the end is ignored (counted), the pin moves to B's last turn (whose prefix holds A's first prompt) and lives
    out its TTL."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    clock.advance(1.0)
    assert e.finish(a1, FIRST, [60, 61, 62, 63]) == [Pin(a1[0])]
    b1 = e.arrive(FIRST)
    assert b1[0] == a1[0] and b1[2]
    clock.advance(1.0)
    e.finish(b1, FIRST, [90, 91, 92, 93])
    b2_prompt = [*FIRST, 90, 91, 92, 93, 95, 96]
    b2 = e.arrive(b2_prompt, TurnHints(end=True))
    assert b2[0] == a1[0] and b2[2]  # it repeats B's answer: it joins, in the window
    clock.advance(1.0)
    out = e.finish(b2, b2_prompt, [97, 98])
    assert out == [Pin(a1[0])] and a1[0] in e.policy.sessions
    assert e.policy.counters["inferred_shared_ends_ignored"] == 1 and e.policy.counters["sessions_ended"] == 0
    clock.advance(e.policy.config.default_ttl_s + 0.1)
    assert e.policy.expire() == [Release(a1[0], ReleaseReason.TTL)]


def test_an_unshared_sessions_end_still_ends_it(clock):
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, FIRST, [60, 61, 62, 63])
    a2_prompt = [*FIRST, 60, 61, 62, 63, 70]
    a2 = e.arrive(a2_prompt, TurnHints(end=True))
    assert a2[0] == a1[0] and not a2[2]
    assert e.finish(a2, a2_prompt, [71]) == []  # (its turn's start released the pin it did not hit)
    assert a1[0] not in e.policy.sessions and e.policy.counters["sessions_ended"] == 1
    assert e.policy.counters["inferred_shared_ends_ignored"] == 0


def test_one_users_ttl_hint_does_not_shorten_the_others_pin(clock):
    """A's first turn asks for 300 s; B's identical prompt asks for 5 s. Before: B's hint set the shared pin's TTL,
    and A's pin went after 5 s. Now the longer stays; an unshared session's next hint still sets it."""
    e = Engine(clock)
    a1 = e.arrive(FIRST, TurnHints(ttl_s=300.0))
    e.finish(a1, FIRST, [60, 61, 62, 63])
    b1 = e.arrive(FIRST, TurnHints(ttl_s=5.0))
    e.finish(b1, FIRST, [90, 91, 92, 93])
    rec = e.policy.sessions[a1[0]]
    assert rec.pinned and rec.ttl_s == 300.0
    clock.advance(10.0)
    assert e.policy.expire() == [] and rec.pinned
    b2_prompt = [*FIRST, 90, 91, 92, 93, 95]
    b2 = e.arrive(b2_prompt, TurnHints(ttl_s=5.0))  # extends B's turn: joined while shared, so not shorter either
    e.finish(b2, b2_prompt, [97, 98])
    assert rec.ttl_s == 300.0
    b3_prompt = [*b2_prompt, 97, 99]
    b3 = e.arrive(b3_prompt, TurnHints(ttl_s=5.0))  # they diverged: B's own hint holds again
    assert not b3[2]
    e.finish(b3, b3_prompt, [100])
    assert rec.ttl_s == 5.0


def test_an_end_of_the_whole_session_by_its_id_still_ends_a_shared_turn(clock):
    """`DELETE /kvsched/sessions/{id}` while a shared turn runs: that is an end of the session, not of one user."""
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, FIRST, [60, 61, 62, 63])
    b1 = e.arrive(FIRST)
    e.policy.end(b1[0])
    assert e.policy.finish_hints(b1[0], b1[1], b1[2]).end


def test_an_extending_turn_that_is_aborted_leaves_the_session_shared():
    """Only a finished turn that extends the session makes the two conversations diverge: one aborted before it ran
    (`Lineage.abandoned`) left the other user's turn where it was."""
    lin = Lineage(LineageConfig())
    for _ in range(2):  # A, then B with the same first prompt
        k = lin.infer(None, None, hashes_of(FIRST), FIRST, BLOCK)
        lin.finished(k, (2, hashes_of(FIRST)[-1]), tail_of(FIRST, 12))
    a2 = [*FIRST, 60, 61, 62, 63, 64, 70, 71]
    assert lin.infer(None, None, hashes_of(a2), a2, BLOCK) == k and lin.shared_join
    lin.abandoned(k)
    assert lin.infer(None, None, hashes_of(a2), a2, BLOCK) == k and lin.shared_join


def test_one_users_role_hint_does_not_change_the_role_the_session_has(clock):
    """A's first turn says orchestrator (weight 2); B's identical prompt says worker (1), and B's next turn, joined
    while shared, says planner. Before: each overwrote the session's role at arrival and at finish, halving the value
    of the pin A's next turn hits. Now the role set first stays (B's hints counted once a request); a shared turn may
    set a role where none is set, and after the two diverged B's own hint holds again."""
    e = Engine(clock)
    a1 = e.arrive(FIRST, TurnHints(role="orchestrator"))
    e.finish(a1, FIRST, [60, 61, 62, 63])
    rec = e.policy.sessions[a1[0]]
    b1 = e.arrive(FIRST, TurnHints(role="worker"))
    assert b1[0] == a1[0] and b1[2] and rec.role == "orchestrator"
    e.finish(b1, FIRST, [90, 91, 92, 93])
    assert rec.role == "orchestrator" and e.policy.weight_of(rec) == 2.0
    b2_prompt = [*FIRST, 90, 91, 92, 93, 95]
    b2 = e.arrive(b2_prompt, TurnHints(role="planner"))
    assert b2[2] and rec.role == "orchestrator"
    e.finish(b2, b2_prompt, [97, 98])
    assert rec.role == "orchestrator" and e.policy.counters["inferred_shared_roles_ignored"] == 2
    b3_prompt = [*b2_prompt, 97, 99]
    b3 = e.arrive(b3_prompt, TurnHints(role="worker"))  # they diverged at b2: B's own hint holds again
    assert not b3[2] and rec.role == "worker"


def test_a_shared_turn_sets_a_role_where_none_is_set(clock):
    e = Engine(clock)
    a1 = e.arrive(FIRST)
    e.finish(a1, FIRST, [60, 61, 62, 63])
    b1 = e.arrive(FIRST, TurnHints(role="planner"))
    assert b1[2] and e.policy.sessions[b1[0]].role == "planner"
    e.finish(b1, FIRST, [90, 91, 92, 93])
    assert e.policy.sessions[b1[0]].role == "planner" and e.policy.counters["inferred_shared_roles_ignored"] == 0
