"""The disk level lists a session's blocks in chain order whatever order they came in (`kvsched.core.tier_chain`).

The disk evicts the tail of its least recent session's list, so that what stays is a prefix a restore can reach (a
restore runs along the chain from the pool's or the host tier's hit). Blocks reach it one at a time when the host tier
evicts them, its own tail first: a session's spills come deepest first. Listed in arrival order (k0, k1, k3, k2), a
full disk evicted k2 and kept k3, which no restore can reach."""

from __future__ import annotations

from kvsched.core.disk_tier import DiskDirectory
from kvsched.core.tier import TierConfig, TierDirectory


def _keys(*blocks: int) -> list[str]:
    return [f"k{b}" for b in blocks]


def _write(d: DiskDirectory, owner: str | None, keys: list[str], *at: int | None) -> list[str]:
    """Plans `owner`'s writes of `keys` (the first at chain position `*at`) and confirms them; returns the deletes."""
    plan = d.plan_writes(owner, keys, *at)
    for k in plan.write:
        d.done(k, True)
    return plan.delete


def test_spills_deepest_first_are_listed_in_chain_order_and_a_full_disk_evicts_the_deepest() -> None:
    """The reproducer: a's turn wrote k0, k1; the host tier then evicts k3, then k2 (its tail first). Another
    session's write needs room: a's k3 goes and a restore still reaches 3 blocks (k2 went before: 2, k3 for nothing)."""
    d = DiskDirectory(4 * 100, 100)
    _write(d, "a", _keys(0, 1), 0)
    _write(d, "a", _keys(3), 3)
    _write(d, "a", _keys(2), 2)
    assert d.keys_of["a"] == _keys(0, 1, 2, 3)
    assert _write(d, "b", ["b0"], 0) == ["k3"]
    assert d.keys_of["a"] == _keys(0, 1, 2) and d.match(_keys(0, 1, 2, 3), 0, 4) == 3


def test_the_host_tiers_evictions_reach_the_disk_with_their_positions() -> None:
    """The host tier passes each evicted key's place in its owner's chain to `on_evict`. `*at`: that position (the
    same test, run on a host tier that passes none, fails: the disk lists a's spills deepest first)."""
    d = DiskDirectory(5 * 100, 100)
    host = TierDirectory(TierConfig(budget_bytes=4 * 100), 100, value_of=lambda owner: 0.0)
    host.on_evict = lambda key, slot, owner, *at: _write(d, owner, [key], *at) and None
    host.demote("a", [(k, i) for i, k in enumerate(_keys(0, 1, 2, 3))], 0)
    host.demote("x", [("x0", 10), ("x1", 11), ("x2", 12)])  # a loses k3, k2, k1 to the disk, in that order
    assert d.keys_of["a"] == _keys(1, 2, 3) and host.keys_of["a"] == _keys(0)
    host.demote("y", [("y0", 20), ("y1", 21)])  # a's k0, then x's x2 spill too: the disk is full
    assert d.keys_of["a"] == _keys(0, 1, 2, 3) and d.keys_of["x"] == ["x2"]
    assert _write(d, "b", ["b0"], 0) == ["k3"]  # a, the least recent session, loses its tail
    assert d.keys_of["a"] == _keys(0, 1, 2) and d.match(_keys(0, 1, 2, 3), 0, 4) == 3


def test_turn_end_writes_and_spills_interleave_in_chain_order() -> None:
    """A's spills of k5, k4 (an older pin's tail) land before its turn's end writes k0..k3, then a restore claims k6
    (after k5 at place 6): the list is the chain."""
    d = DiskDirectory(16 * 100, 100)
    _write(d, "a", _keys(5), 5)
    _write(d, "a", _keys(4), 4)
    assert _write(d, "a", _keys(0, 1, 2, 3, 4, 5), 0) == []  # k4, k5 are claimed, not written again
    assert d.keys_of["a"] == _keys(0, 1, 2, 3, 4, 5)
    _write(d, "z", _keys(6))
    d.claim("a", _keys(6), 6)
    assert d.keys_of["a"] == _keys(0, 1, 2, 3, 4, 5, 6) and d.position_of["a"]["k6"] == 6


def test_a_shared_key_keeps_each_owners_place_and_unknown_positions_go_last() -> None:
    """k0 is a's first block and b's third (b's chain: s0, s1, k0): each list is its own owner's chain. A key whose
    place is unknown (None) goes after the owner's listed ones, as it came."""
    d = DiskDirectory(16 * 100, 100)
    _write(d, "b", ["k0"], 2)
    _write(d, "a", _keys(1), 1)
    _write(d, "a", _keys(0), 0)
    _write(d, "b", ["s0", "s1"], 0)
    assert d.keys_of["a"] == _keys(0, 1) and d.keys_of["b"] == ["s0", "s1", "k0"]
    _write(d, "a", ["u"])
    _write(d, "a", ["v"], None)
    assert d.keys_of["a"] == ["k0", "k1", "u", "v"] and d.position_of["a"] == {"k0": 0, "k1": 1, "u": 2, "v": 3}


def test_positions_leave_with_their_keys() -> None:
    """An eviction, a failed write, a bad file, a session's end: no position outlives its key in the owner's list."""
    d = DiskDirectory(4 * 100, 100)
    _write(d, "a", _keys(0, 1, 2), 0)
    d.plan_writes("a", _keys(3), 3)
    d.done("k3", False)  # a failed write: dropped
    assert d.position_of["a"] == {"k0": 0, "k1": 1, "k2": 2}
    d.forget(["k1"])
    assert d.keys_of["a"] == _keys(0, 2) and d.position_of["a"] == {"k0": 0, "k2": 2}
    assert _write(d, "b", ["b0", "b1", "b2", "b3"], 0) == ["k2", "k0"]  # a's tail first
    assert "a" not in d.keys_of and "a" not in d.position_of
    d.drop_owner("b")
    assert not d.keys_of and not d.position_of
