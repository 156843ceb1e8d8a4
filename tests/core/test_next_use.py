"""The next-use estimate the release order is fed (`RetentionPolicy.expected_next_use_s`), driven by a hand-moved clock.

The simulator's diagnosis found why it matters: with the raw inter-turn EWMA, a
worker waiting on its orchestrator was "overdue", decayed to no value and was released just before it came back; with
the role's gaps alone, a worker that had just ended its round looked as due as one between two tool calls (the burst
phase tests below)."""

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


# ---- burst phase (`kvsched.core.next_use`) ----------------------------------------------------------------------------
def test_gap_history_keeps_the_latest_window_sorted_as_gaps_come_and_go():
    from kvsched.core.next_use import GapHistory

    h = GapHistory(window=4)
    for g in (5.0, 1.0, 3.0, 2.0):
        h.add(g)
    assert h.median() == 3.0  # upper median of 1 2 3 5
    assert h.mean_residual(1.5, 1) == pytest.approx((2 + 3 + 5) / 3 - 1.5)
    h.add(4.0)  # 5 leaves the window (the oldest), not the largest by accident
    assert h.mean_residual(3.5, 1) == pytest.approx(0.5)
    h.add(1.0)  # the first 1 leaves: one copy of a repeated value
    h.add(6.0)  # 3 leaves: window 2 4 1 6
    assert h.median() == 4.0
    assert h.mean_residual(0.0, 4) == pytest.approx(13 / 4)
    assert h.mean_residual(3.0, 3) is None  # only 4 and 6 are longer


def test_gap_history_sums_are_a_full_rebuilds_bit_for_bit_whatever_was_added_and_asked_in_between():
    """The sums of the largest gaps are kept across adds and extended only as far as a query needs; every answer must
    equal the one from summing the window's gaps above the idle time afresh, largest first, to the last bit (the
    release order compares these values: an ulp's difference could reorder two sessions)."""
    import random
    from itertools import accumulate

    from kvsched.core.next_use import GapHistory

    rng = random.Random(7)
    for window in (1, 5, 64):
        h = GapHistory(window)
        for _ in range(600):
            h.add(rng.choice((rng.uniform(0, 50), rng.expovariate(0.1), float(rng.randint(0, 5)))))
            for _ in range(rng.randint(0, 3)):
                idle = rng.uniform(-1, 60)
                longer = sorted(g for g in h.recent if g > idle)
                expected = (list(accumulate(reversed(longer), initial=0.0))[-1] / len(longer) - idle
                            if longer else None)
                assert h.mean_residual(idle, 1) == expected


def run_worker(p: RetentionPolicy, clock: Clock, key: SessionKey, gaps: tuple[float, ...]) -> None:
    """One turn, then one more after each gap."""
    turn(p, key, WORKER)
    for gap in gaps:
        clock.now += gap
        turn(p, key, WORKER)


def test_a_gap_over_twice_the_roles_median_ends_the_burst():
    clock = Clock()
    p = RetentionPolicy(RetentionConfig(), clock, 10_000, bytes_per_token=1024.0)
    a = SessionKey(SessionId("a"))
    phases = []
    turn(p, a, WORKER)
    for gap in (1.0, 1.0, 1.0, 10.0, 1.0, 2.0, 1.0, 10.0):  # 2.0 is exactly twice the median: not long
        phases.append(p.sessions[a].burst_turns)
        clock.now += gap
        turn(p, a, WORKER)
    assert phases == [1, 2, 3, 4, 1, 2, 3, 4]
    assert p.sessions[a].burst_turns == 1
    assert list(p.gaps.by_phase[("worker", 4)].recent) == [10.0, 10.0]
    assert list(p.gaps.by_phase[("worker", 1)].recent) == [1.0, 1.0]


def test_a_worker_that_ended_its_round_waits_like_the_others_that_did_and_goes_first():
    """Workers run four tool turns ~1.5 s apart, then wait ~10 s for the next round. X has just ended its round (idle
    1 s); Y is between two tool calls (idle 0.5 s). By role alone both were due at 3.1 s and Y, with the longer wait
    left, went first; by burst phase X is back at 10 s and Y at 1.5 s."""
    clock = Clock()
    p = RetentionPolicy(RetentionConfig(), clock, 10_000, bytes_per_token=1024.0)
    for i, wait in enumerate((9.0, 10.0, 11.0)):
        run_worker(p, clock, SessionKey(SessionId(f"seen-{i}")), (1.5, 1.5, 1.5, wait))
    x, y = SessionKey(SessionId("x")), SessionKey(SessionId("y"))
    run_worker(p, clock, x, (1.5, 1.5, 1.5))
    run_worker(p, clock, y, (1.5,))
    for i in range(3):
        p.end(SessionKey(SessionId(f"seen-{i}")))
    p.sessions[x].last_finished = clock.now - 1.0
    p.sessions[y].last_finished = clock.now - 0.5
    assert p.expected_next_use_s(p.sessions[x], 1.0) == pytest.approx(10.0)  # mean of 9, 10, 11 after a 4th turn
    assert p.expected_next_use_s(p.sessions[y], 0.5) == pytest.approx(1.5)  # after a 2nd turn: 1.5 every time
    assert p.release_order() == [x, y]
    assert p.release_for_pressure(150) == [Release(x, ReleaseReason.PRESSURE), Release(y, ReleaseReason.PRESSURE, 50)]
    # Past every gap its phase has seen, Y falls back to the role's gaps: only the round waits are that long.
    assert p.expected_next_use_s(p.sessions[y], 1.6) == pytest.approx(10.0)


def test_phases_past_the_cap_share_one_class():
    from kvsched.core.next_use import GapModel

    m = GapModel(window=8, min_samples=2, max_phase=3)
    m.observe("w", 3, 4.0)
    m.observe("w", 7, 6.0)
    m.observe("w", 1, 100.0)
    assert m.mean_residual("w", 12, 1.0) == pytest.approx(4.0)  # phases 3 and 7: mean 5, minus the idle time
    assert m.mean_residual("w", 2, 1.0) == pytest.approx((4 + 6 + 100) / 3 - 1.0)  # phase 2 unseen: the role's
    assert m.mean_residual("w", 1, 1.0) == pytest.approx((4 + 6 + 100) / 3 - 1.0)  # one phase-1 gap is too few
    assert m.mean_residual("other", 1, 1.0) is None
