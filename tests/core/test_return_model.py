"""The online return model: classes, outcomes known only once they happen, shrinkage, and its switch in the policy."""

from __future__ import annotations

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Pin, Release, RetentionPolicy
from kvsched.core.return_model import ReturnModel, return_class
from kvsched.core.sessions import SessionId, SessionKey, TurnHints


def key(s: str) -> SessionKey:
    return SessionKey(SessionId(s))


def test_return_class_buckets():
    assert return_class(1, 0, None) == (1, -1, 0)
    assert return_class(7, 16, 29.9) == (7, 4, 1)
    assert return_class(9, 16, 29.9) == (8, 4, 1)
    assert return_class(2, 17, 30.0) == (2, 4, 2)
    assert return_class(3, 1, 600.0) == (3, 0, 4)


def test_fresh_model_reads_half_and_pins_at_half():
    m = ReturnModel(threshold=0.5, horizon_s=30.0)
    assert m.estimate((1, 4, 0)) == 0.5
    assert m.turn_finished("a", 1, 16, None, now=0.0)


def test_outcome_is_counted_only_once_known():
    m = ReturnModel(threshold=0.5, horizon_s=30.0)
    m.turn_finished("a", 1, 16, None, now=0.0)
    m.settle(30.0)  # the horizon has not passed yet (a return at exactly 30 s counts)
    assert m.total.outcomes == 0 and m.awaited == 1
    m.settle(30.5)
    assert (m.total.returns, m.total.outcomes, m.awaited) == (0, 1, 0)
    m.arrived("a", 31.0)  # too late: already counted as a miss, not again
    assert (m.total.returns, m.total.outcomes) == (0, 1)


def test_return_within_horizon_counts_as_return_when_the_horizon_ends():
    m = ReturnModel(threshold=0.5, horizon_s=30.0)
    m.turn_finished("a", 1, 16, None, now=0.0)
    m.arrived("a", 10.0)
    assert m.total.outcomes == 0 and m.awaited == 0  # known, not counted yet: misses of that age are still pending
    m.settle(30.5)
    assert (m.total.returns, m.total.outcomes) == (1, 1)
    assert m.by_turn[1].returns == 1 and m.by_class[(1, 4, 0)].outcomes == 1


def test_eager_counting_counts_a_return_on_arrival():
    m = ReturnModel(threshold=0.5, horizon_s=30.0, at_horizon=False)
    m.turn_finished("a", 1, 16, None, now=0.0)
    m.arrived("a", 10.0)
    assert (m.total.returns, m.total.outcomes) == (1, 1)
    m.settle(31.0)
    assert m.total.outcomes == 1


@pytest.mark.parametrize("at_horizon", [True, False])
def test_late_arrival_settled_lazily_is_a_miss(at_horizon):
    m = ReturnModel(threshold=0.5, horizon_s=30.0, at_horizon=at_horizon)
    m.turn_finished("a", 1, 16, None, now=0.0)
    m.arrived("a", 45.0)  # nothing settled in between: the arrival itself finds the horizon passed
    assert (m.total.returns, m.total.outcomes) == (0, 1)


def test_overlapping_turn_counts_as_return():
    m = ReturnModel(threshold=0.5, horizon_s=30.0)
    m.turn_finished("a", 1, 16, None, now=0.0)
    m.turn_finished("a", 2, 16, 0.0, now=1.0)  # the second request arrived before the first ended
    m.settle(30.5)
    assert (m.total.returns, m.total.outcomes, m.awaited) == (1, 1, 1)


def test_outcomes_stay_right_across_the_bulk_cut_of_settled_turns():
    """Thousands of awaited turns (past the bulk cut of the settled ones): every third session comes back within the
    horizon, every third too late, the rest never; an overlapping turn counts its predecessor as returned."""
    m = ReturnModel(threshold=0.5, horizon_s=30.0)
    n = 3000
    for i in range(n):
        m.turn_finished(f"s{i}", 1, 16, None, now=float(i))
        if i % 3 == 0:
            m.arrived(f"s{i}", i + 10.0)
        elif i % 3 == 1 and i > 40:  # the one 40 turns back returns late: already a miss
            m.arrived(f"s{i - 40}", float(i))
    m.turn_finished("s2999", 2, 16, 2999.0, now=3000.0)  # an overlapping turn: s2999's first did come back
    m.settle(4000.0)
    returned = n // 3 + 1
    assert (m.total.returns, m.total.outcomes, m.awaited) == (returned, n + 1, 0)
    assert m._base > 0 and m._head == len(m._deadlines)  # cut off in bulk on the way; all settled


