"""The recency sample (`tier_sample`, rank None) is the ranked one with the rank taken as the place in the sample: the
same owners and tails, in the same order, without a rank call and a sort per owner."""

from __future__ import annotations

import random

import pytest

from kvsched.core.tier_fills import FillingSlots
from kvsched.core.tier_sample import tails, victims


def _place(_owner: object, i: int) -> float:
    return i


@pytest.mark.parametrize("seed", range(40))
def test_the_recency_sample_is_the_ranked_one_by_place(seed: int):
    rng = random.Random(seed)
    n = rng.randint(0, 90)
    keys_of = {f"o{i}": [f"o{i}k{j}" for j in range(rng.randint(0, 3))] for i in range(n)}
    slot_of = {key: s for s, key in enumerate(k for keys in keys_of.values() for k in keys)}
    inflight = FillingSlots()
    if rng.random() < 0.5:
        inflight.hold(rng.sample(range(len(slot_of)), min(len(slot_of), rng.randint(0, 5))))
        inflight.give_up(list(inflight.slots)[:1])
    exclude = f"o{rng.randint(0, max(n, 1))}"
    below = rng.choice([float("inf"), rng.randint(0, 70)])
    for size in (64, 8):
        assert victims(keys_of, exclude, size, None, below, inflight, slot_of) == \
            victims(keys_of, exclude, size, _place, below, inflight, slot_of)
    tail_of = {f"o{i}": f"t{i}" for i in range(n) if rng.random() < 0.7}
    tail_slots = {key: s for s, key in enumerate(tail_of.values())}
    locked = set(rng.sample(range(len(tail_slots)), min(len(tail_slots), 3)))
    for want in (1, 2, 5, 100):
        assert tails(tail_of, exclude, 64, None, below, locked, tail_slots, want) == \
            tails(tail_of, exclude, 64, _place, below, locked, tail_slots, want)
