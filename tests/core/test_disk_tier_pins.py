"""A block the disk level is reading for a restore keeps its file until the read is over (kvsched.core.disk_tier: a
restore's `claim` pins its run, `unpin` releases it when the fetch landed, failed or will never run).

The reproducer: a's restore of k2 from a full disk gets a host slot; the room made for it evicts x's tail from the
full host tier, which spills it to the full disk. x is the spill's own session, so the disk's only victim is a, the
restoring session, and its tail was k2: the block about to be read went (the fetch read a deleted file, the block was
recomputed). Claimed (a the most recent) but not pinned, nothing kept it."""

from __future__ import annotations

from kvsched.core.disk_tier import DiskDirectory
from kvsched.core.tier import TierConfig, TierDirectory


def _keys(*blocks: int) -> list[str]:
    return [f"k{b}" for b in blocks]


def _write(d: DiskDirectory, owner: str, keys: list[str], at: int | None = 0) -> list[str]:
    """Plans `owner`'s writes of `keys` (the first at chain position `at`) and confirms them; returns the deletes."""
    plan = d.plan_writes(owner, keys, at)
    for k in plan.write:
        d.done(k, True)
    return plan.delete


def test_the_room_a_restore_makes_never_spills_its_own_run_off_the_disk() -> None:
    d = DiskDirectory(4 * 100, 100)
    host = TierDirectory(TierConfig(budget_bytes=6 * 100), 100, value_of=lambda owner: 0.0)
    deleted: list[str] = []
    host.on_evict = lambda key, slot, owner, *at: deleted.extend(_write(d, owner, [key], *at))
    _write(d, "a", _keys(0, 1, 2))
    _write(d, "x", ["x0"])  # the disk is full
    host.demote("a", [(k, i) for i, k in enumerate(_keys(0, 1))], 0)
    host.demote("x", [(f"x{i}", 10 + i) for i in range(1, 5)], 1)  # the host tier is full
    assert d.match(_keys(0, 1, 2), 2, 6) == 1
    d.claim("a", _keys(2), 2)  # as tier_levels.promote: before the host makes room
    placed = host.admit("a", _keys(0, 1, 2), 0)
    assert [k for k, _ in placed] == ["k2"] and host.keys_of["x"] == ["x1", "x2", "x3"]  # x4 made the room
    assert "k2" not in deleted, "the block a restore is about to read was evicted from disk"
    assert deleted == [] and not d.holds("x4") and d.counters["writes_cut_short"] == 1  # the spill is declined
    assert d.match(_keys(0, 1, 2), 0, 6) == 3 and d.keys_of["a"] == _keys(0, 1, 2)


def test_a_pinned_block_stops_its_sessions_eviction_until_unpinned() -> None:
    """a's k1 and k2 are being read: a gives up k3 (deeper) and then nothing (a prefix stays); once the reads are over
    its tail goes again."""
    d = DiskDirectory(4 * 100, 100)
    _write(d, "a", _keys(0, 1, 2, 3))
    d.claim("a", _keys(1, 2), 1)
    plan = d.plan_writes("b", ["b0", "b1"], 0)
    assert plan.delete == ["k3"] and plan.write == ["b0"] and d.counters["writes_cut_short"] == 1
    d.done("b0", True)
    assert d.keys_of["a"] == _keys(0, 1, 2) and d.reading == {"k1": 1, "k2": 1}
    assert d.unpin(_keys(1, 2)) == [] and not d.reading
    assert _write(d, "b", ["b1"], 1) == ["k2"]


def test_another_session_loses_its_tail_before_a_pinned_one_stops_the_search() -> None:
    """The least recent session is being read: the next one gives the room."""
    d = DiskDirectory(3 * 100, 100)
    _write(d, "a", _keys(0, 1))
    _write(d, "c", ["c0"])
    d.claim("a", _keys(1), 1)
    _write(d, "c", ["c0"])  # c is now the more recent: a would go first, but its tail is pinned
    assert list(d.keys_of) == ["a", "c"]
    assert _write(d, "b", ["b0"]) == ["c0"] and d.keys_of["a"] == _keys(0, 1)


def test_a_block_whose_sessions_end_while_it_is_read_goes_once_the_read_is_over() -> None:
    """Its file stays while read (unclaimed, never evicted meanwhile), then is deleted (as a write that lands for no
    session: `done`). A session that claims it meanwhile keeps it."""
    d = DiskDirectory(3 * 100, 100)
    _write(d, "a", _keys(0, 1))
    d.claim("a", _keys(1), 1)
    assert d.drop_owner("a") == ["k0"] and d.holds("k1") and "k1" not in d.owners
    assert _write(d, "b", ["b0", "b1"]) == [] and d.plan_writes("b", ["b2"], 2).write == []  # k1 stays
    assert d.unpin(_keys(1)) == ["k1"] and not d.holds("k1") and d.counters["orphaned_reads"] == 1
    d.claim("c", ["b0"], 0)
    assert d.drop_owner("b") == ["b1"] and d.unpin(["b0"]) == [] and d.keys_of["c"] == ["b0"]  # c holds b0


def test_pins_count_each_read_and_an_unpin_without_a_pin_releases_nothing() -> None:
    d = DiskDirectory(4 * 100, 100)
    _write(d, "a", _keys(0, 1))
    d.claim("a", _keys(1), 1)
    d.claim("a", _keys(1), 1)  # a second restore's claim (its fetch found the block's slot already given)
    assert d.unpin(_keys(1, 7)) == [] and d.reading == {"k1": 1}
    assert d.unpin(_keys(1)) == [] and d.unpin(_keys(1)) == [] and not d.reading
    d.claim("a", _keys(5), 5)  # not on disk: nothing pinned
    assert not d.reading
