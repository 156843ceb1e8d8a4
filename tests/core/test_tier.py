"""The FP8 tier's directory: content-addressed slots, per-session owners, the byte budget and the eviction order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.core.tier import Load, Store, TailKey, TierConfig, TierDirectory
from kvsched.core.tier_config import TierConfigError

BLOCK_BYTES = 100


def directory(slots: int, values: dict[str, float] | None = None, eviction: str | None = None) -> TierDirectory:
    """A tier of `slots` blocks; given `values`, in the value order (the tests of that order), else as configured."""
    vals = values if values is not None else {}
    order = eviction or ("value" if values is not None else "recency")
    return TierDirectory(TierConfig(budget_bytes=slots * BLOCK_BYTES, eviction=order), BLOCK_BYTES,
                         lambda o: vals.get(o, 0.0))


def blocks(prefix: str, n: int, first_id: int = 0) -> list[tuple[str, int]]:
    return [(f"{prefix}{i}", first_id + i) for i in range(n)]


def test_demote_assigns_slots_and_a_restore_matches_the_unbroken_run():
    d = directory(8)
    stores = d.demote("a", blocks("a", 3, first_id=10))
    assert [s.block_id for s in stores] == [10, 11, 12]
    assert len({s.slot for s in stores}) == 3
    keys = ["a0", "a1", "a2", "other"]
    assert d.match(keys, 0, 10) == [s.slot for s in stores]
    assert d.match(keys, 1, 10) == [s.slot for s in stores[1:]]
    assert d.match(keys, 0, 2) == [s.slot for s in stores[:2]]  # the limit (last prompt token) is respected
    assert d.match(["x", "a1"], 0, 10) == []  # a run must start where the local hit ends
    assert d.used_bytes == 3 * BLOCK_BYTES


def test_a_shared_block_is_stored_once_and_kept_while_an_owner_remains():
    d = directory(8)
    d.demote("a", [("sys", 1), ("a1", 2)])
    assert d.demote("b", [("sys", 5), ("b1", 6)]) == [Store(6, d.slot_of["b1"])]  # "sys" not copied again
    d.drop_owner("a")
    assert "sys" in d.slot_of and "a1" not in d.slot_of
    d.drop_owner("b")
    assert d.used_slots == 0


def test_full_tier_evicts_the_lowest_value_session_tail_first():
    values = {"low": 1.0, "mid": 2.0, "new": 3.0}
    d = directory(4, values)
    d.demote("low", blocks("l", 2))
    d.demote("mid", blocks("m", 2))
    stores = d.demote("new", blocks("n", 1))
    assert len(stores) == 1
    assert "l1" not in d.slot_of and "l0" in d.slot_of  # the low session lost its tail block only
    assert d.was_evicted("l1") and not d.was_evicted("n0")
    assert d.counters["evicted_blocks"] == 1


def test_a_session_worth_less_than_every_resident_is_not_admitted():
    d = directory(2, {"a": 5.0, "b": 1.0})
    d.demote("a", blocks("a", 2))
    assert d.demote("b", blocks("b", 2)) == []
    assert d.counters["demotions_cut_short"] == 1 and d.used_slots == 2


def test_recency_order_evicts_the_session_that_wrote_longest_ago_whatever_its_value():
    d = directory(4, {"old": 9.0, "mid": 5.0, "new": 1.0}, eviction="recency")
    assert TierConfig(budget_bytes=1).eviction == "recency"  # the default
    d.demote("old", blocks("o", 2))
    d.demote("mid", blocks("m", 2))
    assert len(d.demote("new", blocks("n", 1))) == 1  # the value order would refuse it: worth less than both
    assert "o1" not in d.slot_of and "o0" in d.slot_of and "m1" in d.slot_of  # the oldest writer's tail block
    d.demote("old", blocks("o", 1))  # writing again (a block it already holds) makes it the most recent
    assert len(d.demote("new", [("n1", 5)])) == 1  # so "mid" is the oldest writer now
    assert "m1" not in d.slot_of and {"o0", "m0", "n0", "n1"} == set(d.slot_of)
    d.drop_owner("mid")
    assert d.put_tail("mid", "m0", [7], 0) is not None  # a tail of a session without full blocks here
    assert len(d.demote("new", [("n2", 6)])) == 1  # the tail yields first (tails go before full blocks)
    assert d.tail_of == {} and {"o0", "n0", "n1", "n2"} == set(d.slot_of)
    assert len(d.demote("mid", [("m5", 7)])) == 1  # then the oldest writer, "old", whatever its value
    assert "o0" not in d.slot_of


def test_a_tail_write_leaves_its_sessions_full_blocks_where_they_were_in_the_recency_order():
    """A turn that ends stores its tail but keeps its prefix pinned in the pool: its tier copies are the ones least
    needed soon, so the tail does not make them the most recent (the generated fleet: 2% less prefill)."""
    d = directory(6)
    d.demote("a", blocks("a", 2))
    d.demote("b", blocks("b", 2))
    assert d.put_tail("a", "a1", [7], 9) is not None  # 5 of 6 slots
    assert len(d.demote("c", blocks("c", 3, first_id=20))) == 3  # the free slot, the tail, then the oldest writer
    assert d.tail_of == {} and "a1" not in d.slot_of and {"a0", "b0", "b1"} <= set(d.slot_of)


def test_an_unknown_eviction_order_is_a_typed_error():
    with pytest.raises(TierConfigError, match="recency, value"):
        TierConfig(budget_bytes=1, eviction="lru")


def test_locked_slots_are_not_reused_until_unlocked():
    d = directory(2, {"a": 1.0, "b": 9.0})
    d.demote("a", blocks("a", 2))
    d.lock(d.match(["a0", "a1"], 0, 2))  # a load reads them this step
    assert d.demote("b", blocks("b", 1)) == []  # nothing free that is not locked
    d.unlock_all()
    assert len(d.demote("b", blocks("b", 1))) == 1


def test_a_session_that_ends_while_a_load_reads_its_blocks_frees_them_only_after_the_step():
    """Session "a" demoted a block another session is loading this step (a shared prefix: content-addressed), then
    ends. Its slot must not be handed to a store of this same step, which the worker runs before the load: the load
    would read another block's KV under a valid checksum."""
    d = directory(2)
    d.demote("a", blocks("a", 2))
    loading = d.match(["a0"], 0, 1)
    d.lock(loading)  # "b" restores a0 this step
    assert d.drop_owner("a") == 2 and "a0" not in d.slot_of  # both leave; a0's slot waits for the step's load
    stores = d.demote("c", blocks("c", 2, first_id=20))
    assert len(stores) == 1 and loading[0] not in [s.slot for s in stores]
    d.unlock_all()
    assert d.used_slots == len(stores)
    assert len(d.demote("c", [("c9", 29)])) == 1  # and free for the next step


