"""The disk and shared levels' scheduler side (tier_levels.TierLevels) with a real host-tier directory, a real
directory on disk and a real redis-server: what is written, what a request's arrival fetches from where, and what a
failure does to the books."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.vllm.tier_blob import framed_len
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_levels import DISK, SHARED, TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.core.sessions import SessionId, SessionKey
from kvsched.core.shared_state import SessionMeta, block_key, session_key
from kvsched.core.tier import TierConfig, TierDirectory
from tests.adapters.vllm.conftest import promote_answered

IDENT = "ef" * 16
BLOCK = 1000
CHAIN = [bytes([i]) * 32 for i in range(8)]


def levels(tmp_path: Path, url: str | None = None, disk_gb: float = 1.0, replica: str = "me") -> TierLevels:
    cfg = LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=disk_gb, store_url=url, replica=replica)
    return TierLevels(cfg, IDENT, {"model": "t"}, BLOCK, 1)


def host(slots: int = 16) -> TierDirectory:
    return TierDirectory(TierConfig(budget_bytes=slots * BLOCK), BLOCK, value_of=lambda owner: 0.0)


def test_a_turn_is_written_behind_once_and_only_written_blocks_are_restored(tmp_path: Path) -> None:
    lv = levels(tmp_path)
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:4])], None)
    ops = lv.take_ops()
    assert [(p.key, p.block_id, p.disk, p.shared) for p in ops.publishes] == [(k, i, True, False)
                                                                              for i, k in enumerate(CHAIN[:4])]
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:5])], None)
    assert [p.key for p in lv.take_ops().publishes] == [CHAIN[4]]  # only the new block
    h = host()
    assert lv.promote("s", CHAIN, 0, 8, h) == 0  # nothing confirmed written yet: nothing to fetch
    lv.written([(k, True) for k in CHAIN[:3]] + [(CHAIN[3], False)], disk_full=False)
    assert lv.promote("s", CHAIN, 1, 7, h) == 2  # blocks 1-2 (0 is cached; 3's write failed)
    fetches = lv.take_ops().fetches
    assert [(f.key, f.source) for f in fetches] == [(CHAIN[1], DISK), (CHAIN[2], DISK)]
    assert [h.slot_of[k] for k in CHAIN[1:3]] == [f.slot for f in fetches]
    assert h.match(CHAIN, 1, 7) == [] and h.fetching(CHAIN, 1, 7)  # no restore reads them before they land
    h.unlock_all()  # the step ends; the fetch goes on
    assert h.inflight == {f.slot for f in fetches}
    for f in fetches:
        h.landed(f.slot, f.key, ok=True)
    assert h.match(CHAIN, 1, 7) == [f.slot for f in fetches]  # now the host tier's, for the prefetch


def test_a_bad_disk_block_is_forgotten_and_deleted_and_a_full_disk_shrinks_the_budget(tmp_path: Path) -> None:
    lv = levels(tmp_path)
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:3])], None)
    lv.take_ops()
    lv.written([(k, True) for k in CHAIN[:3]], disk_full=False)
    lv.fetch_failed([(CHAIN[1], DISK)])
    assert lv.take_ops().deletes == [CHAIN[1]]
    assert lv.disk is not None and lv.disk.match(CHAIN, 0, 3) == 1
    lv.written([], disk_full=True)
    assert lv.disk.capacity == 2 and lv.stats()["disk_tier_capacity_bytes"] == 2 * lv.disk.block_bytes


def test_an_evicted_host_block_is_spilled_unless_its_slot_is_rewritten_this_step(tmp_path: Path) -> None:
    lv = levels(tmp_path)
    busy: set[int] = {7}
    lv._busy_slots = lambda: busy
    lv.on_host_evict(CHAIN[0], 3, "s")
    lv.on_host_evict(CHAIN[1], 7, "s")
    ops = lv.take_ops()
    assert [(s.key, s.slot) for s in ops.spills] == [(CHAIN[0], 3)] and lv.counters["spills_skipped"] == 1
    lv.written([(CHAIN[0], True)], disk_full=False)
    lv.on_host_evict(CHAIN[0], 4, "s")  # on disk already: no second write
    assert not lv.take_ops().spills


def test_the_index_is_rebuilt_at_start_up_within_the_budget(tmp_path: Path) -> None:
    files = DiskFiles(tmp_path / "disk", IDENT, {})
    for k in CHAIN[:5]:
        files.write(k, b"x")
    lv = levels(tmp_path, disk_gb=3 * files.on_disk(framed_len(32, BLOCK)) / 2**30)  # 3 files, as they take disk
    assert lv.disk is not None and lv.disk.capacity == 3
    assert list(lv.disk.written) == CHAIN[2:5]  # the newest files stay
    assert lv.take_ops().deletes == CHAIN[:2]
    assert lv.promote("s", CHAIN, 0, 8, host()) == 0  # block 0 is gone: nothing after it is of use from 0
    assert lv.promote("s", CHAIN, 2, 6, host()) == 3


def test_a_moved_session_is_recognised_and_fetched_from_the_shared_store(tmp_path: Path, redis_server) -> None:
    a = levels(tmp_path / "a", url=redis_server.url, replica="a")
    b = levels(tmp_path / "b", url=redis_server.url, replica="b")
    owner = SessionKey(SessionId("wf/1"))
    a.turn_finished(owner, [(k, i) for i, k in enumerate(CHAIN[:4])], SimpleNamespace(role="worker", ttl_s=30.0,
                                                                                          turns=3))
    assert all(p.shared for p in a.take_ops().publishes)
    assert a.meta_writer is not None and a.meta_writer.flush(5.0)
    meta = SessionMeta.decode(a.store.get_state(session_key(IDENT, "wf/1", None)))
    assert meta == SessionMeta(role="worker", ttl_s=30.0, turns=3, replica="a", blocks=4)
    # the worker's writer would put the frames; here the first three are there
    a.store.put_blocks({block_key(IDENT, k): b"frame" for k in CHAIN[:3]}, ttl_s=60)
    h = host()
    assert promote_answered(b, owner, CHAIN, 0, 8, h) == 3
    assert [(f.key, f.source) for f in b.take_ops().fetches] == [(k, SHARED) for k in CHAIN[:3]]
    assert b.stats()["moved_sessions"] == 1 and b.stats()["moved_sessions_restored"] == 1
    assert promote_answered(b, owner, CHAIN, 0, 8, h) == 0  # held by the host tier now; and counted as moved once
    assert b.stats()["moved_sessions"] == 1


def test_a_write_counts_once_every_rank_reported_it_and_a_failed_one_leaves_no_file(tmp_path: Path) -> None:
    """Found by review (tensor parallel 2): a failure on one rank left the other rank's file behind for good, and its
    success, reported after the failure, counted towards the key's next write (marked written after one rank)."""
    cfg = LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=1.0)
    lv = TierLevels(cfg, IDENT, {"model": "t"}, BLOCK, 2)
    lv.turn_finished("s", [(CHAIN[0], 0)], None)
    lv.take_ops()
    lv.written([(CHAIN[0], False)], disk_full=False)  # rank 1 failed first
    lv.written([(CHAIN[0], True)], disk_full=False)  # rank 0 wrote its file
    assert lv.take_ops().deletes == [CHAIN[0]] and not lv.disk.holds(CHAIN[0])
    lv.turn_finished("s", [(CHAIN[0], 0)], None)  # written again
    lv.take_ops()
    lv.written([(CHAIN[0], True)], disk_full=False)
    assert CHAIN[0] not in lv.disk.written  # one rank of two is not a block
    lv.written([(CHAIN[0], True)], disk_full=False)
    assert CHAIN[0] in lv.disk.written


