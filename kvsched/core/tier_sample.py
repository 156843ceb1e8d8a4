"""The sessions (and tails) a full FP8 tier's eviction (kvsched.core.tier) samples, in the order they give way.

Eviction ranks the `sample` owners that have held tier blocks longest (a dict in the order of their last write), lowest
rank first. By value the rank is a session's retention value, a call per owner, and the sample is sorted. By recency
(the default) the rank is the owner's place in the sample, which no writer's rank reaches (infinite): the order is the
sample's own, so these take it as it is, without a tuple, a rank call and a sort per owner. A full tier evicts once per
demotion, tens of times a step (`kvsched bench sched --tier`, 0.25 GiB tier, 10,000 sessions), so that was most of an
eviction's cost besides the blocks it frees. The same owners, in the same order, either way
(tests/core/test_tier_sample).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from collections.abc import Set as AbstractSet

from kvsched.core.tier_fills import FillingSlots

Key = Hashable
Owner = Hashable


def victims(keys_of: Mapping[Owner, Sequence[Key]], exclude: Owner, size: int,
            rank: Callable[[Owner, int], float] | None, below: float, inflight: FillingSlots,
            slot_of: Mapping[Key, int]) -> list[Owner]:
    """Of the first `size` owners of `keys_of`, those other than `exclude` holding keys, ranked below `below` and not
    being fetched (its request waits for those blocks, and an in-flight key frees no slot before it lands), lowest
    rank first. `rank` None: recency (the rank is the place in the sample)."""
    sample = itertools.islice(keys_of.items(), size)
    if rank is None:
        filling = bool(inflight.slots)  # protects() is False while no slot is being filled
        return [owner for i, (owner, keys) in enumerate(sample)
                if owner != exclude and keys and i < below
                and not (filling and inflight.protects(map(slot_of.get, keys)))]
    ranked = sorted((value, i, owner) for i, (owner, keys) in enumerate(sample)
                    if owner != exclude and keys and (value := rank(owner, i)) < below
                    and not inflight.protects(map(slot_of.get, keys)))
    return [owner for *_, owner in ranked]


def tails(tail_of: Mapping[Owner, Key], exclude: Owner, size: int, rank: Callable[[Owner, int], float] | None,
          below: float, locked: AbstractSet[int], slot_of: Mapping[Key, int], want: int) -> tuple[list[Key], bool]:
    """The first `want` of the first `size` tails of `tail_of` whose owner is not `exclude`, ranked below `below` and
    read by no load this step, lowest rank first; and whether there was any such tail."""
    sample = itertools.islice(tail_of.items(), size)
    if rank is None and want > 0:
        picked: list[Key] = []
        for i, (owner, key) in enumerate(sample):
            if i >= below:
                break
            if owner != exclude and slot_of[key] not in locked:
                picked.append(key)
                if len(picked) >= want:
                    break
        return picked, bool(picked)
    cands = sorted((value, i, key) for i, (owner, key) in enumerate(sample)
                   if owner != exclude and slot_of[key] not in locked
                   and (value := rank(owner, i) if rank is not None else i) < below)
    return [key for *_, key in cands[:max(want, 0)]], bool(cands)
