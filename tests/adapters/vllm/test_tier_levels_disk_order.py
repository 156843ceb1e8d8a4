"""The disk level lists a session's blocks in chain order whatever order they reach it (tier_levels, with a real
host-tier directory and a real directory on disk): the host tier spills a session's blocks deepest first, and a
restore's claim may come before a turn's end writes the blocks before it. The disk evicts its least recent session's
tail, so listed as they came it deleted a shallow block and kept a deeper one no restore could reach."""

from __future__ import annotations

from pathlib import Path

from kvsched.adapters.vllm.tier_blob import framed_len
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_levels import DISK, TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.core.tier import TierConfig, TierDirectory

IDENT = "ef" * 16
BLOCK = 1000
CHAIN = [bytes([i]) * 32 for i in range(8)]


def levels(tmp_path: Path, blocks: int) -> TierLevels:
    """A disk level of `blocks` blocks (as their files take disk)."""
    per_block = DiskFiles(tmp_path / "disk", IDENT, {}).on_disk(framed_len(32, BLOCK))
    cfg = LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=blocks * per_block / 2**30)
    lv = TierLevels(cfg, IDENT, {"model": "t"}, BLOCK, 1)
    assert lv.disk is not None and lv.disk.capacity == blocks
    return lv


def host(slots: int) -> TierDirectory:
    return TierDirectory(TierConfig(budget_bytes=slots * BLOCK), BLOCK, value_of=lambda owner: 0.0)


def spilling(tmp_path: Path, blocks: int, slots: int) -> tuple[TierLevels, TierDirectory]:
    """Disk levels of `blocks` under a host tier of `slots` whose evictions spill to them."""
    lv, h = levels(tmp_path, blocks=blocks), host(slots=slots)
    h.on_evict = lv.on_host_evict
    return lv, h


def written(lv: TierLevels) -> list[bytes]:
    """The worker writes every planned block: reported written. Returns the deletes planned."""
    ops = lv.take_ops()
    lv.written([(p.key, True) for p in ops.publishes if p.disk] + [(s.key, True) for s in ops.spills], False)
    return ops.deletes + lv.take_ops().deletes


def test_spills_deepest_first_leave_the_disk_a_prefix_a_restore_reaches(tmp_path: Path) -> None:
    """a's turn wrote blocks 0-1; the host tier, full, evicts a's 3 then 2 (its tail first): spilled to disk. Another
    session's turn needs room on the full disk: a's block 3 goes (listed as spilled, 2 went and 3 stayed unreachable),
    and a's next request restores block 2 from disk after the host tier's 0-1."""
    lv, h = spilling(tmp_path, blocks=4, slots=6)
    lv.turn_finished("a", [(k, i) for i, k in enumerate(CHAIN[:2])], None)
    assert written(lv) == []
    h.demote("a", [(k, i) for i, k in enumerate(CHAIN[:4])], 0)
    h.demote("x", [(bytes([100 + i]) * 32, 10 + i) for i in range(4)])  # a loses 3, then 2
    assert [s.key for s in lv.ops.spills] == [CHAIN[3], CHAIN[2]]
    assert written(lv) == [] and lv.disk is not None
    assert lv.disk.keys_of["a"] == CHAIN[:4] and lv.disk.position_of["a"] == {k: i for i, k in enumerate(CHAIN[:4])}
    lv.turn_finished("b", [(b"b" * 32, 20)], None)
    assert written(lv) == [CHAIN[3]]  # a's deepest block
    assert lv.disk.keys_of["a"] == CHAIN[:3] and lv.disk.match(CHAIN, 2, 6) == 1
    h.drop_owner("x")  # room in the host tier for the restore
    assert lv.promote("a", CHAIN, 0, 8, h) == 1
    fetches = lv.take_ops().fetches
    assert [(f.key, f.source) for f in fetches] == [(CHAIN[2], DISK)]
    h.unlock_all()
    for f in fetches:
        h.landed(f.slot, f.key, ok=True)
    assert len(h.match(CHAIN, 0, 8)) == 3 and h.keys_of["a"] == CHAIN[:3]  # restored up to block 2
    assert lv.disk.keys_of["a"] == CHAIN[:3]