def test_an_awaited_turn_keeps_no_object_of_its_own_for_the_collector():
    """Every finished turn is awaited for the horizon (the default TTL, minutes); an object per turn (an entry and its
    tuples) was all the garbage collector's young work in `kvsched bench sched`'s steps. Counted in GC-tracked
    objects, no timing."""
    import gc

    m = ReturnModel(threshold=0.5, horizon_s=3600.0)
    keys = [key(f"s{i}") for i in range(50)]
    for k in keys:  # each session's first outcome and class seen once
        m.turn_finished(k, 2, 16, 0.0, now=1.0)
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for turn in range(40):
            for k in keys:
                m.arrived(k, 2.0 + turn)
                m.turn_finished(k, 2, 16, 1.0 + turn, now=2.0 + turn)
        grown = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert m.awaited == len(keys)
    assert grown < 100  # 2,000 awaited turns: 2-3 objects each before


def test_first_turns_that_never_return_stop_being_pinned():
    m = ReturnModel(threshold=0.35, horizon_s=30.0)
    for i in range(40):
        m.turn_finished(f"s{i}", 1, 16, None, now=float(i))
    m.settle(100.0)
    assert m.estimate((1, 4, 0)) < 0.05
    skipped = m.skipped  # those that ended after the first misses were known
    assert not m.turn_finished("new", 1, 16, None, now=100.0)
    assert m.skipped == skipped + 1
    assert m.estimate((2, 4, 1)) == pytest.approx(1 / 42)  # no turn-2 outcomes: the global mean, Beta(1, 1) prior


def test_sparse_class_shrinks_to_its_turn_index():
    m = ReturnModel(threshold=0.5, horizon_s=30.0, prior_strength=10.0)
    for i in range(20):  # turn 2, prefix octave 4: all return
        m.turn_finished(f"s{i}", 2, 16, float(i) - 5.0, now=float(i))
        m.arrived(f"s{i}", float(i) + 1.0)
    m.settle(49.0)
    m.turn_finished("x", 2, 1024, 45.0, now=50.0)  # another octave, one miss
    m.settle(100.0)
    turn = m.estimate((2, 99, 1))  # a class never seen: the turn index's estimate
    assert turn > 0.8
    sparse = m.estimate((2, 10, 1))
    assert 0.6 < sparse < turn  # one miss moves it, the prior holds it near its turn index


def make(clock: list[float], **cfg: float) -> RetentionPolicy:
    return RetentionPolicy(RetentionConfig(**cfg), lambda: clock[0], total_blocks=100, bytes_per_token=1.0)


def test_policy_off_by_default_pins_every_turn_while_it_learns():
    """No threshold: the model only learns (a first turn's value, `ReleaseValues.weight_of`); it skips no pin, even
    of a class that never comes back."""
    clock = [0.0]
    p = make(clock)
    for i in range(30):
        k = key(f"s{i}")
        p.request_arrived(k, TurnHints())
        p.turn_started(k, 0)
        assert p.turn_finished(k, TurnHints(), 160, 10) == [Pin(k)]
        clock[0] += 2.0
        p.expire()
    clock[0] += 31.0
    p.expire()
    k = key("late")
    p.request_arrived(k, TurnHints())
    p.turn_started(k, 0)
    assert p.turn_finished(k, TurnHints(), 160, 10) == [Pin(k)]
    assert p.returns.skipped == 0 and p.returns.estimate(return_class(1, 10, None)) < 0.1


def test_policy_skips_the_pin_of_an_unlikely_class():
    clock = [0.0]
    p = make(clock, return_threshold=0.35)
    for i in range(30):  # one-turn sessions: first turns never come back
        k = key(f"s{i}")
        p.request_arrived(k, TurnHints())
        p.turn_started(k, 0)
        assert p.turn_finished(k, TurnHints(), 160, 10) in ([Pin(k)], [])
        clock[0] += 2.0
    clock[0] += 31.0
    p.expire()
    k = key("late")
    p.request_arrived(k, TurnHints())
    p.turn_started(k, 0)
    assert p.turn_finished(k, TurnHints(), 160, 10) == []
    assert not p.sessions[k].pinned and p.returns is not None and p.returns.skipped >= 1


