"""A write the full disk level declines costs O(1) once the disk knows nothing may go (kvsched.core.disk_tier).

The host tier offers a declined block twice, each offer from the engine step, and each looked for a block to evict
through the whole index: one walk of the sessions per session it gave up on (O(sessions^2); 2.8 s a decline at 100,000
blocks in 10,000 sessions, benchmarks/disk_decline.py). Then one walk found nothing and the disk remembered it until
something that could free a block happened; that first walk still visited every session (5.3 ms at 10,000). Now a
search visits only the sessions whose tail-most written block is not pinned, and those made live since the last one
(`LiveQueue`). The walks are counted on the sessions' dict itself and the visits on `_peel`, not by the code's own
counters; seeded random sequences check that neither the memory nor the live queue ever changes a plan or the books
against the full walk.
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


class Visited(DiskDirectory):
    """Counts the sessions an eviction visits (`_peel`)."""

    visits = 0

    def _peel(self, victim: Hashable, deleted: list[Hashable]) -> bool:
        self.visits += 1
        return super()._peel(victim, deleted)


def _pinned_full(sessions: int, per: int) -> Visited:
    """A full disk of `sessions` sessions of `per` blocks, each session's tail pinned by a read."""
    d = Visited(sessions * per, 1)
    for s in range(sessions):
        keys = [f"s{s}k{i}" for i in range(per)]
        for k in d.plan_writes(f"s{s}", keys, 0).write:
            d.done(k, True)
        d.claim(f"s{s}", keys[-1:], per - 1)
    d.keys_of = Walked(d.keys_of)
    return d


def test_declined_writes_on_a_disk_full_of_pinned_blocks_search_once_per_sparing_owner_and_visit_no_session() -> None:
    """Before, the first search walked the 50 sessions (visiting each: 50 peels); now none is live (each one's tail
    is pinned, known when it was claimed), so no search walks or visits any."""
    d = _pinned_full(sessions=50, per=4)
    for i in range(20):  # the host tier's spills of x's blocks, each declined
        assert d.plan_writes("x", [f"x{i}"], i).write == []
    assert isinstance(d.keys_of, Walked) and d.keys_of.walks == 0 and d.visits == 0, (d.keys_of.walks, d.visits)
    for i in range(5):  # another session's: the first search spared x's blocks (it has none here): one more search
        assert d.plan_writes("y", [f"y{i}"], i).write == []
    assert d.plan_writes("z", ["z0"], 0).write == []  # nobody's block may go: no search
    assert d.counters["writes_cut_short"] == 26 and d.counters["eviction_searches"] == 2
    assert d.keys_of.walks == 0 and d.visits == 0
    assert d.unpin(["s7k3"]) == [] and d.plan_writes("z", ["z0"], 0).delete == ["s7k3"]  # the one session made live
    assert d.visits == 1 and d.keys_of.walks == 0


def test_a_pinned_tail_found_bad_makes_its_session_live_again() -> None:
    """Each session's tail pinned; s1's is found bad (`forget`): its block before it may go now, as a full walk
    finds."""
    d = _pinned_full(sessions=3, per=2)
    assert d.forget(["s1k1"]) == ["s1k1"]
    assert d.plan_writes("x", ["x0"], 0).write == ["x0"]  # the room it left
    assert d.plan_writes("x", ["x1"], 1).delete == ["s1k0"] and d.visits == 1


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


def _ops(seed: int, n: int, n_owners: int = 6) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    owners = [f"o{i}" for i in range(n_owners)]
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


class Walking(DiskDirectory):
    """The same books, each search walking every session least recent first (as before the live queue)."""

    def _search(self, exclude: Hashable, deleted: list[Hashable]) -> bool:
        emptied: list[Hashable] = []
        try:
            for victim, keys in self.keys_of.items():
                if victim == exclude:
                    continue
                freed = self._peel(victim, deleted)
                if not keys:
                    emptied.append(victim)
                if freed:
                    return True
        finally:
            for victim in emptied:
                del self.keys_of[victim]
                self.position_of.pop(victim, None)
        return False


class WalkingSearching(Walking, Searching):
    """Every search a full walk: the plain algorithm, no memory, no live queue."""


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


def test_the_live_queue_never_changes_a_plan_nor_the_books() -> None:
    """Against the full walk (with and without the memory of a failed search), at two scales of sessions and disk."""
    visits = 0
    for seed in range(60):
        for owners, capacity in ((6, 6), (30, 20)):
            ops = _ops(1000 + seed, 500, owners)
            d = Visited(capacity, 1)
            want = _run(WalkingSearching(capacity, 1), ops)
            assert _run(d, ops) == want == _run(Walking(capacity, 1), ops), f"seed {seed}, {owners} owners"
            visits += d.visits
    assert visits > 1000, f"{visits} sessions visited: too weak a sequence to tell"
