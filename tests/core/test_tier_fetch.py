"""The FP8 tier's directory with fills from a lower level (disk, shared store) that land steps after they were planned
(the worker fetches in the background). While a fetch may still write its slot, no restore reads the slot and no other
key gets it, whatever happens to its key meanwhile (eviction, the session's end, a cache reset); once every fetch has
landed, every slot is free or held again (nothing leaks)."""

from __future__ import annotations

import random

import pytest

from kvsched.core.tier import TierConfig, TierDirectory
from tests.core.test_tier_steps import run_step, tail_or_match

SESSIONS = [f"s{i}" for i in range(5)]
OPS = ("demote", "demote", "fetch", "fetch", "tail", "match", "drop", "forget", "clear", "overdue")
PENDING, GARBAGE = "<being fetched>", "<failed fetch>"


def directory(slots: int) -> TierDirectory:
    return TierDirectory(TierConfig(budget_bytes=slots * 10), 10, value_of=lambda owner: 0.0)


def test_a_block_in_flight_is_not_restored_until_it_lands():
    d = directory(8)
    d.demote("a", [("k0", 0)])
    placed = d.admit("a", ["k1", "k2"])
    d.hold([slot for _, slot in placed])
    chain = ["k0", "k1", "k2", "k3"]
    assert d.match(chain, 0, 4) == [d.slot_of["k0"]]  # the run ends before the block whose bytes are not there yet
    assert d.fetching(chain, 0, 4) and d.fetching(chain, 1, 1) and not d.fetching(chain, 0, 1)
    d.landed(placed[0][1], "k1", ok=True)
    assert d.match(chain, 0, 4) == [d.slot_of["k0"], placed[0][1]] and d.fetching(chain, 0, 4)
    d.landed(placed[1][1], "k2", ok=False)  # failed its checks on some worker: forgotten, recomputed
    assert "k2" not in d.slot_of and not d.fetching(chain, 0, 4)
    assert d.match(chain, 0, 4) == [d.slot_of["k0"], placed[0][1]]


@pytest.mark.parametrize("end", ["evicted", "session ended", "cache reset"])
def test_a_slot_in_flight_goes_to_no_other_key_until_its_fetch_landed(end):
    d = directory(2)
    (_, slot), = d.admit("a", ["k1"])
    d.hold([slot])
    d.unlock_all()
    if end == "evicted":
        d.demote("b", [("b0", 0), ("b1", 1)])  # pressure: "a" is the only victim
    elif end == "session ended":
        d.drop_owner("a")
    else:
        d.clear()
    d.unlock_all()
    stores = d.demote("c", [("c0", 0), ("c1", 1)])  # pressure again
    assert slot not in {st.slot for st in stores} and len(stores) == 1
    assert all(s != slot for k, s in d.slot_of.items() if k != "k1")  # nobody else was given the slot
    d.landed(slot, "k1", ok=True)
    d.unlock_all()
    for owner in ("a", "b", "c"):
        d.drop_owner(owner)
    d.unlock_all()
    assert sorted(d._free) == [0, 1] and not d.inflight  # and the slot is back


def test_a_failed_fetch_never_drops_the_same_key_fetched_again_elsewhere():
    d = directory(4)
    (_, first), = d.admit("a", ["k1"])
    d.hold([first])
    d.drop_owner("a")  # the session ended; the key comes back with another session, into another slot
    (_, second), = d.admit("b", ["k1"])
    d.hold([second])
    assert second != first
    d.landed(first, "k1", ok=False)  # the old fetch failed: not the new one's business
    assert d.slot_of["k1"] == second


def _land(d: TierDirectory, rng: random.Random, content: dict[int, object], inflight: dict[int, object]) -> None:
    """The workers report some of the fetches in flight (a fetch writes its slot until it reports)."""
    for slot in [s for s in inflight if rng.random() < 0.4]:
        key = inflight.pop(slot)
        ok = rng.random() < 0.8
        content[slot] = key if ok else GARBAGE
        d.landed(slot, key, ok)