def test_forget_drops_a_corrupt_key_for_good():
    d = directory(4)
    d.demote("a", blocks("a", 3))
    assert d.forget(["a1", "zz"]) == 1
    assert d.match(["a0", "a1", "a2"], 0, 3) == [d.slot_of["a0"]]


def test_zero_budget_tier_stores_nothing():
    d = directory(0)
    assert d.demote("a", blocks("a", 3)) == [] and d.match(["a0"], 0, 1) == []


@pytest.mark.parametrize("bad", ["-1", "x", None, "inf", "nan", True, False, "1e-12", 2**-31])
def test_bad_sizes_are_typed_errors(bad):
    """Found by review: JSON `true` was 1 GiB, and a size under one byte the tier off, without a word."""
    with pytest.raises(TierConfigError):
        TierConfig.from_gib(bad)
    assert TierConfig.from_gib(0).budget_bytes == 0 and TierConfig.from_gib(2**-30).budget_bytes == 1


def test_block_bytes_must_be_positive():
    with pytest.raises(TierConfigError):
        TierDirectory(TierConfig(budget_bytes=10), 0, lambda o: 0.0)


def test_load_and_store_are_plain_records():
    assert Load(1, 2) == Load(slot=1, block_id=2) and Store(3, 4).slot == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("demote drop forget match tail".split()), st.integers(0, 5), st.integers(1, 6),
                          st.integers(0, 4)), max_size=60),
       st.integers(0, 10))
