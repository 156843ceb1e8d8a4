"""Inferred sessions (no session field; kvsched.core.lineage) in the release order: once a later request continued
one, it is worth what a named session with the same history is, at every idle time; only a first turn nothing has
continued yet (a one-shot?) is worth less (`inferred_first_turn_weight`)."""

from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

NO_HINTS = TurnHints()
NAMED = SessionKey(SessionId("named-control"), tenant="a")
INFERRED = SessionKey(SessionId("inferred-1"), tenant="a", inferred=True)
ONE_SHOT = SessionKey(SessionId("inferred-1"), tenant="b", inferred=True)  # another tenant's request, never continued
# The gaps a shared server saw before (seconds between two turns of one session): none (a fresh server), quick ones
# (tool loops), quick ones and three long ones (sessions that came back later).
HISTORIES = {"fresh": (), "quick": (0.5,) * 20, "quick and long": (0.5,) * 20 + (20.0,) * 3}
IDLE_S = (0.0, 0.3, 0.6, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 16.0, 20.0, 28.0)


def turn(policy, clock, key, cached, tokens, blocks, run_s=0.05, hints=NO_HINTS):
    policy.request_arrived(key, hints)
    policy.turn_started(key, cached)
    clock.advance(run_s)
    policy.turn_finished(key, hints, tokens, blocks)


def scene(clock, conversation, history, idle_s):
    """The integration test's scene (tests/integration/test_zero_change.py): a two-turn conversation of 11 then 17
    blocks, idle `idle_s`, then another tenant's fresh one-shot of 21 blocks; the policy and its release order. The
    history's sessions end with their second turn (its end hint): every turn's outcome is learned since stop 52, and
    an end after that turn (a DELETE) would teach that second turns never return, which is not this test's history
    (tests/core/test_retention_later_turns.py is where such a history decides)."""
    p = RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=47, bytes_per_token=2048.0)
    for i, gap in enumerate(history):
        earlier = SessionKey(SessionId(f"earlier-{i}"), tenant="c")
        turn(p, clock, earlier, 0, 64, 2)
        clock.advance(gap)
        turn(p, clock, earlier, 32, 96, 3, hints=TurnHints(end=True))
    turn(p, clock, conversation, 160, 352, 11)
    clock.advance(0.1)
    turn(p, clock, conversation, 352, 544, 17)
    clock.advance(idle_s)
    turn(p, clock, ONE_SHOT, 0, 672, 21)
    return p, p.release_order()


@pytest.mark.parametrize("history", HISTORIES)
def test_a_continued_inferred_session_is_released_exactly_when_a_named_one_would_be(clock, history):
    """Same value, same place in the order, at every idle time, after any history."""
    for idle in IDLE_S:
        named, named_order = scene(type(clock)(clock.now), NAMED, HISTORIES[history], idle)
        inferred, inferred_order = scene(type(clock)(clock.now), INFERRED, HISTORIES[history], idle)
        assert inferred.sessions[INFERRED].turns == 2
        now = inferred.clock()
        assert named.clock() == now
        assert inferred.score(inferred.sessions[INFERRED], now) == named.score(named.sessions[NAMED], now), idle
        assert [k.inferred and k.tenant == "a" for k in inferred_order] == [k == NAMED for k in named_order], idle


def test_which_goes_first_a_conversation_or_a_fresh_one_shot_depends_on_how_long_the_conversation_idled(clock):
    """Why the integration test's flood asks for no retention: against another tenant's fresh one-shot pin, the
    conversation's pin (named or inferred alike) is kept while it idles briefly and goes first once it idles past the
    gaps the server has seen (its expected next use grows with its idle time), long before its 30 s TTL. How long
    that is depends on the server's history: seconds on a fresh server, a second after a few long gaps. (Every first
    turn of these histories came back within the TTL: a fresh one likely does too. Where most never do, the
    conversation stays: tests/core/test_retention_first_turns.py.)"""
    for conversation in (NAMED, INFERRED):
        first = {name: [scene(type(clock)(clock.now), conversation, gaps, idle)[1][0] == conversation
                        for idle in IDLE_S] for name, gaps in HISTORIES.items()}
        for name, flips in first.items():
            assert not flips[0] and flips[-1], name  # kept at once, released first well before the TTL
        # the first idle time at which it goes first: sooner after a history with long gaps
        at = {name: IDLE_S[flips.index(True)] for name, flips in first.items()}
        assert at["quick and long"] < at["quick"] < at["fresh"] < 30.0, at


def test_a_first_turn_nothing_continued_is_worth_half_a_named_one(clock):
    p = RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=47, bytes_per_token=2048.0)
    turn(p, clock, NAMED, 0, 672, 21)
    turn(p, clock, ONE_SHOT, 0, 672, 21)
    now = p.clock()
    named, one_shot = p.sessions[NAMED], p.sessions[ONE_SHOT]
    assert named.last_finished is not None and one_shot.last_finished is not None
    named.last_finished = one_shot.last_finished  # the same idle time
    assert p.score(one_shot, now) == pytest.approx(0.5 * p.score(named, now))


def first_turns(p, clock, keys, come_back):
    """A first turn of 21 blocks for each of `keys`; those that `come_back` send a second request 5 s later; then
    past the horizon, every outcome is counted."""
    for k in keys:
        turn(p, clock, k, 0, 672, 21)
        if come_back:
            clock.advance(5.0)
            p.request_arrived(k, NO_HINTS)
            p.request_abandoned(k)
        p.end(k)
        clock.advance(1.0)
    clock.advance(p.config.default_ttl_s + 1.0)
    p.returns.settle(clock.now)


def fresh_pair(p, clock):
    """Weights of a fresh named and a fresh inferred first turn of the same size."""
    named, inferred = SessionKey(SessionId("n-new"), tenant="a"), SessionKey(SessionId("i-new"), tenant="a",
                                                                              inferred=True)
    turn(p, clock, named, 0, 672, 21)
    turn(p, clock, inferred, 0, 672, 21)
    return p.weight_of(p.sessions[named]), p.weight_of(p.sessions[inferred])


def test_where_every_inferred_first_turn_comes_back_a_fresh_one_is_worth_what_a_named_one_is(clock):
    """Found by review: the factor multiplied a share already learned from those same inferred first turns, so where
    every client was headerless and every first turn came back, a first turn still counted half (0.5 of a named one)."""
    p = RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=4096,
                        bytes_per_token=2048.0)
    first_turns(p, clock, [SessionKey(SessionId(f"inferred-{i}"), tenant="b", inferred=True) for i in range(30)],
                come_back=True)
    named, inferred = fresh_pair(p, clock)
    assert inferred > 0.85 * named


def test_inferred_one_shots_are_learned_apart_from_named_first_turns(clock):
    """Named first turns all come back, inferred ones never (one-shots): each reads its own share, so the one-shots
    neither drag the named first turns' share down nor keep half of it."""
    p = RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=4096,
                        bytes_per_token=2048.0)
    first_turns(p, clock, [SessionKey(SessionId(f"n{i}"), tenant="b") for i in range(30)], come_back=True)
    first_turns(p, clock, [SessionKey(SessionId(f"inferred-{i}"), tenant="b", inferred=True) for i in range(30)],
                come_back=False)
    named, inferred = fresh_pair(p, clock)
    assert named > 1.6 and inferred < 0.1 * named  # (2 for a share of 1: the learned share over Laplace's 1/2)