def _step(d: TierDirectory, rng: random.Random, content: dict[int, object], inflight: dict[int, object]) -> str | None:
    """One step of random operations: the worker's writes in plan order (stores, a fetch's slot invalidated as it
    starts), then the step's loads; the first wrong load, if any."""
    writes: list[tuple[int, object]] = []
    loads: list[tuple[int, object]] = []
    for _ in range(rng.randint(1, 8)):
        op, owner = rng.choice(OPS), rng.choice(SESSIONS)
        if op == "demote":
            keys = list(dict.fromkeys(f"k{rng.randrange(6) + i}" for i in range(rng.randint(1, 4))))
            writes += [(st.slot, keys[st.block_id - 100]) for st in
                       d.demote(owner, [(k, 100 + i) for i, k in enumerate(keys)])]
        elif op == "fetch":
            start = rng.randrange(6)
            placed = d.admit(owner, [f"k{start + i}" for i in range(rng.randint(1, 3))])
            d.hold([slot for _, slot in placed])
            for key, slot in placed:
                assert slot not in inflight, f"slot {slot} given to {key} while a fetch of {inflight[slot]} fills it"
                inflight[slot] = key
                writes.append((slot, PENDING))
        elif tail_or_match(d, op, owner, rng, writes, loads):
            pass
        elif op == "drop":
            d.drop_owner(owner)
        elif op == "overdue":  # a worker's read hung: its session may lose blocks, its slot stays held
            d.overdue([slot for slot in inflight if rng.random() < 0.5])
        elif op == "forget":
            d.forget([f"k{rng.randrange(8)}"])
        elif rng.random() < 0.2:
            d.clear()
    return run_step(content, writes, loads)


def _consistent(d: TierDirectory, content: dict[int, object], inflight: dict[int, object]) -> str | None:
    if d.inflight != set(inflight):
        return f"the directory holds {sorted(d.inflight)} in flight, the workers {sorted(inflight)}"
    for key, slot in d.slot_of.items():
        if slot not in inflight and content.get(slot) != key:
            return f"{key} maps to slot {slot}, which holds {content.get(slot)}"
    free, held, used = set(d._free), set(d._held), set(d.slot_of.values())
    if len(free) != len(d._free) or free & (used | held | set(inflight)):
        return "a slot is free twice, or free and held, or free while a fetch writes it"
    if len(free) + len(used) + len(held) != d.num_slots:
        return f"{d.num_slots - len(free) - len(used) - len(held)} slots are lost"
    return None


def test_no_load_reads_another_keys_bytes_and_no_slot_leaks_with_fetches_landing_late():
    for seed in range(1500):
        rng = random.Random(seed)
        d = directory(rng.randint(1, 6))
        content: dict[int, object] = {}
        inflight: dict[int, object] = {}
        for step in range(rng.randint(1, 12)):
            _land(d, rng, content, inflight)  # reported with the previous step's output, before this step
            wrong = _step(d, rng, content, inflight)
            assert wrong is None, f"seed {seed}, step {step}: {wrong}"
            d.unlock_all()
            broken = _consistent(d, content, inflight)
            assert broken is None, f"seed {seed}, after step {step}: {broken}"
        while inflight:
            _land(d, rng, content, inflight)
        for owner in SESSIONS:
            d.drop_owner(owner)
        d.unlock_all()
        assert sorted(d._free) == list(range(d.num_slots)), f"seed {seed}: slots leaked"


def test_a_demotion_never_evicts_a_restore_in_flight_for_no_slot():
    """Found by review: evicting an in-flight key frees no slot before it lands, yet counted as one: a demotion that
    needed 2 slots evicted all 9 in-flight keys of a moved session (its waiting request then recomputed them)."""
    from kvsched.core.tier import TierConfig, TierDirectory

    d = TierDirectory(TierConfig(budget_bytes=10 * 10), 10, value_of=lambda o: 0.0)
    d.demote("b", [("b0", 0)])
    placed = d.admit("a", [f"a{i}" for i in range(9)])
    d.hold([s for _, s in placed])
    d.unlock_all()
    stores = d.demote("c", [("c0", 0), ("c1", 1)])  # 2 wanted; only b0's slot can be had
    assert len(stores) == 1
    assert sum(1 for k in d.slot_of if str(k).startswith("a")) == 9


