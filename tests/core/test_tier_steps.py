"""The FP8 tier's directory over whole engine steps, against a model of the worker: within a step the worker runs the
planned stores and fetches in order (the last write to a slot wins), then the loads. Random steps of every operation
the scheduler side makes (demotions, promotions from a lower level, tails, restores and prefetches, session ends,
forgetting a corrupt key, a cache reset) must never make a load read another key's bytes, and between steps the
directory's tables must agree with each other and with the slots' contents."""

from __future__ import annotations

import random

import pytest

from kvsched.core.tier import TailKey, TierConfig, TierDirectory

SESSIONS = [f"s{i}" for i in range(5)]
OPS = ("demote", "demote", "admit", "tail", "match", "match_tail", "drop", "forget", "clear")


def _step(d: TierDirectory, rng: random.Random, content: dict[int, object]) -> str | None:
    """One step of random operations; applies the worker's writes to `content`; the first wrong load, if any."""
    writes: list[tuple[int, object]] = []
    loads: list[tuple[int, object]] = []
    for _ in range(rng.randint(1, 8)):
        op, owner = rng.choice(OPS), rng.choice(SESSIONS)
        if op == "demote":
            keys = [f"k{rng.randrange(6) + i}" for i in range(rng.randint(1, 4))]
            keys = list(dict.fromkeys(keys))
            for st in d.demote(owner, [(k, 100 + i) for i, k in enumerate(keys)]):
                writes.append((st.slot, keys[st.block_id - 100]))
        elif op == "admit":  # a promotion: slots placed for blocks a lower level fetches this step
            start = rng.randrange(6)
            placed = d.admit(owner, [f"k{start + i}" for i in range(rng.randint(1, 3))])
            d.lock([slot for _, slot in placed])
            writes += [(slot, key) for key, slot in placed]
        elif tail_or_match(d, op, owner, rng, writes, loads):
            pass
        elif op == "match_tail":
            m = d.match_tail(f"k{rng.randrange(6)}", [rng.randrange(2) for _ in range(2)])
            if m is not None:
                d.lock([m[0]])
                loads.append((m[0], m[2]))
        elif op == "drop":
            d.drop_owner(owner)
        elif op == "forget":
            d.forget([f"k{rng.randrange(8)}"])
        elif rng.random() < 0.2:  # clear: rare, it empties the tier
            d.clear()
    return run_step(content, writes, loads)


def tail_or_match(d: TierDirectory, op: str, owner: str, rng: random.Random, writes: list[tuple[int, object]],
                  loads: list[tuple[int, object]]) -> bool:
    """The operations both random-step tests make alike: a tail stored, a prefix matched and locked for a load."""
    if op == "tail":
        parent, tokens = f"k{rng.randrange(6)}", tuple(rng.randrange(2) for _ in range(rng.randint(1, 2)))
        st = d.put_tail(owner, parent, tokens, 0)
        if st is not None:
            writes.append((st.slot, TailKey(parent, tokens)))
        return True
    if op == "match":
        keys, start = [f"k{i}" for i in range(10)], rng.randrange(6)
        slots = d.match(keys, start, rng.randint(1, 4))
        d.lock(slots)
        loads += [(slot, keys[start + i]) for i, slot in enumerate(slots)]
        return True
    return False


def run_step(content: dict[int, object], writes: list[tuple[int, object]], loads: list[tuple[int, object]]
             ) -> str | None:
    """The worker: the step's writes in order (the last to a slot wins), then its loads; the first wrong load."""
    for slot, key in writes:
        content[slot] = key
    for slot, key in loads:
        if content.get(slot) != key:
            return f"a load of {key} from slot {slot} read {content.get(slot)}"
    return None


def _consistent(d: TierDirectory, content: dict[int, object]) -> str | None:
    for key, slot in d.slot_of.items():
        if content.get(slot) != key:
            return f"{key} maps to slot {slot}, which holds {content.get(slot)}"
        if not d.owners.get(key):
            return f"{key} is held with no owner"
    free = d._free
    if len(set(free)) != len(free) or set(free) & set(d.slot_of.values()):
        return "a slot is free twice, or free and held"
    if len(free) + len(d.slot_of) != d.num_slots:
        return f"{d.num_slots - len(free) - len(d.slot_of)} slots are neither free nor held"
    for owner, keys in d.keys_of.items():
        if any(k not in d.slot_of or owner not in d.owners[k] for k in keys):
            return f"{owner}'s keys disagree with the owners table"
    for key, owners in d.owners.items():
        for owner in owners:
            ok = d.tail_of.get(owner) == key if isinstance(key, TailKey) else key in d.keys_of.get(owner, ())
            if not ok:
                return f"{owner} owns {key} but does not list it"
    if sum(map(len, d._tails.values())) != sum(isinstance(k, TailKey) for k in d.slot_of):
        return "the tails index disagrees with the held tails"
    return None


@pytest.mark.parametrize("eviction", ["recency", "value"])
def test_no_load_reads_another_keys_bytes_and_the_tables_agree_after_every_step(eviction):
    for seed in range(1500):
        rng = random.Random(seed)
        values = {s: rng.random() for s in SESSIONS}
        slots = rng.randint(1, 6)
        d = TierDirectory(TierConfig(slots * 10, eviction=eviction), 10, lambda o, v=values: v.get(o, 0.0))
        content: dict[int, object] = {}
        for step in range(rng.randint(1, 12)):
            wrong = _step(d, rng, content)
            assert wrong is None, f"seed {seed}, step {step}: {wrong}"
            d.unlock_all()
            broken = _consistent(d, content)
            assert broken is None, f"seed {seed}, after step {step}: {broken}"
