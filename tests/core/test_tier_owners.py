"""The tier directory's owners table (kvsched.core.tier_owners): a key's sole owner unboxed, a set from the second one,
no owner (an orphan) until freed; and the directory's books it keeps without a set per key."""

from __future__ import annotations

import gc

from kvsched.core.tier import TailKey, TierConfig, TierDirectory
from kvsched.core.tier_owners import KeyOwners


def test_one_owner_is_stored_as_itself_and_a_second_makes_a_set():
    o = KeyOwners()
    o.add("k", "a")
    assert o._of["k"] == "a" and o["k"] == frozenset({"a"})
    assert o.own("k", "a") is False  # already owned: not listed twice
    assert o.own("k", "b") is True and o["k"] == frozenset({"a", "b"})
    assert o.leave("k", "a") is True and o._of["k"] == "b"  # back to one owner: the set goes
    assert o.leave("k", "c") is True  # not an owner: the others remain
    assert o.leave("k", "b") is False and "k" in o and not o.owned("k") and not o.get("k")  # an orphan, still held
    assert o.own("k", "c") is True and o.owned("k")  # owned again
    assert o.leave("missing", "a") is None and o.get("missing") is None


def test_falsy_owners_are_owners():
    o = KeyOwners()
    o.add("k", 0)
    assert o.owned("k") and o.get("k") == frozenset({0})
    assert o.own("k", "") is True and o.leave("k", 0) is True and o["k"] == frozenset({""})
    assert o.leave("k", "") is False and not o.owned("k")


def test_pop_discard_items_and_len():
    o = KeyOwners()
    o.add("a", 1)
    o.add("b", 2)
    o.own("b", 3)
    assert dict(o.items()) == {"a": frozenset({1}), "b": frozenset({2, 3})} and len(o) == 2
    assert o.pop("b") == frozenset({2, 3}) and o.pop("b") == frozenset()
    o.discard("a")
    assert not o


def test_the_directory_holds_no_set_for_a_block_one_session_owns():
    d = TierDirectory(TierConfig(budget_bytes=10 * 100), 100, lambda o: 0.0)
    d.demote("a", [("sys", 0), ("a0", 1)])
    d.demote("b", [("sys", 2), ("b0", 3)])
    assert d.owners._of["a0"] == "a" and d.owners._of["sys"] == {"a", "b"}
    assert not any(type(v) is set for k, v in d.owners._of.items() if k != "sys")
    d.drop_owner("a")
    assert d.owners._of["sys"] == "b" and "a0" not in d.slot_of


def test_a_demotion_of_keys_a_session_holds_lists_each_once():
    """The held run and later held keys gain the owner once (checked per key, not against a set of the session's
    keys: that was O(its tier blocks) per demotion)."""
    d = TierDirectory(TierConfig(budget_bytes=10 * 100), 100, lambda o: 0.0)
    d.demote("a", [("k0", 0), ("k1", 1)])
    d.demote("b", [("k0", 0), ("k2", 2)])
    assert d.demote("a", [("k0", 0), ("k1", 1), ("k2", 2), ("k3", 3), ("k1", 1)]) != []
    assert d.keys_of["a"] == ["k0", "k1", "k2", "k3"] and d.owners["k2"] == frozenset({"a", "b"})


def test_a_superseded_tail_is_not_remembered_as_evicted():
    """`was_evicted` is asked of block hashes only; a session's previous tail there was an object per turn for the
    garbage collector, and pushed evicted blocks out of the bounded memory."""
    d = TierDirectory(TierConfig(budget_bytes=10 * 100), 100, lambda o: 0.0)
    d.put_tail("a", "k0", [1, 2], 5)
    d.put_tail("a", "k0", [1, 2, 3], 5)
    assert not d._evicted and not d.was_evicted(TailKey("k0", (1, 2)))
    d.demote("a", [("k0", 0)])
    d.drop_owner("a")
    assert list(d._evicted) == ["k0"]


def test_a_filling_tier_adds_no_tracked_object_per_block():
    d = TierDirectory(TierConfig(budget_bytes=5000 * 100), 100, lambda o: 0.0)
    gc.collect()
    before = len(gc.get_objects())
    for s in range(50):
        d.demote(f"s{s}", [(f"s{s}-{i}".encode(), i) for i in range(40)])
    gc.collect()
    assert len(gc.get_objects()) - before < 200  # 2,000 blocks: the owners' lists, not a set per block
