"""The release index moves its heap entries, it does not make them again. Compiled (mypyc), heaps typed as lists of
fixed-length tuples unboxed every entry read and boxed a new tuple for every one stored: a rebuild re-allocated every
entry it kept, a decision every entry it set aside and pushed back. Each allocation counts towards the garbage
collector's next run; at `kvsched bench sched`'s 10,000 sessions kvsched's side ran 22 collections in 300 steps,
stock vLLM's none (tools/sched_gc.py). Pure Python never did this: the test matters for the compiled build."""

from __future__ import annotations

from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints


def test_a_rebuild_and_a_decision_keep_the_heaps_entries_instead_of_making_new_ones(clock):
    p = RetentionPolicy(replace(RetentionConfig(), default_ttl_s=1e6, max_ttl_s=1e6), clock, 100_000,
                        bytes_per_token=1024.0)
    p.index.exact_limit = 0  # the heap, whatever the number of pins
    hints = TurnHints()
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(300)]
    for i, k in enumerate(keys):
        p.request_arrived(k, hints)
        p.turn_started(k, 0)
        p.turn_finished(k, hints, 160 + 16 * (i % 7), 10 + i % 7)
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
