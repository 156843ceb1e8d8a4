"""The next-use estimate the release order is fed (`RetentionPolicy.expected_next_use_s`), driven by a hand-moved clock.

The simulator's diagnosis found why it matters: with the raw inter-turn EWMA, a
worker waiting on its orchestrator was "overdue", decayed to no value and was released just before it came back."""

from __future__ import annotations

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

WORKER, ORCH = TurnHints(role="worker"), TurnHints(role="orchestrator")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def turn(p: RetentionPolicy, key: SessionKey, hints: TurnHints, tokens: int = 1600) -> None:
    p.request_arrived(key, hints)
    p.turn_started(key, cached_tokens=0)
    p.turn_finished(key, hints, tokens, tokens // 16)


def test_without_history_the_session_gap_then_twice_the_idle_time():
    clock = Clock()
    p = RetentionPolicy(RetentionConfig(default_next_use_s=5.0), clock, 10_000, bytes_per_token=1024.0)
    a = SessionKey(SessionId("a"))
    turn(p, a, WORKER)
    rec = p.sessions[a]
    assert p.expected_next_use_s(rec, 2.0) == pytest.approx(5.0)  # not yet due: the expected gap
    assert p.expected_next_use_s(rec, 8.0) == pytest.approx(16.0)  # overdue: as long again, never "due now"


def test_the_roles_long_gaps_say_when_an_overdue_session_returns():
    clock = Clock()
    p = RetentionPolicy(RetentionConfig(), clock, 10_000, bytes_per_token=1024.0)
    a = SessionKey(SessionId("a"))
    turn(p, a, WORKER)
    for gap in (1.0, 1.0, 1.0, 10.0, 12.0, 14.0):  # three quick tool turns, three waits on the orchestrator
        clock.now += gap
        turn(p, a, WORKER)
    rec = p.sessions[a]
    assert p.expected_next_use_s(rec, 4.0) == pytest.approx(12.0)  # mean of 10, 12, 14
    assert p.expected_next_use_s(rec, 11.0) == pytest.approx(22.0)  # only 12 and 14 are longer: too few, 2 x idle
    other = SessionKey(SessionId("b"))  # a session of the same role with no history of its own uses the role's
    turn(p, other, WORKER)
    assert p.expected_next_use_s(p.sessions[other], 4.0) == pytest.approx(12.0)


def test_a_late_worker_outlasts_a_fresh_orchestrator_pin_that_is_not_needed_for_long():
    """The quick trace's pattern: orchestrators come back every ~25 s; workers every ~1.5 s within a round, then wait
    ~10 s for the next round. A worker 8 s into that wait is back in ~3 s; a just-finished orchestrator in ~25 s."""
    clock = Clock()
    p = RetentionPolicy(RetentionConfig(), clock, 10_000, bytes_per_token=1024.0)
    w, seen, o = SessionKey(SessionId("w")), SessionKey(SessionId("w-earlier")), SessionKey(SessionId("o"))
    turn(p, seen, WORKER)
    for gap in (10.0, 11.0, 12.0):  # another worker's waits between rounds
        clock.now += gap
        turn(p, seen, WORKER)
    turn(p, w, WORKER)
    for _ in range(4):
        clock.now += 1.5
        turn(p, w, WORKER)
    p.end(seen)
    turn(p, o, ORCH)
    for _ in range(2):
        clock.now += 25.0
        turn(p, o, ORCH)
    p.sessions[w].last_finished = clock.now - 8.0
    # With the raw EWMA (1.5 s) the worker was "overdue" from 3 s and worth ~4% of its value at 8 s: it went first.
    assert p.release_order() == [o, w]
    assert p.release_for_pressure(50) == [Release(o, ReleaseReason.PRESSURE, 50)]


def test_value_of_kv_held_elsewhere_uses_the_same_estimate_and_is_zero_once_the_session_is_gone():
    """The FP8 tier's order (`value_of`) and the pins' order must agree: same formula, same next-use estimate."""
    from kvsched.core.scoring import retention_value

    clock = Clock()
    p = RetentionPolicy(RetentionConfig(), clock, 10_000, bytes_per_token=1024.0)
    a = SessionKey(SessionId("a"))
    turn(p, a, WORKER)
    for gap in (1.0, 10.0, 12.0, 14.0):
        clock.now += gap
        turn(p, a, WORKER)
    clock.now += 4.0
    rec = p.sessions[a]
    pin = p.candidate(rec, clock.now)
    assert p.value_of(a, pin.tokens, 1024.0) == pytest.approx(retention_value(pin))
    assert p.value_of(a, pin.tokens, 512.0) == pytest.approx(2 * retention_value(pin))  # half the bytes: twice per byte
    p.end(a)
    assert p.value_of(a, 100, 512.0) == 0.0
