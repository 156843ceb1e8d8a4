"""A live conversation against a fresh first turn in the release order, after a gap history with quick and long gaps
(stop 49: tests/integration/test_zero_change.py's flood).

Why the conversation sank: its value is p / wait (`kvsched.core.scoring`), wait from the mean residual of the gaps
longer than its idle time (`RetentionPolicy.expected_next_use_s`). Idle past the quick gaps, only the long ones are
left (a wait of ~60 s here); the fresh first turn, idle 0, is credited with every gap, the quick ones included (~22 s).
Those are the gaps of sessions that came back: a first turn's p was Laplace's 1/2 whatever share of first turns comes
back at all (Mooncake conversation: 69% of sessions are single-turn). So p 0.8 / 60 s lost to p 0.5 / 22 s.
The fix: a first turn's p is the learned share of first turns that came back within the horizon
(`kvsched.core.return_model`, by size class, shrunk to the turn index's share), so a one-shot-heavy workload's fresh
first turns rank by what they are worth; where first turns do come back (tool loops), they keep their rank.
"""

from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

NO_HINTS = TurnHints()
CONVERSATION = SessionKey(SessionId("conversation"), tenant="a")
FRESH = SessionKey(SessionId("fresh"), tenant="b")
TOKENS, BLOCKS = 640, 40  # both pins the same size: size plays no part


def policy(clock):
    """No payback fallback: the release order alone."""
    return RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=1000,
                           bytes_per_token=2048.0)


def turn(policy, clock, key, cached, tokens=64, blocks=4, run_s=0.05):
    policy.request_arrived(key, NO_HINTS)
    policy.turn_started(key, cached)
    clock.advance(run_s)
    policy.turn_finished(key, NO_HINTS, tokens, blocks)


def history(policy, clock, one_shots, quick, long, long_gap_s=60.0):
    """Earlier sessions of another tenant: `one_shots` first turns that never come back, `quick` sessions back after
    0.5 s and `long` after `long_gap_s` (each then ended), interleaved; then the horizon passes (outcomes known)."""
    kinds = ["one"] * one_shots + ["quick"] * quick + ["long"] * long
    for i, kind in enumerate(kinds[k] for k in sorted(range(len(kinds)), key=lambda k: (k * 37) % len(kinds))):
        key = SessionKey(SessionId(f"earlier-{i}"), tenant="c")
        turn(policy, clock, key, 0)
        if kind != "one":
            clock.advance(0.5 if kind == "quick" else long_gap_s)
            turn(policy, clock, key, 64, 96, 6)
            policy.end(key)
        clock.advance(1.0)
    clock.advance(policy.config.default_ttl_s + 1.0)
    policy.expire()


def scene(clock, idle_s, one_shots=69, quick=20, long=11):
    """A 4-turn conversation (0.5 s apart, each turn hitting the last) idle `idle_s`, then a fresh first turn of the
    same size; the policy (no payback fallback: the order alone) and its release order."""
    p = policy(clock)
    history(p, clock, one_shots, quick, long)
    for t in range(4):
        turn(p, clock, CONVERSATION, 64 * t, TOKENS if t == 3 else 64 * (t + 1), BLOCKS if t == 3 else 4 * (t + 1))
        clock.advance(0.5 if t < 3 else idle_s)
    turn(p, clock, FRESH, 0, TOKENS, BLOCKS)
    order = p.release_order()
    assert sorted(order) == sorted([CONVERSATION, FRESH])  # the history's pins expired
    return p, order


@pytest.mark.parametrize("idle_s", [0.0, 0.6, 1.0, 5.0, 20.0])
def test_a_conversation_idle_past_the_quick_gaps_outranks_a_fresh_first_turn_where_most_never_return(clock, idle_s):
    """69 one-shots, 20 sessions back in 0.5 s, 11 in 60 s (past the 30 s TTL): first turns come back within the TTL
    20% of the time. Before the fix the conversation went first from 0.6 s of idle (p 0.8 over a 60 s wait against
    the first turn's 0.5 over 22 s); now the fresh first turn does (p ~0.2), at every idle time of the TTL."""
    p, order = scene(type(clock)(clock.now), idle_s)
    assert p.sessions[CONVERSATION].turns == 4 and p.sessions[FRESH].turns == 1
    if idle_s > 0.5:  # past the quick gaps: a longer wait than the fresh first turn's
        assert p.expected_next_use_s(p.sessions[CONVERSATION], idle_s) > 2 * p.expected_next_use_s(p.sessions[FRESH], 0)
    assert order[0] == FRESH, idle_s


def test_where_first_turns_do_return_a_fresh_one_still_outranks_a_conversation_past_the_quick_gaps(clock):
    """The trade-off kept: the same gaps, no one-shots (every first turn came back, 20 of 31 in 0.5 s). A fresh first
    turn then likely returns within a second; a conversation idle 1 s has outlived the quick gaps: it goes first."""
    p, order = scene(type(clock)(clock.now), 1.0, one_shots=0)
    assert order[0] == CONVERSATION
    p, order = scene(type(clock)(clock.now), 0.0, one_shots=0)
    assert order[0] == FRESH  # not yet past them: the conversation (p 0.8) stays


def test_a_fresh_model_leaves_a_first_turn_at_laplaces_half(clock):
    """Nothing learned yet: the first turn's value is the formula's (the model's prior is Laplace's 1/2 too)."""
    p = policy(clock)
    turn(p, clock, FRESH, 0, TOKENS, BLOCKS)
    assert p.weight_of(p.sessions[FRESH]) == p.config.role_weight(None)
