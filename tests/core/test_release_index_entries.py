"""The release index moves its heap entries and refills the stale ones, it does not make them again. Each allocation
counts towards the garbage collector's next run, and a rebuild's free of thousands of stale entries at once does not
count back (CPython 3.11 stops the count at 0): at `kvsched bench sched`'s 10,000 sessions kvsched's side ran 22
collections in 300 steps, stock vLLM's none (tools/sched_gc.py). Compiled (mypyc), heaps typed as lists of
fixed-length tuples also unboxed every entry read and boxed a new tuple for every one stored: a rebuild re-allocated
every entry it kept, a decision every entry it set aside and pushed back."""

from __future__ import annotations

from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
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


def test_a_rebuild_and_a_decision_keep_the_heaps_entries_instead_of_making_new_ones(clock):
    p = policy(clock)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(300)]
    turns(p, keys)
    first = p.release_order()  # keys every pinned session: one heap entry and one due entry each
    index = p.index
    held = list(index._heap) + list(index._due)  # alive: no new entry can take the id of one of these
    made = {id(e) for e in held}
    assert len(index._heap) == len(index._due) == len(keys)

    index._drop_stale()  # a rebuild keeps every live entry
    assert {id(e) for e in index._heap} | {id(e) for e in index._due} == made

    excluded = set(keys[::2])  # a decision sets their entries aside, and pushes them back when done
    assert p.release_order(excluded) == [k for k in first if k not in excluded]  # the clock stands: same values
    assert {id(e) for e in index._heap} == {id(e) for e in held[:len(keys)]}


def test_keyings_after_a_rebuild_refill_its_stale_entries_instead_of_making_new_ones(clock):
    p = policy(clock)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(300)]
    turns(p, keys)
    p.release_order()
    index = p.index
    made = list(index._heap) + list(index._due)  # alive: no new entry can take the id of one of these
    turns(p, keys[:200])  # another turn each: their entries are stale
    p.release_order()  # keys them again: 200 new entries of each kind (none was found stale yet)
    made += list(index._heap) + list(index._due)
    index._drop_stale()  # sets the 400 stale entries aside
    turns(p, keys[:200])
    assert p.release_order()[0] in keys  # the third keying of the 200 sessions
    assert len(index._heap) == len(keys) and len(index._due) == len(keys) + 200  # (stale due entries wait their time)
    assert {id(e) for e in index._heap} | {id(e) for e in index._due} <= {id(e) for e in made}
