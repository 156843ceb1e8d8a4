"""`kvsched.core.next_use`'s written-out searches (the compiled build's, in place of `bisect`): the same index as
`bisect` for every list and value, and the build uses them exactly when it is the one running."""

from __future__ import annotations

import bisect
import random

from kvsched import compiled
from kvsched.core import next_use


def test_the_written_out_searches_find_bisects_index_for_every_value_duplicates_and_ends_included():
    rng = random.Random(7)
    for n in (0, 1, 2, 3, 7, 64, 256):
        s = sorted(float(rng.randrange(0, 12)) for _ in range(n))  # many duplicates
        for x in [v + d for v in range(-1, 14) for d in (-0.5, 0.0, 0.5)]:
            x = float(x)
            assert next_use._bisect_left(s, x) == bisect.bisect_left(s, x), (s, x)
            assert next_use._bisect_right(s, x) == bisect.bisect_right(s, x), (s, x)
    nan = float("nan")  # no gap is NaN (a clock's difference, floored at 0): if one were, the same comparisons
    s = [0.0, 1.0, 2.0]
    assert next_use._bisect_left(s, nan) == bisect.bisect_left(s, nan)
    assert next_use._bisect_right(s, nan) == bisect.bisect_right(s, nan)


def test_the_compiled_build_and_only_it_runs_the_written_out_searches():
    assert next_use._NATIVE == (compiled.mode == "compiled")


def test_a_window_of_repeats_stays_sorted_and_equal_to_its_gaps_as_they_come_and_go():
    rng = random.Random(3)
    h = next_use.GapHistory(window=16)
    for _ in range(500):
        h.add(float(rng.randrange(0, 5)) if rng.random() < 0.7 else rng.expovariate(1.0))
        assert h._sorted == sorted(h.recent)