def test_slots_are_never_shared_and_the_budget_holds(ops, slots):
    """Any sequence of demotions, ends, forgets and lookups: a slot holds one key, the budget is never exceeded, and
    every key's owners list it."""
    values = {f"s{i}": float(i) for i in range(6)}
    d = directory(slots, values)
    for op, sess, n, start in ops:
        owner = f"s{sess}"
        if op == "demote":
            d.demote(owner, [(f"k{start + i}", i) for i in range(n)])  # overlapping keys across sessions
        elif op == "drop":
            d.drop_owner(owner)
        elif op == "forget":
            d.forget([f"k{start}"])
        elif op == "tail":
            d.put_tail(owner, f"k{start}", list(range(n)), 0)
        else:
            d.lock(d.match([f"k{i}" for i in range(10)], start, n))
            d.unlock_all()
        assert d.used_slots <= d.num_slots
        assert len(set(d.slot_of.values())) == len(d.slot_of)
        assert len(d._free) + d.used_slots == d.num_slots
        for owner_, keys in d.keys_of.items():
            for key in keys:
                assert key in d.slot_of and owner_ in d.owners[key]
        for owner_, tail in d.tail_of.items():
            assert tail in d.slot_of and owner_ in d.owners[tail] and tail in d._tails[tail.parent]
        assert sum(map(len, d._tails.values())) == sum(isinstance(k, TailKey) for k in d.slot_of)


def test_a_tail_two_sessions_share_is_evicted_once():
    """Found by the property test below: evicting tails for a demotion listed a shared tail once per owner and freed
    it twice (KeyError in the engine's scheduler)."""
    d = directory(2, {"s0": 0.0, "s1": 1.0, "s2": 2.0})
    d.demote("s0", [("k0", 0)])
    d.put_tail("s0", "k0", [0], 0)
    d.put_tail("s2", "k0", [0], 0)  # the same tokens after the same block: one slot, two owners
    assert len(d.demote("s1", [("k1", 0), ("k2", 1)])) == 2  # the tail went to make room (once), then s0's block
    assert d.tail_of == {} and set(d.slot_of) == {"k1", "k2"} and d.counters["evicted_tails"] == 1


def test_a_tail_is_stored_once_per_session_and_matches_the_shared_tokens_only():
    d = directory(4)
    first = d.put_tail("a", "a9", [5, 6, 7], block_id=3)
    assert first == Store(3, first.slot, tokens=3)
    assert d.put_tail("a", "a9", [5, 6, 7], block_id=8) is None  # the same tail again: nothing to copy
    assert d.match_tail("a9", [5, 6, 7, 1]) == (first.slot, 3, TailKey("a9", (5, 6, 7)))
    assert d.match_tail("a9", [5, 9]) == (first.slot, 1, TailKey("a9", (5, 6, 7)))  # diverges inside the tail
    assert d.match_tail("a9", [9]) is None and d.match_tail("b9", [5, 6, 7]) is None  # other tokens, other parent
    second = d.put_tail("a", "a12", [1], block_id=4)  # the next turn's tail replaces it
    assert second is not None and d.match_tail("a9", [5, 6, 7]) is None and d.used_slots == 1
    assert d.tail_tokens("a") == 1
    d.drop_owner("a")
    assert d.used_slots == 0 and d.tail_of == {}


def test_tails_yield_to_full_blocks_and_to_worthier_tails():
    values = {"low": 1.0, "mid": 2.0, "high": 3.0}
    d = directory(2, values)
    assert d.put_tail("low", "l", [1], 0) is not None
    assert d.put_tail("mid", "m", [1], 0) is not None
    assert d.put_tail("high", "h", [1], 0) is not None  # evicts the lowest-value tail
    assert set(d.tail_of) == {"mid", "high"} and d.counters["evicted_tails"] == 1
    assert len(d.demote("low", blocks("l", 1))) == 1  # a full block evicts a tail, even of a worthier session
    assert set(d.tail_of) == {"high"}
    assert d.put_tail("mid", "m", [1], 0) is None  # a tail never evicts a full block
    assert d.counters["tails_refused"] == 1 and "mid" not in d.tail_of


def test_a_tail_a_load_reads_this_step_is_not_reused_before_the_step_is_built():
    d = directory(1, {"a": 1.0, "b": 2.0})
    slot = d.put_tail("a", "p", [1, 2], 0).slot
    d.lock([slot])
    assert d.put_tail("b", "q", [3], 0) is None  # the only slot is being read
    assert d.put_tail("a", "p2", [4], 0) is None  # a's next tail: no slot until the locked old one is freed
    assert d._held == [slot] and d._free == [] and d.counters["tails_refused"] == 2  # replaced: its slot waits
    d.unlock_all()
    assert d.used_slots == 0 and d._free == [slot] and d.tail_of == {}
    assert d.counters["evicted_blocks"] == 0  # a replaced tail is not an eviction, locked or not


