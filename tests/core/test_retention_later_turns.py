"""A burst's last turn against a live session's turn in the release order, after a history where bursts of that size
end at their fifth turn (tools/adversarial a2_honest, d_huge_plus_small; BENCHMARKS.md, stop 52).

Why the dead burst was kept: a later turn's value took p from Laplace's rule on the session's own hits, so a burst
that hit four times in a row (p 5/6), large (attention's term raises the recompute cost per byte), outranked a smaller
session that will come back; the pool held the burst's pin for its whole TTL while LRU would have evicted it first.
The fix: a later turn's p is also scaled by the learned share of turns of its class (turn index up to 8, the pin's
size octave, the gap before it) that came back within the horizon (`kvsched.core.return_model`), as a first turn's
already was; the model now awaits every turn's outcome, not only first turns'.

And a session back every ~34 s pinned for 30 s (d_huge_plus_small's huge one): its class's gaps, mostly the small
sessions' quick ones, said it would be back in a few seconds, so its large pin outranked theirs and lapsed before its
return. A pin's next use is now at least the session's own expected gap when that is past the pin's TTL
(`ReleaseValues.pin_next_use_s`).
"""

from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

NO_HINTS = TurnHints()
DEAD = SessionKey(SessionId("burst"), tenant="a")
LIVE = SessionKey(SessionId("returner"), tenant="b")
BIG, SMALL = 2048, 8  # blocks of a burst's and a returner's pin: 32,768 tokens doubles the recompute cost per byte
BLOCK = 16


def policy(clock):
    """No payback fallback: the release order alone."""
    return RetentionPolicy(replace(RetentionConfig(), payback_sampling=0), clock, total_blocks=100_000,
                           bytes_per_token=2048.0)


def turn(p, clock, key, k, blocks):
    """The session's `k`-th turn (from 1), hitting all of the previous turn's pin, holding `blocks` blocks at its
    end."""
    p.request_arrived(key, NO_HINTS)
    p.turn_started(key, 0 if k == 1 else blocks * BLOCK)
    clock.advance(0.05)
    p.turn_finished(key, NO_HINTS, blocks * BLOCK, blocks)


def history(p, clock, bursts=30, returners=30):
    """Earlier sessions of another tenant: `bursts` of 5 large turns 0.5 s apart that never come back, and
    `returners` of 5 small turns 0.5 s apart that come back for a sixth (then end); then the horizon passes."""
    for i in range(max(bursts, returners)):
        kinds = [("burst", BIG, 5)] * (i < bursts) + [("returner", SMALL, 6)] * (i < returners)
        for kind, blocks, turns in kinds:
            key = SessionKey(SessionId(f"{kind}-{i}"), tenant="c")
            for k in range(1, turns + 1):
                turn(p, clock, key, k, blocks)
                clock.advance(0.5)
            if kind == "returner":
                p.end(key)
        clock.advance(1.0)
    clock.advance(p.config.default_ttl_s + 1.0)
    p.expire()


def scene(clock, **kw):
    """DEAD's fifth turn (large, hit four times) and LIVE's fifth (small), interleaved 0.5 s apart: the order."""
    p = policy(clock)
    history(p, clock, **kw)
    for k in range(1, 6):
        turn(p, clock, DEAD, k, BIG)
        turn(p, clock, LIVE, k, SMALL)
        clock.advance(0.5)
    order = p.release_order()
    assert sorted(order) == sorted([DEAD, LIVE])  # the history's pins expired
    assert p.sessions[DEAD].hits == p.sessions[LIVE].hits == 4
    return p, order


def test_a_bursts_last_turn_goes_before_a_returner_where_such_bursts_never_came_back(clock):
    """30 bursts ended at their fifth turn, 30 returners came back after theirs: the burst's fifth turn is released
    first (before the fix: the returner, worth half the burst per byte by size alone)."""
    p, order = scene(clock)
    assert p.weight_of(p.sessions[DEAD]) < 0.25 * p.weight_of(p.sessions[LIVE])
    assert order[0] == DEAD


def test_where_such_bursts_came_back_the_larger_pin_stays(clock):
    """The trade-off kept: no burst in the history (the fifth turns of every size came back, as far as the model
    knows): the larger pin, worth more recompute per byte, stays and the returner goes first."""
    p, order = scene(clock, bursts=0)
    assert order[0] == LIVE


def test_later_turns_outcomes_are_learned(clock):
    """Every turn's outcome is awaited (not only first turns'): the fifth turns' share is known after the history."""
    p = policy(clock)
    history(p, clock, bursts=3, returners=2)
    p.returns.settle(clock())  # (the next event would)
    fifth = p.returns.by_turn[5]
    assert (fifth.returns, fifth.outcomes) == (2, 5)


PERIODIC = SessionKey(SessionId("periodic"), tenant="a")
QUICK = SessionKey(SessionId("quick"), tenant="b")


def test_a_session_back_later_than_its_pin_lasts_goes_before_one_its_class_expects_as_soon(clock):
    """20 sessions back after 0.5 s (their second turns end them, with the end hint: no outcome learned), then
    PERIODIC's second turn 40 s after its first (past the 30 s TTL) and QUICK's 0.5 s after its own: the class's gaps
    say both are due in ~2 s. PERIODIC, four times QUICK's pin, goes first (before the fix: QUICK, by size alone)."""
    p = policy(clock)
    start = clock()
    turn(p, clock, PERIODIC, 1, BIG)
    for i in range(20):
        key = SessionKey(SessionId(f"quick-{i}"), tenant="c")
        turn(p, clock, key, 1, SMALL)
        clock.advance(0.5)
        p.request_arrived(key, TurnHints(end=True))
        p.turn_started(key, SMALL * BLOCK)
        p.turn_finished(key, TurnHints(end=True), SMALL * BLOCK, SMALL)
        clock.advance(1.0)
    clock.advance(start + 40.0 - 0.6 - clock())
    turn(p, clock, QUICK, 1, BIG // 4)
    clock.advance(0.5)
    turn(p, clock, QUICK, 2, BIG // 4)
    turn(p, clock, PERIODIC, 2, BIG)
    periodic, quick = p.sessions[PERIODIC], p.sessions[QUICK]
    assert periodic.expected_gap_s > periodic.ttl_s == quick.ttl_s == 30.0 > quick.expected_gap_s
    assert p.expected_next_use_s(periodic, 0.0) < 5.0  # what its class says
    assert p.pin_next_use_s(periodic, 0.0) == periodic.expected_gap_s and p.pin_next_use_s(quick, 0.0) < 5.0
    assert p.release_order()[0] == PERIODIC
