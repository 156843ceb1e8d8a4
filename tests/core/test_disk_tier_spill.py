"""A block the host tier evicts that the disk level declines stays in the host tier while another block can go instead
(kvsched.core.tier: `on_evict` returns False; kvsched.core.disk_tier declines a spill it has no room for).

The reproducer: the disk is full of x's own blocks 0-2, so x's deeper block 3, evicted from the full host tier (x the
least recent session), finds no room there (a session's spill never evicts its own blocks: what stays must be a
prefix). The host tier freed it anyway: block 3 was in neither tier, though y's tail could have gone to disk instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from kvsched.core.disk_tier import DiskDirectory
from kvsched.core.tier import TierConfig, TierDirectory

Spill = Callable[[Hashable, int, Hashable, int | None], bool | None]


def _host(slots: int) -> TierDirectory:
    return TierDirectory(TierConfig(budget_bytes=slots * 100), 100, value_of=lambda owner: 0.0)


def _spill_to(d: DiskDirectory) -> Spill:
    """As tier_levels.on_host_evict: a block the disk holds needs nothing; else its write is planned (and reported
    written at once), or declined (False) when the disk has no room for it."""

    def spill(key: Hashable, slot: int, owner: Hashable, at: int | None = None) -> bool | None:
        if d.holds(key):
            return None
        plan = d.plan_writes(owner, [key], at)
        for k in plan.write:
            d.done(k, True)
        return None if plan.write else False

    return spill


def _blocks(prefix: str, n: int) -> list[tuple[str, int]]:
    return [(f"{prefix}{i}", i) for i in range(n)]


def test_a_block_the_disk_declines_stays_in_the_host_tier_and_another_session_gives_the_room() -> None:
    d = DiskDirectory(3 * 100, 100)
    for k in ("x0", "x1", "x2"):
        d.plan_writes("x", [k])
        d.done(k, True)
    host = _host(6)
    host.on_evict = _spill_to(d)
    host.demote("x", _blocks("x", 4), 0)
    host.demote("y", _blocks("y", 2), 0)  # the host tier is full; x is its least recent session
    assert [s.slot for s in host.demote("z", _blocks("z", 1), 0)] == [host.slot_of["z0"]]
    assert host.keys_of["x"] == ["x0", "x1", "x2", "x3"], "x3 was evicted though the disk declined it"
    assert "y1" not in host.slot_of and d.holds("y1") and host.keys_of["y"] == ["y0"]  # y's tail went to disk
    assert d.counters["writes_cut_short"] == 1 and host.counters["declined_evictions"] == 0
    assert d.keys_of["x"] == ["x0", "x1"]  # the disk made room for y1 from x, whose block 2 the host tier holds


def test_a_declined_block_keeps_the_blocks_before_it_and_goes_last_when_nothing_else_can() -> None:
    """z needs 3 slots: y's two blocks go to disk, and then, nothing else left, x's declined tail goes after all (as
    with no disk level, counted). x's earlier blocks stay (never a block behind a gap)."""
    host = _host(5)
    declined: list[Hashable] = []

    def spill(key: Hashable, slot: int, owner: Hashable, at: int | None = None) -> bool | None:
        if owner == "x":
            declined.append(key)
            return False
        return None

    host.on_evict = spill
    host.demote("x", _blocks("x", 3), 0)
    host.demote("y", _blocks("y", 2), 0)
    assert len(host.demote("z", _blocks("z", 3), 0)) == 3
    assert host.keys_of["x"] == ["x0", "x1"] and "y" not in host.keys_of
    assert declined == ["x2", "x2"] and host.counters["declined_evictions"] == 1  # offered once per pass


def test_with_no_room_on_disk_at_all_the_host_tier_still_evicts_as_with_no_disk() -> None:
    """A disk level of no block declines every spill: the host tier must not freeze (each demotion still finds
    room, the declined blocks counted as lost)."""
    d = DiskDirectory(0, 100)
    host = _host(2)
    host.on_evict = _spill_to(d)
    host.demote("x", _blocks("x", 2), 0)
    assert len(host.demote("y", _blocks("y", 2), 0)) == 2 and "x" not in host.keys_of
    assert host.counters["declined_evictions"] == 2 and host.counters["evicted_blocks"] == 2


def test_a_copy_the_pool_holds_goes_even_if_declined() -> None:
    """The first pass gives up copies of blocks the pool holds (tier_reach): losing one loses nothing, so a decline
    there does not keep it."""
    host = _host(3)
    host.reach.pool_holds = lambda key: str(key).startswith("y")
    offered: list[Hashable] = []
    host.on_evict = lambda key, slot, owner, at=None: offered.append(key) or False
    host.demote("x", _blocks("x", 1), 0)
    host.demote("y", _blocks("y", 2), 0)
    assert len(host.demote("z", _blocks("z", 1), 0)) == 1 and offered == ["y1"]
    assert host.keys_of["x"] == ["x0"] and host.keys_of["y"] == ["y0"] and not host.counters["declined_evictions"]
