"""The release index's heap entries are ints, compared as the (value, activity, version) tuples they stand for. They
were lists [value, activity, version, session]: every heap step compared two lists item by item, and every entry was
a container the garbage collector counts and walks (BENCHMARKS.md, "The budget pass on ints"). An int is neither, so
its float value goes in as `rank`, which must keep the floats' order."""

from __future__ import annotations

import gc
import itertools
import math
import random
import sys
from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.release_index import ReleaseIndex, rank
from kvsched.core.retention import RetentionPolicy
from kvsched.core.retention_records import SessionRecord
from kvsched.core.scoring import select_lowest
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from tests.conftest import FakeClock


def policy(clock: FakeClock) -> RetentionPolicy:
    p = RetentionPolicy(replace(RetentionConfig(), default_ttl_s=1e6, max_ttl_s=1e6), clock, 100_000,
                        bytes_per_token=1024.0)
    p.index.exact_limit = 0  # the heap, whatever the number of pins
    return p


def turns(p: RetentionPolicy, keys: list[SessionKey]) -> None:
    hints = TurnHints()
    for i, k in enumerate(keys):
        p.request_arrived(k, hints)
        p.turn_started(k, 0)
        p.turn_finished(k, hints, 160 + 16 * (i % 7), 10 + i % 7)


def test_the_heaps_entries_are_ints_the_garbage_collector_neither_counts_nor_walks(clock):
    p = policy(clock)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(300)]
    turns(p, keys)
    first = p.release_order()  # keys every pinned session: one heap entry and one due entry each
    index = p.index
    assert len(index._heap) == len(index._due) == len(keys)
    assert not any(gc.is_tracked(e) for e in index._heap + index._due)
    excluded = set(keys[::2])  # a decision sets their entries aside, and pushes them back when done
    assert p.release_order(excluded) == [k for k in first if k not in excluded]  # the clock stands: same values
    assert len(index._heap) == len(keys)


def test_the_versions_kept_for_the_entries_go_with_their_due_entries(clock):
    p = policy(clock)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(300)]
    turns(p, keys)
    p.release_order()
    index = p.index
    for _ in range(3):
        turns(p, keys[:200])  # another turn each: their entries are stale
        p.release_order()
    assert len(index._keyed) == len(index._due) == len(keys) + 3 * 200  # stale due entries wait their time
    index._drop_stale()
    assert len(index._keyed) == len(index._due) == len(index._heap) == len(keys)
    clock.advance(10.0)  # every key is due again: re-keyed, the old versions go
    p.release_order()
    assert len(index._keyed) == len(index._due) == len(keys) and index.counters["rekeyed"] == len(keys)


def test_rank_keeps_the_order_of_floats():
    rng = random.Random(7)
    values = [0.0, -0.0, math.inf, -math.inf, sys.float_info.max, -sys.float_info.max, sys.float_info.min,
              5e-324, -5e-324, 1.0, 0.5, 0.75, 1.5, 2.0, -1.0, -0.5]
    values += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300) for _ in range(2_000)]
    values += [math.nextafter(v, math.inf) for v in values[:200]]
    for a in values:
        for b in values[:60]:
            assert (rank(a) < rank(b)) == (a < b) and (rank(a) == rank(b)) == (a == b), (a, b)
    ordered = sorted(values, key=rank)
    assert all(x <= y for x, y in zip(ordered, ordered[1:], strict=False))


@pytest.mark.parametrize("v", [0.0, 1.0, -1.0, math.inf, -math.inf])
def test_nan_ranks_above_every_value(v):
    assert rank(math.nan) > rank(v)


def index_of(values: list[float]) -> tuple[ReleaseIndex, list[SessionRecord]]:
    """Idle pinned sessions s0, s1, ... of the given values, on the heap (no scan)."""
    ix = ReleaseIndex(lambda rec, now: 0.0, lambda rec, now: values[int(rec.key.session_id[1:])], select_lowest,
                      exact_limit=0)
    return ix, [SessionRecord(key=SessionKey(SessionId(f"s{i}")), pinned_blocks=1, activity=i + 1)
                for i in range(len(values))]


def test_versions_past_64_bits_are_refused_not_misread():
    """Past 2**64 a version ran into the entry's activity and named no session: the order offered none of those
    keyed past it (here s2 and s3, the lowest value among them: [s1, s0] only)."""
    ix, recs = index_of([3.0, 1.0, 2.0, 0.5])
    ix._versions = itertools.count(2**64 - 2)
    for rec in recs:
        ix.changed(rec)
    with pytest.raises(OverflowError, match="version"):
        list(ix.order(0.0, set()))


@pytest.mark.parametrize("activity", [-1, 2**64])
def test_an_activity_outside_64_bits_is_refused_not_misordered(activity):
    """A negative activity ran into the entry's value bits, read as a value just below 0: a session of -2.0 was
    offered after one of -1.0. One of 2**64 raised its value's rank by one."""
    ix, recs = index_of([-1.0, -2.0, 3.0])
    for rec in recs:
        ix.changed(rec)
    assert list(ix.order(0.0, set())) == [recs[1].key, recs[0].key, recs[2].key]
    recs[1].activity = activity
    ix.changed(recs[1])
    with pytest.raises(OverflowError, match="activity"):
        list(ix.order(0.0, set()))


def test_a_score_that_raised_leaves_no_version_behind():
    """`_keyed` holds the due heap's versions only (dropped with their due entries). A score that raised while a
    session was keyed left its version there with no due entry: never dropped once the session changed again."""
    fail = {"s1"}

    def score(rec: SessionRecord, now: float) -> float:
        if rec.key.session_id in fail:
            raise ZeroDivisionError("a scorer's bug")
        return float(rec.activity)

    ix = ReleaseIndex(lambda rec, now: 0.0, score, select_lowest, exact_limit=0)
    recs = [SessionRecord(key=SessionKey(SessionId(f"s{i}")), pinned_blocks=1, activity=i + 1) for i in range(3)]
    for rec in recs:
        ix.changed(rec)
    with pytest.raises(ZeroDivisionError):
        list(ix.order(0.0, set()))
    fail.clear()
    ix.changed(recs[1])  # another event of the session: a new version
    assert list(ix.order(0.0, set())) == [r.key for r in recs]
    assert set(ix._keyed) == {d & ((1 << 64) - 1) for d in ix._due}  # (s0 keyed twice: the pass ran again)
