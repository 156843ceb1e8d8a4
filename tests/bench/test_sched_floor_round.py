"""`kvsched bench sched`'s round (`kvsched.bench.sched._Round`, which tools/sched_sides.py runs) on the pin floor:
its `turn_releases` are the floor's pins given back at a turn over the round. Found by review: they were read from
kvsched's policy alone, so every floor round of BENCHMARKS.md's "The floor" wrote 0 there, beside the floor's own
`released_turn` of ~3,700 a round at 256 sessions."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")


def test_a_floor_rounds_turn_releases_are_its_own(tiny_model_dir):
    from kvsched.bench.sched import _Round
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER

    rnd = _Round(FLOOR_SCHEDULER, tiny_model_dir, seed=0, sessions=256)
    released = rnd.s.released
    before = released["turn"]
    for _ in range(40):
        rnd.step()
    given_back = released["turn"] - before
    work = rnd.close()
    assert given_back > 0 and work["turn_releases"] == given_back
