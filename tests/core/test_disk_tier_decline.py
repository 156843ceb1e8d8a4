"""A write the full disk level declines costs O(1) once the disk knows nothing may go (kvsched.core.disk_tier).

The host tier offers a declined block twice, each offer from the engine step, and each looked for a block to evict
through the whole index: one walk of the sessions per session it gave up on (O(sessions^2); 2.8 s a decline at 100,000
blocks in 10,000 sessions, benchmarks/disk_decline.py). Now one walk finds nothing and the disk remembers it until
something that could free a block happens. The walks are counted on the sessions' dict itself, not by the code's own
counter; a seeded random sequence checks that the memory never declines a write the full search would take.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, ItemsView
from typing import Any

from kvsched.core.disk_tier import DiskDirectory


class Walked(dict[Any, Any]):
    """A dict that counts the walks over its items (the eviction's search over the sessions)."""

    walks = 0

    def items(self) -> ItemsView[Any, Any]:
        self.walks += 1
        return super().items()


def _pinned_full(sessions: int, per: int) -> DiskDirectory:
    """A full disk of `sessions` sessions of `per` blocks, each session's tail pinned by a read."""
    d = DiskDirectory(sessions * per, 1)
    for s in range(sessions):
        keys = [f"s{s}k{i}" for i in range(per)]
        for k in d.plan_writes(f"s{s}", keys, 0).write:
            d.done(k, True)
        d.claim(f"s{s}", keys[-1:], per - 1)
    d.keys_of = Walked(d.keys_of)
    return d


def test_declined_writes_on_a_disk_full_of_pinned_blocks_walk_the_sessions_once_per_sparing_owner() -> None:
    d = _pinned_full(sessions=50, per=4)
    for i in range(20):  # the host tier's spills of x's blocks, each declined
        assert d.plan_writes("x", [f"x{i}"], i).write == []
    assert isinstance(d.keys_of, Walked) and d.keys_of.walks == 1, f"{d.keys_of.walks} walks for 20 declines"
    for i in range(5):  # another session's: the first search spared x's blocks (it has none here): one more walk
        assert d.plan_writes("y", [f"y{i}"], i).write == []
    assert d.keys_of.walks == 2
    assert d.plan_writes("z", ["z0"], 0).write == [] and d.keys_of.walks == 2  # nobody's block may go: no walk
    assert d.counters["writes_cut_short"] == 26 and d.counters["eviction_searches"] == 2


def test_a_released_pin_a_written_block_or_an_ended_session_lets_the_next_write_search_again() -> None:
    d = _pinned_full(sessions=3, per=1)
    assert d.plan_writes("x", ["x0"], 0).write == []
    assert d.unpin(["s1k0"]) == [] and d.plan_writes("x", ["x0"], 0).delete == ["s1k0"]  # a pin released
    assert d.plan_writes("y", ["y0"], 0).write == []  # x0 is pending, the others pinned
    d.done("x0", True)
    assert d.plan_writes("y", ["y0"], 0).delete == ["x0"]  # a write reported: it may go now
    assert d.plan_writes("x", ["x1"], 1).write == []
    d.done("y0", False)  # a failed write: its room
    assert d.plan_writes("x", ["x1"], 1).write == ["x1"] and d.plan_writes("y", ["y1"], 1).write == []
    assert d.drop_owner("s0") == [] and d.plan_writes("y", ["y1"], 1).write == []  # s0's block is read still
    assert d.unpin(["s0k0"]) == ["s0k0"] and d.plan_writes("y", ["y1"], 1).write == ["y1"]  # its orphan went


def test_a_search_that_spared_one_session_does_not_decline_another_whose_write_may_take_its_blocks() -> None:
    d = DiskDirectory(3, 1)
    for k in d.plan_writes("a", ["a0", "a1", "a2"], 0).write:
        d.done(k, True)
    assert d.plan_writes("a", ["a3"], 3).write == []  # a's own blocks never go for a
    plan = d.plan_writes("b", ["b0"], 0)
    assert plan.write == ["b0"] and plan.delete == ["a2"]


def test_blocks_found_at_start_up_go_first_oldest_first_and_once_claimed_stay_as_any_session_s() -> None:
    d = DiskDirectory(3, 1)
    assert d.load_index(["f0", "f1", "f2"]) == []
    d.claim("a", ["f0"], 0)
    d.unpin(["f0"])
    assert d.plan_writes("b", ["b0"], 0).delete == ["f1"]  # f0 is a's now
    assert d.plan_writes("b", ["b1"], 1).delete == ["f2"]
    assert d.plan_writes("b", ["b2"], 2).delete == ["f0"]  # then a's tail, as any session's


def _ops(seed: int, n: int) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    owners = [f"o{i}" for i in range(6)]
    ops: list[tuple[str, Any]] = []
    for _ in range(n):
        o, at = rng.choice(owners), rng.randrange(8)
        kind = rng.choice(["write", "write", "write", "done", "claim", "unpin", "drop", "forget"])
        keys = [f"{o}k{i}" if rng.random() < 0.8 else f"shared{i}" for i in range(at, at + rng.randrange(1, 3))]
        ops.append((kind, (o, keys, at, rng.random() < 0.9)))
    return ops


class Searching(DiskDirectory):
    """The same books, always searching (no memory of a failed search)."""

    def _known_full(self, owner: Hashable) -> bool:
        return False


def _run(d: DiskDirectory, ops: list[tuple[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for kind, (o, keys, at, ok) in ops:
        if kind == "write":
            plan = d.plan_writes(o, keys, at)
            out.append((plan.write, plan.delete))
        elif kind == "done":
            out += [d.done(k, ok) for k in sorted(map(str, d.pending))[:2]]
        elif kind == "claim":
            d.claim(o, keys, at)
        elif kind == "unpin":
            out.append(d.unpin(sorted(map(str, d.reading))[:1]))
        elif kind == "drop" and ok:  # rarer than the others
            continue
        elif kind == "drop":
            out.append(d.drop_owner(o))
        else:
            out.append(d.forget(keys[:1]) if not ok else [])
    return out + [sorted(map(str, d.written)), {str(o): list(k) for o, k in d.keys_of.items()}]


def test_remembering_a_failed_search_never_changes_a_plan() -> None:
    served = 0
    for seed in range(30):
        ops = _ops(seed, 400)
        d = DiskDirectory(6, 1)
        assert _run(d, ops) == _run(Searching(6, 1), ops), f"seed {seed}"
        served += d.counters["declined_unsearched"]
    assert served > 100, f"the memory served {served} declines: too weak a sequence to tell"