def test_a_restore_then_a_turns_end_list_the_chain_and_eviction_takes_its_tail(tmp_path: Path) -> None:
    """Blocks 2-4 found on disk at start-up are restored for s (the pool held 0-1): claimed at places 2-4. Its turn's
    end then writes 0, 1 and 5: they go in place (listed as they came, 2-4, 0, 1, 5, and the disk's eviction took
    block 5, then 1 and 0, leaving 2-4 no restore from 0 reaches)."""
    files = DiskFiles(tmp_path / "disk", IDENT, {})
    for k in CHAIN[2:5]:
        files.write(k, b"x")
    lv = levels(tmp_path, blocks=6)
    assert lv.disk is not None and lv.promote("s", CHAIN, 2, 6, host(slots=8)) == 3
    assert lv.disk.keys_of["s"] == CHAIN[2:5]
    lv.fetches_over([(k, DISK, True) for k in CHAIN[2:5]])  # read: they may be evicted again
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:6])], None)
    assert [p.key for p in lv.take_ops().publishes] == [CHAIN[0], CHAIN[1], CHAIN[5]]
    lv.written([(k, True) for k in (CHAIN[0], CHAIN[1], CHAIN[5])], False)
    assert lv.disk.keys_of["s"] == CHAIN[:6]
    lv.turn_finished("t", [(bytes([200 + i]) * 32, i) for i in range(3)], None)  # 3 blocks: s loses 5, 4, 3
    assert written(lv) == [CHAIN[5], CHAIN[4], CHAIN[3]]
    assert lv.disk.match(CHAIN, 0, 8) == 3 and lv.disk.position_of["s"] == {CHAIN[i]: i for i in range(3)}


def test_the_room_a_restore_makes_in_the_host_tier_does_not_evict_from_disk_the_run_it_reads(tmp_path: Path) -> None:
    """a's next request restores block 2 from the full disk into the full host tier: the room made there spills x's
    tail to disk, whose eviction took a's tail, block 2 itself (a, its last write the oldest, was the least recent
    session): the fetch planned read a deleted file. The restore makes a the most recent first: b's block goes."""
    lv = levels(tmp_path, blocks=4)
    h = host(slots=6)
    h.on_evict = lv.on_host_evict
    lv.turn_finished("a", [(k, i) for i, k in enumerate(CHAIN[:3])], None)
    lv.turn_finished("b", [(b"b" * 32, 20)], None)
    assert written(lv) == [] and lv.disk is not None
    h.demote("a", [(k, i) for i, k in enumerate(CHAIN[:2])], 0)
    h.demote("x", [(bytes([100 + i]) * 32, 10 + i) for i in range(4)])  # the host tier is full
    assert lv.promote("a", CHAIN, 0, 8, h) == 1
    ops = lv.take_ops()
    assert [(f.key, f.source) for f in ops.fetches] == [(CHAIN[2], DISK)]
    assert [s.key for s in ops.spills] == [bytes([103]) * 32] and ops.deletes == [b"b" * 32]
    assert lv.disk.match(CHAIN, 0, 8) == 3 and lv.disk.keys_of["a"] == CHAIN[:3]


def test_a_restore_whose_session_is_the_only_other_one_on_disk_keeps_the_run_it_reads(tmp_path: Path) -> None:
    """As above without b: a's blocks 0-2 and x's block fill the disk. a's restore of block 2 makes room in the full
    host tier, which spills x's block 4 (x's tail) to the full disk. x is the spill's own session: the only other one
    is a, now the most recent but the only victim, and its tail, block 2, went (the fetch then read a deleted file).
    A block being read is never evicted: the spill finds no room and is declined (x's block leaves the host tier)."""
    lv = levels(tmp_path, blocks=4)
    h = host(slots=6)
    h.on_evict = lv.on_host_evict
    xs = [bytes([100 + i]) * 32 for i in range(5)]
    lv.turn_finished("a", [(k, i) for i, k in enumerate(CHAIN[:3])], None)
    lv.turn_finished("x", [(xs[0], 10)], None)
    assert written(lv) == [] and lv.disk is not None
    h.demote("a", [(k, i) for i, k in enumerate(CHAIN[:2])], 0)
    h.demote("x", [(k, 10 + i) for i, k in enumerate(xs[1:])], 1)  # the host tier is full
    assert lv.promote("a", CHAIN, 0, 8, h) == 1
    ops = lv.take_ops()
    assert [(f.key, f.source) for f in ops.fetches] == [(CHAIN[2], DISK)]
    assert CHAIN[2] not in ops.deletes, "the block being fetched was deleted from disk"
    assert ops.spills == [] and ops.deletes == []
    assert lv.disk.match(CHAIN, 0, 8) == 3 and lv.disk.keys_of["a"] == CHAIN[:3]