def test_a_block_is_published_again_once_half_its_store_ttl_is_gone(tmp_path: Path, redis_server) -> None:
    """Found by review: a block published once was never sent again, so after its entry expired (or Redis evicted it,
    or the put failed) no replica could fetch it, however often the session came back."""
    lv = levels(tmp_path, url=redis_server.url)
    now = [0.0]
    lv.clock = lambda: now[0]
    blocks = [(k, i) for i, k in enumerate(CHAIN[:3])]
    lv.turn_finished("s", blocks, None)
    assert [p.shared for p in lv.take_ops().publishes] == [True] * 3
    now[0] += lv.cfg.kv_ttl_s / 4
    lv.turn_finished("s", blocks, None)
    assert not any(p.shared for p in lv.take_ops().publishes)  # fresh in the store: not sent twice
    now[0] += lv.cfg.kv_ttl_s / 2
    lv.turn_finished("s", blocks, None)
    assert [p.shared for p in lv.take_ops().publishes] == [True] * 3



@pytest.mark.parametrize("tier_full", [True, False])
def test_a_fetch_keeps_the_host_run_it_extends_even_when_only_other_sessions_own_it(tmp_path: Path, tier_full) -> None:
    """Found by review: the arrival admitted only the blocks past the run the host tier holds, so when that run was
    only another session's (a shared system prompt), the room made for the fetch evicted it, as could a demotion while
    the request waited: the fetched blocks then extended nothing."""
    chain = [bytes([i]) * 32 for i in range(10)]
    lv, h = levels(tmp_path), host(8 if tier_full else 10)
    assert lv.disk is not None
    lv.disk.load_index(chain[4:])  # the disk holds x's own history k4..k9
    h.admit("y", chain[:4])  # y holds the shared prefix k0..k3 in the host tier
    if tier_full:
        h.admit("z", [bytes([100 + i]) * 32 for i in range(4)])
    fetched = 4 if tier_full else 6  # z made room for k4..k7; or there was room for all
    assert lv.promote("x", chain, 0, 10, h) == fetched
    h.demote("w", [(bytes([200 + i]) * 32, i) for i in range(4)])  # pressure while x's request waits
    for f in lv.take_ops().fetches:
        h.landed(f.slot, f.key, ok=True)
    assert len(h.match(chain, 0, 10)) == 4 + fetched and h.blocks_of("x") == 4 + fetched