def test_in_recency_order_a_demotion_leaves_a_whole_restore_in_flight_alone():
    from kvsched.core.tier import TierConfig, TierDirectory

    d = TierDirectory(TierConfig(budget_bytes=100 * 10), 10, value_of=lambda o: 0.0)
    d.demote("old", [(f"o{i}", i) for i in range(10)])
    placed = d.admit("moved", [f"m{i}" for i in range(90)])
    d.hold([s for _, s in placed])
    d.unlock_all()
    d.demote("c", [(f"c{i}", i) for i in range(11)])  # 11 wanted, 10 to be had
    assert sum(1 for k in d.slot_of if str(k).startswith("m")) == 90


def test_admitting_past_another_sessions_run_never_evicts_that_run():
    """Found by review: a fetch that extends a run only other sessions own (a shared system prompt) made its room by
    evicting that very run, and a demotion while the fetch ran could too: the fetched blocks were then unreachable."""
    d = directory(8)
    d.demote("y", [(f"k{i}", i) for i in range(4)])  # the shared prefix k0..k3, only y's
    d.demote("z", [(f"z{i}", i) for i in range(4)])  # the tier is full
    placed = d.admit("x", [f"k{i}" for i in range(10)])  # x's request: the prefix, then its own blocks k4..k9
    d.hold([slot for _, slot in placed])
    d.unlock_all()
    assert [k for k, _ in placed] == [f"k{i}" for i in range(4, 8)]  # z made room; k8 found none
    assert d.fetching([f"k{i}" for i in range(10)], 0, 10) and all("x" in d.owners[f"k{i}"] for i in range(4))
    d.drop_owner("y")
    d.demote("w", [("w0", 0), ("w1", 1)])  # pressure while x's request waits: nothing of x's run may go
    assert all(f"k{i}" in d.slot_of for i in range(8))
    for key, slot in placed:
        d.landed(slot, key, ok=True)
    assert len(d.match([f"k{i}" for i in range(10)], 0, 10)) == 8
    for owner in ("x", "w"):
        d.drop_owner(owner)
    d.unlock_all()
    assert sorted(d._free) == list(range(8)) and not d.owners  # the run's new owner leaked nothing



def test_the_held_run_an_admission_found_no_room_after_leaves_with_its_owners():
    d = directory(2)
    d.demote("y", [("k0", 0)])
    (_, slot), = d.admit("z", ["z0"])
    d.hold([slot])  # z's fetch: unevictable, so x finds no room at all
    assert d.admit("x", ["k0", "k1"]) == [] and d.keys_of["x"] == ["k0"]
    d.drop_owner("y")
    d.drop_owner("x")
    d.landed(slot, "z0", ok=True)
    d.drop_owner("z")
    d.unlock_all()
    assert not d.slot_of and not d.owners and sorted(d._free) == [0, 1]


def test_an_overdue_fetch_holds_its_slot_but_no_longer_its_session():
    """Found by review: a fetch one worker never reported kept every block of its session from eviction for good."""
    d = directory(4)
    placed = d.admit("x", ["k0", "k1", "k2"])
    d.hold([slot for _, slot in placed])
    stuck = placed[2][1]
    for key, slot in placed[:2]:
        d.landed(slot, key, ok=True)
    d.unlock_all()
    assert len(d.demote("w", [("w0", 0), ("w1", 1)])) == 1  # x is being fetched: only the free slot
    d.overdue([stuck])
    stores = d.demote("w", [("w0", 0), ("w1", 1), ("w2", 2)])
    assert len(stores) == 2 and "x" not in d.keys_of and stuck not in {st.slot for st in stores}
    d.unlock_all()
    assert stuck not in d._free  # the stuck read may still write it
    d.landed(stuck, "k2", ok=True)
    d.unlock_all()
    assert stuck in d._free and not d.inflight