def test_policy_releases_the_held_pin_when_the_next_turn_is_unlikely():
    clock = [0.0]
    p = make(clock, return_threshold=0.6)
    k = key("a")
    p.request_arrived(k, TurnHints())
    p.turn_started(k, 0)
    assert p.turn_finished(k, TurnHints(), 160, 10) == []  # fresh model: 0.5 < 0.6
    p2 = make(clock, return_threshold=0.5)
    p2.request_arrived(k, TurnHints())
    p2.turn_started(k, 0)
    assert p2.turn_finished(k, TurnHints(), 160, 10) == [Pin(k)]
    assert p2.returns is not None
    p2.returns.threshold = 1.0  # the next turn's class reads below it: the pin it still holds is released
    clock[0] = 5.0
    p2.request_arrived(k, TurnHints())
    p2.turn_started(k, 160)
    clock[0] = 6.0
    out = p2.turn_finished(k, TurnHints(), 200, 12)
    assert len(out) == 1 and isinstance(out[0], Release) and not p2.sessions[k].pinned


@pytest.mark.parametrize("raw", ["high", "1.5", "-0.1", "nan"])
def test_threshold_setting_refused_when_malformed(raw):
    with pytest.raises(ValueError, match="KVSCHED_RETURN_THRESHOLD"):
        RetentionConfig.from_env({"KVSCHED_RETURN_THRESHOLD": raw})


def test_threshold_setting_parsed():
    assert RetentionConfig.from_env({"KVSCHED_RETURN_THRESHOLD": "0.35"}).return_threshold == 0.35
    assert RetentionConfig.from_env({}).return_threshold is None


def test_policy_without_a_threshold_awaits_every_turn():
    """The value reads every turn's class share (stop 52; before, first turns' alone and a later turn was not
    awaited without a threshold): a later turn is awaited with a threshold or without."""
    clock = [0.0]
    for threshold, awaited in ((None, 1), (0.2, 1)):
        p = make(clock) if threshold is None else make(clock, return_threshold=threshold)
        k = key("two-turns")
        for cached in (0, 160):
            p.request_arrived(k, TurnHints())
            p.turn_started(k, cached)
            p.turn_finished(k, TurnHints(), 320, 20)
            clock[0] += 1.0
        assert p.returns.awaited == awaited and p.returns.total.outcomes == 0
        assert p.returns.by_turn == {}  # the first turn's return is counted at its horizon
        clock[0] += 31.0
        p.returns.settle(clock[0])
        assert p.returns.by_turn[1].returns == 1 and (2 in p.returns.by_turn) == bool(awaited)


def _reference_class(turns: int, blocks: int, gap_s: float | None, inferred: bool = False) -> tuple[int, int, int]:
    """`return_class` as first written (math.log2, a generator over the edges): the per-turn fast path must agree."""
    import math

    from kvsched.core.return_model import GAP_EDGES_S, INFERRED_FIRST, TURN_CAP

    octave = int(math.log2(blocks)) if blocks > 0 else -1
    gap = (INFERRED_FIRST if inferred else 0) if gap_s is None else 1 + sum(gap_s >= e for e in GAP_EDGES_S)
    return min(max(turns, 1), TURN_CAP), octave, gap


def test_return_class_and_estimate_as_first_written():
    """The classes and estimates the per-turn fast paths give are those of the plain formulas, bit for bit."""
    import random

    rng = random.Random(7)
    sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 255, 256, 257] + [(1 << k) + d for k in range(9, 48) for d in (-1, 0, 1)]
    gaps = [None, 0.0, 29.999, 30.0, 30.001, 119.9, 120.0, 599.9, 600.0, 1e6]
    for turns in (-1, 0, 1, 2, 7, 8, 9, 40):
        for blocks in sizes:
            for gap in gaps:
                for inferred in (False, True):
                    assert return_class(turns, blocks, gap, inferred) == _reference_class(turns, blocks, gap, inferred)
    m = ReturnModel(threshold=0.3, horizon_s=10.0, inferred_prior=0.7)
    now = 0.0
    for i in range(3000):  # outcomes of many classes settled: every level of the shrinkage has counts
        now += rng.random()
        k = f"s{rng.randrange(200)}"
        if rng.random() < 0.5:
            m.arrived(k, now)
        m.turn_finished(k, rng.randrange(1, 12), rng.choice(sizes[:12]), rng.choice([None, 5.0, 50.0]), now,
                        inferred=i % 5 == 0)
    assert m.total.outcomes > 1000
    for cls in [*m.by_class, (3, 99, 2), (1, 2, -1), (42, 1, 1)]:
        for root in (None, 1.0, 0.25):
            p = m.total.mean(0.5, 2.0) if root is None else root
            turn = m.by_turn.get(cls[0])
            p = turn.mean(p, m.prior_strength) if turn is not None else p
            p = p * m.inferred_prior if cls[2] == -1 else p
            full = m.by_class.get(cls)
            assert m.estimate(cls, root) == (full.mean(p, m.prior_strength) if full is not None else p)
