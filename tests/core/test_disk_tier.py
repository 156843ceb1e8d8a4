"""The disk level's directory (kvsched.core.disk_tier): budget, write confirmation, eviction order, restart index."""

from __future__ import annotations

import sys

import pytest

from kvsched.core.disk_tier import DiskConfigError, DiskDirectory, parse_disk_gib


def directory(blocks: int) -> DiskDirectory:
    return DiskDirectory(blocks * 100, 100)


def write_all(d: DiskDirectory, owner: str, keys: list[str]) -> list[str]:
    plan = d.plan_writes(owner, keys)
    for k in plan.write:
        d.done(k, True)
    return plan.delete


def test_only_written_blocks_match_and_a_failed_write_is_dropped() -> None:
    d = directory(8)
    plan = d.plan_writes("a", ["k0", "k1", "k2"])
    assert plan.write == ["k0", "k1", "k2"] and plan.delete == []
    assert d.match(["k0", "k1", "k2"], 0, 3) == 0  # pending: a restore would find no complete file
    d.done("k0", True)
    d.done("k1", False)
    d.done("k2", True)
    assert d.match(["k0", "k1", "k2"], 0, 3) == 1  # the run stops at the block whose write failed
    assert d.plan_writes("a", ["k0", "k1"]).write == ["k1"]  # written again next turn


def test_full_budget_evicts_unclaimed_oldest_first_then_the_least_recent_sessions_tail_first() -> None:
    d = directory(5)
    assert d.load_index(["old0", "old1"]) == []  # found at start-up: nobody claims them
    write_all(d, "a", ["a0"])
    write_all(d, "b", ["b0", "b1"])
    assert write_all(d, "c", ["c0", "c1"]) == ["old0", "old1"]  # unclaimed first, oldest first
    assert write_all(d, "d", ["d0"]) == ["a0"]  # then the session written longest ago
    assert write_all(d, "b", ["b0", "b1"]) == []  # b's next turn claims its blocks: b is the most recent now
    assert write_all(d, "e", ["e0"]) == ["c1"]  # so c is the least recent: its tail block goes
    assert d.match(["c0", "c1"], 0, 2) == 1
    d.claim("c", ["c0"])  # a restore makes c recent too
    assert write_all(d, "f", ["f0"]) == ["d0"]
    assert d.counters["writes_cut_short"] == 0


def test_a_disk_full_of_idle_sessions_still_takes_a_new_turn() -> None:
    """Found by review: ranked by the host tier's value (0 for a session with nothing demoted, the normal case at a
    turn's end), no session could evict another once live sessions filled the disk: later turns were never written."""
    d = directory(8)
    write_all(d, "idle", [f"i{k}" for k in range(8)])
    for s in "BCDE":
        plan = d.plan_writes(s, [f"{s}{k}" for k in range(4)])
        assert len(plan.write) == 4
        for k in plan.write:
            d.done(k, True)
    assert d.match([f"E{k}" for k in range(4)], 0, 4) == 4 and d.counters["writes_cut_short"] == 0


def test_index_past_the_budget_drops_the_oldest_and_claim_gives_an_owner() -> None:
    d = directory(2)
    assert d.load_index(["a", "b", "c"]) == ["a"]
    assert d.match(["b", "c"], 0, 5) == 2
    d.claim("s", ["b", "c", "zzz"])
    assert d.keys_of["s"] == ["b", "c"] and d.reading == {"b": 1, "c": 1}  # being read: pinned
    assert d.unpin(["b", "c", "zzz"]) == [] and not d.reading  # the fetches are over
    assert d.drop_owner("s") == ["b", "c"] and d.size == 0


def test_forget_and_shrink_on_a_full_disk() -> None:
    d = directory(10)
    write_all(d, "s", ["a", "b", "c"])
    assert d.forget(["b", "nope"]) == ["b"]
    assert d.match(["a", "b", "c"], 0, 3) == 1
    assert d.shrink_to_size() == 2  # what is written now
    plan = d.plan_writes("t", ["x"])  # no room: s, written longer ago, loses its tail block
    assert plan.write == ["x"] and plan.delete == ["c"]


def test_shared_blocks_survive_one_owner_ending() -> None:
    d = directory(10)
    write_all(d, "a", ["sys", "a1"])
    write_all(d, "b", ["sys", "b1"])
    assert sorted(d.drop_owner("a")) == ["a1"]
    assert d.match(["sys", "b1"], 0, 2) == 2


def test_sizes_are_checked() -> None:
    with pytest.raises(DiskConfigError, match="GiB"):
        parse_disk_gib("lots")
    with pytest.raises(DiskConfigError):
        parse_disk_gib(0)
    assert parse_disk_gib("1.5") == 1.5
    with pytest.raises(DiskConfigError, match="GiB"):  # found by review: JSON `true` was 1 GiB
        parse_disk_gib(True)
    with pytest.raises(DiskConfigError):
        DiskDirectory(100, 0)


def test_a_write_in_flight_when_its_session_ends_is_deleted_not_indexed() -> None:
    """Found by review: a block whose only session ended while its write was in flight stayed on disk, indexed with
    no owner, until an eviction found it. A block another session claimed meanwhile stays."""
    d = directory(8)
    d.plan_writes("a", ["k0", "k1", "k2"])
    d.plan_writes("b", ["k0"])  # shares the first block
    assert d.drop_owner("a") == []  # nothing written yet: nothing to delete now
    assert d.done("k0", True) is False and d.done("k1", True) is True and d.done("k2", False) is True
    assert d.match(["k0", "k1"], 0, 2) == 1 and d.size == 1 and d.counters["orphaned_writes"] == 1


def test_an_eviction_peeling_a_long_shared_prefix_does_not_recurse() -> None:
    """Found by review: `_evict` recursed once per shared block it peeled off a victim, so two sessions sharing a
    prefix longer than Python's recursion limit raised RecursionError out of plan_writes (into the engine step)."""
    n = sys.getrecursionlimit() + 100
    d = directory(n + 1)
    shared = [f"sys{i}" for i in range(n)]
    write_all(d, "a", shared)
    write_all(d, "b", [*shared, "b-own"])  # the disk is full now
    assert write_all(d, "c", ["c0"]) == ["b-own"]  # a peels off every shared block; b's own block goes
    assert "a" not in d.keys_of and d.match(shared, 0, n) == n