def test_every_block_a_load_held_back_is_freed_at_unlock_and_only_evictions_are_spilled():
    """One step reads all three slots: "gone" ends, "t" replaces its tail, and "high" evicts "low"'s block. None of
    them is reused this step; after it every slot is free again, and only the evicted block is counted and reported
    to the disk level."""
    d = directory(3, {"low": 1.0, "gone": 2.0, "t": 2.5, "high": 3.0})
    spilled: list[object] = []
    d.on_evict = lambda key, slot, owner, at: spilled.append(key)
    d.demote("low", blocks("l", 1))
    d.demote("gone", blocks("g", 1))
    tail = d.put_tail("t", "p", [1], 0)
    assert tail is not None
    d.lock([d.slot_of["l0"], d.slot_of["g0"], tail.slot])
    assert d.drop_owner("gone") == 1 and "g0" not in d.slot_of  # its slot is read this step: held back
    assert d.put_tail("t", "p2", [2], 0) is None  # no slot; the old tail's is held back
    assert d.demote("high", blocks("h", 1)) == []  # "low"'s block is evicted but read this step: no slot yet
    assert "low" not in d.keys_of and d.used_slots == 1 and d._free == []  # l0 stays mapped until its spill
    d.unlock_all()
    assert d.used_slots == 0 and d.slot_of == {}
    assert spilled == ["l0"] and d.counters["evicted_blocks"] == 1


def test_admit_places_keys_and_evictions_are_reported_for_the_disk_level() -> None:
    from kvsched.core.tier import TierConfig, TierDirectory

    values = {"low": 1.0, "high": 2.0}
    d = TierDirectory(TierConfig(budget_bytes=300), block_bytes=100, value_of=lambda o: values.get(o, 0.0))
    spilled: list[tuple[object, int, object, int | None]] = []
    d.on_evict = lambda key, slot, owner, at: spilled.append((key, slot, owner, at))
    assert d.admit("low", ["a", "b"]) == [("a", 0), ("b", 1)]
    assert d.admit("low", ["a"]) == []  # held: no new slot
    placed = d.admit("high", ["c", "d"])
    assert [k for k, _ in placed] == ["c", "d"]
    assert spilled == [("b", 1, "low", 1)]  # the lower-value session's tail block (place 1), before its slot is reused
    d.lock([placed[0][1]])
    d.drop_owner("high")  # a session's end is not an eviction
    assert len(spilled) == 1


def test_a_forgotten_key_whose_slot_a_load_reads_this_step_is_not_reused_before_the_step_ends():
    """A store of the same step would be run before the load (the worker's order) and the load would read the other
    block's KV under a valid checksum."""
    d = directory(1)
    d.demote("a", blocks("k", 1))
    d.unlock_all()
    loading = d.match(["k0"], 0, 1)
    d.lock(loading)
    assert d.forget(["k0"]) == 1 and d.match(["k0"], 0, 1) == []  # gone for good
    assert d.demote("b", blocks("x", 1)) == []  # no slot this step
    d.unlock_all()
    assert [s.slot for s in d.demote("b", blocks("x", 1))] == loading  # the next step's


def test_clear_drops_every_block_and_tail_and_holds_back_a_slot_a_load_reads():
    d = directory(3)
    d.demote("a", blocks("a", 2))
    assert d.put_tail("a", "a1", [1, 2], 0) is not None
    d.unlock_all()
    loading = d.match(["a0"], 0, 1)
    d.lock(loading)
    assert d.clear() == 3
    assert d.match(["a0", "a1"], 0, 2) == [] and d.match_tail("a1", [1, 2]) is None
    assert d.keys_of == {} and d.tail_of == {} and d.used_slots == 0
    stores = d.demote("b", blocks("b", 3))
    assert len(stores) == 2 and loading[0] not in [s.slot for s in stores]  # not the slot this step's load reads
    d.unlock_all()
    assert len(d.demote("c", blocks("c", 1))) == 1
