"""The disk and shared levels' worker side on real KV-shaped tensors, real files and a real redis-server: framed
blocks, atomic files, restores that match a host-tier restore, torn/corrupted/foreign blocks never served, a full
disk, and the store going away and coming back."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from kvsched.adapters.vllm import tier_blob
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_levels import DISK, SHARED, Fetch, LevelOps, Publish, Spill
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.core.shared_state import block_key
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of

IDENT = "ab" * 16
KEYS = [bytes([i]) * 32 for i in range(6)]


def worker(kv, tmp_path: Path, url: str | None = None, disk: Path | None = None) -> TierLevelsWorker:
    cfg = LevelsConfig(disk_dir=str(disk or tmp_path), store_url=url)
    return TierLevelsWorker(cfg, IDENT, {"model": "test"}, 0, 1, TierStore(views_of(kv), "quantize"))


def run(w: TierLevelsWorker, ops: LevelOps) -> None:
    """One step's level work, and (unlike in the engine) waiting for the background writes and fetches."""
    w.before_stores(ops)
    w.writer.flush()
    w.start_fetch(ops)
    w.fetcher.flush()


def test_a_frame_is_served_only_for_its_own_model_rank_key_and_intact_bytes() -> None:
    payload = os.urandom(1000)
    blob = tier_blob.encode(IDENT, 0, KEYS[0], payload)
    assert tier_blob.decode(blob, IDENT, 0, KEYS[0], 1000) == payload
    cases = {"another model": ("cd" * 16, 0, KEYS[0], blob), "rank": (IDENT, 1, KEYS[0], blob),
             "another block": (IDENT, 0, KEYS[1], blob), "torn": (IDENT, 0, KEYS[0], blob[:-7]),
             "truncated": (IDENT, 0, KEYS[0], blob[:20]),
             "checksum": (IDENT, 0, KEYS[0], blob[:-1] + bytes([blob[-1] ^ 1]))}
    for why, (ident, rank, key, b) in cases.items():
        with pytest.raises(tier_blob.BlobError, match=why):
            tier_blob.decode(b, ident, rank, key, 1000)
    with pytest.raises(tier_blob.BlobError, match="expected 999"):
        tier_blob.decode(blob, IDENT, 0, KEYS[0], 999)


def test_disk_files_are_atomic_and_the_index_needs_every_rank(tmp_path: Path) -> None:
    r0 = DiskFiles(tmp_path, IDENT, {"model": "m"}, rank=0, world_size=2)
    r1 = DiskFiles(tmp_path, IDENT, {"model": "m"}, rank=1, world_size=2)
    r0.write(KEYS[0], b"zero")
    r1.write(KEYS[0], b"one")
    r0.write(KEYS[1], b"only rank 0")
    stale = r0.path(KEYS[2]).with_name(".leftover.tmp")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    assert r0.scan() == [KEYS[0]]  # KEYS[1] lacks rank 1: not restorable
    assert not stale.exists()  # a crash mid-write leaves nothing behind after the next start
    assert r1.read(KEYS[0]) == b"one" and r0.read(KEYS[3]) is None
    assert (tmp_path / IDENT / "IDENTITY.json").read_text().count('"m"') == 1


def test_published_blocks_come_back_through_the_host_tier_as_a_host_restore_would(tmp_path: Path) -> None:
    kv = caches()
    w = worker(kv, tmp_path)
    original = {k: v.clone() for k, v in kv.items()}
    run(w, LevelOps(publishes=[Publish(KEYS[0], 3, True, False), Publish(KEYS[1], 7, True, False)]))
    assert w.report()[0] == [(KEYS[0], True), (KEYS[1], True)]
    # a restarted engine: a fresh store, the same directory
    kv2 = {k: torch.zeros_like(v) for k, v in kv.items()}
    w2 = worker(kv2, tmp_path)
    assert w2.files is not None and w2.files.scan() == KEYS[:2]
    run(w2, LevelOps(fetches=[Fetch(KEYS[0], 5, DISK), Fetch(KEYS[1], 6, DISK)]))
    assert w2.tier.load([5, 6], [0, 1]) == []
    ref_kv = {k: v.clone() for k, v in original.items()}
    ref = TierStore(views_of(ref_kv), "quantize")
    ref.store([3, 7], [0, 1])
    assert ref.load([0, 1], [0, 1]) == []
    for name in kv:  # the same bytes as a host-tier demotion and restore of those blocks
        assert torch.equal(ref_kv[name][:2], kv2[name][:2])
        rel = float((original[name][3].float() - kv2[name][0].float()).norm() / original[name][3].float().norm())
        assert rel < 0.07


def test_a_torn_or_corrupted_file_is_recomputed_never_served(tmp_path: Path) -> None:
    kv = caches()
    w = worker(kv, tmp_path)
    run(w, LevelOps(publishes=[Publish(k, i, True, False) for i, k in enumerate(KEYS[:3])]))
    files = w.files
    assert files is not None
    files.path(KEYS[0]).write_bytes(files.path(KEYS[0]).read_bytes()[:-100])  # torn
    data = bytearray(files.path(KEYS[1]).read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the payload
    files.path(KEYS[1]).write_bytes(bytes(data))
    files.path(KEYS[2]).unlink()  # gone
    before = {k: v.clone() for k, v in kv.items()}
    run(w, LevelOps(fetches=[Fetch(k, i, DISK) for i, k in enumerate(KEYS[:3])]))
    assert sorted(w.report()[2]) == sorted((k, DISK) for k in KEYS[:3])
    assert w.tier.load([0, 1, 2], [9, 10, 11]) == [9, 10, 11]  # every slot fails its checksum: vLLM recomputes
    for name in kv:
        assert torch.equal(kv[name], before[name])  # nothing written into the pool


def test_another_models_files_are_never_served(tmp_path: Path) -> None:
    kv = caches()
    run(worker(kv, tmp_path), LevelOps(publishes=[Publish(KEYS[0], 0, True, False)]))
    other = TierLevelsWorker(LevelsConfig(disk_dir=str(tmp_path)), "cd" * 16, {}, 0, 1,
                             TierStore(views_of(caches()), "quantize"))
    assert other.files is not None and other.files.scan() == []  # its own subdirectory
    src = worker(kv, tmp_path).files.path(KEYS[0])  # even a file copied across by hand
    dst = other.files.path(KEYS[0])
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(src.read_bytes())
    run(other, LevelOps(fetches=[Fetch(KEYS[0], 0, DISK)]))
    assert other.report()[2] == [(KEYS[0], DISK)]


def test_a_spill_keeps_a_host_slot_and_an_unverified_slot_is_not_spilled(tmp_path: Path) -> None:
    kv = caches()
    w = worker(kv, tmp_path)
    w.tier.store([2, 4], [0, 1])
    w.tier.invalidate([1])
    run(w, LevelOps(spills=[Spill(KEYS[0], 0), Spill(KEYS[1], 1)]))
    done = dict(w.report()[0])
    assert done == {KEYS[0]: True, KEYS[1]: False}
    assert w.files is not None and w.files.read(KEYS[1]) is None


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KiB tmpfs: a disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_writes_cleanly_and_says_so(tmp_path: Path, tiny_disk: Path) -> None:
    kv = caches()  # 3 layers: ~25 KiB per framed block, so the third write finds no room
    w = worker(kv, tmp_path, disk=tiny_disk)
    run(w, LevelOps(publishes=[Publish(k, i, True, False) for i, k in enumerate(KEYS)]))
    done, full, _ = w.report()
    assert full and any(ok for _, ok in done) and not all(ok for _, ok in done)
    assert w.counters["disk_write_failures"] >= 1
    assert not list(tiny_disk.rglob("*.tmp"))  # no half-written files left
    ok = [k for k, good in done if good]
    run(w, LevelOps(fetches=[Fetch(ok[0], 0, DISK)]))  # what did fit is whole
    assert w.report()[2] == [] and w.tier.load([0], [11]) == []


# ---- the shared level on a real redis-server ---------------------------------------------------------------------
def test_blocks_published_by_one_replica_restore_on_another(tmp_path: Path, redis_server) -> None:
    kv = caches(seed=1)
    a = worker(kv, tmp_path / "a", url=redis_server.url)
    run(a, LevelOps(publishes=[Publish(KEYS[0], 3, False, True), Publish(KEYS[1], 5, False, True)]))
    assert a.counters["shared_published_blocks"] == 2
    kv_b = {k: torch.zeros_like(v) for k, v in kv.items()}
    b = worker(kv_b, tmp_path / "b", url=redis_server.url)
    run(b, LevelOps(fetches=[Fetch(KEYS[0], 0, SHARED), Fetch(KEYS[1], 1, SHARED), Fetch(KEYS[2], 2, SHARED)]))
    assert b.report()[2] == [(KEYS[2], SHARED)]  # never published: a miss, recomputed
    assert b.tier.load([0, 1, 2], [0, 1, 2]) == [2]
    for name in kv:
        rel = float((kv[name][3].float() - kv_b[name][0].float()).norm() / kv[name][3].float().norm())
        assert rel < 0.07
    assert b.shared.get_blocks([block_key(IDENT, KEYS[0])])[0] is not None


def test_store_down_costs_nothing_is_logged_once_and_reconnects(redis_server, caplog) -> None:
    from kvsched.adapters.store.redis_store import RedisStore
    from tests.conftest import FakeClock

    clock = FakeClock()
    store = RedisStore(redis_server.url, clock=clock)
    name = f"t/{uuid.uuid4()}"
    assert store.put_state(name, "v", ttl_s=60) and store.get_state(name) == "v"
    assert store.put_blocks({name + "/b": b"x" * 10}, ttl_s=0.05)
    redis_server.kill()
    with caplog.at_level("WARNING", logger="vllm.kvsched.store"):
        for _ in range(20):
            assert store.get_state(name) is None and store.get_blocks([name]) == [None]
            assert store.put_blocks({name: b"y"}, 60) is False and store.has_blocks([name]) == [False]
        assert store.counters["failed_calls"] == 1 and store.counters["skipped_calls"] >= 70  # backoff: no retries
        redis_server.start()
        clock.advance(0.6)
        assert store.put_state(name, "again", 60) and store.get_state(name) == "again"
    logs = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in logs) == 1 and sum("reachable again" in m for m in logs) == 1
    assert store.health.outages == 1 and store.up


def test_unreadable_files_and_an_unusable_directory_cost_a_recompute_never_a_failed_step(tmp_path: Path) -> None:
    """Found by review: any read error but "not found" (permissions, EIO, a directory in the file's place) escaped
    the worker's step, and a disk-level directory that could not be created or written stopped the engine's start."""
    from kvsched.adapters.vllm.tier_levels import TierLevels

    kv = caches()
    w = worker(kv, tmp_path)
    w.files.path(KEYS[0]).mkdir(parents=True)  # read_bytes: IsADirectoryError
    run(w, LevelOps(fetches=[Fetch(KEYS[0], 0, DISK)]))
    assert w.report()[2] == [(KEYS[0], DISK)]
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    w2 = worker(kv, tmp_path, disk=blocked)
    assert w2.files is None
    run(w2, LevelOps(publishes=[Publish(KEYS[1], 0, True, False)], fetches=[Fetch(KEYS[1], 1, DISK)]))
    done, _, failures = w2.report()
    assert done == [(KEYS[1], False)] and failures == [(KEYS[1], DISK)]  # the write fails cleanly, the read misses
    lv = TierLevels(LevelsConfig(disk_dir=str(blocked)), IDENT, {}, 1000, 1)
    assert lv.disk is None


def test_e4m3_and_e5m2_caches_never_share_an_identity(tiny_model_dir: Path) -> None:
    """Both are uint8 caches copied byte for byte: the same bytes mean other numbers (found by review: one identity,
    so one engine's disk or shared blocks were served to the other)."""
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, get_kv_quant_mode

    from kvsched.adapters.vllm.tier_layout import geometry_of

    idents = set()
    for dtype in ("fp8_e4m3", "fp8_e5m2"):
        mc = ModelConfig(model=str(tiny_model_dir), dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                         max_model_len=1024)
        vc = VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=16, cache_dtype=dtype),
                        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                                         max_model_len=1024, is_encoder_decoder=False))
        hf = mc.hf_config
        spec = FullAttentionSpec(block_size=16, num_kv_heads=hf.num_key_value_heads,
                                 head_size=hf.hidden_size // hf.num_attention_heads,
                                 dtype=kv_cache_dtype_str_to_dtype(dtype, mc), kv_quant_mode=get_kv_quant_mode(dtype))
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(hf.num_hidden_layers)]
        config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
        idents.add(tier_blob.identity_of(vc, geometry_of(config, "LBHNC", vc.parallel_config), 1)[0])
    assert len(idents) == 2


def test_a_dropped_write_job_is_reported_failed_and_a_delete_never_removes_a_rewrite(tmp_path: Path) -> None:
    """Found by review: a job the full queue dropped reported nothing (its keys stayed pending for good, using up the
    disk budget), and a step that deleted and wrote a key deleted the new file (deletes ran after the writes)."""
    kv = caches()
    w = worker(kv, tmp_path)
    submit = w.writer.submit
    run(w, LevelOps(publishes=[Publish(KEYS[2], 2, True, False)]))
    assert w.files.path(KEYS[2]).exists() and w.report()[0] == [(KEYS[2], True)]
    w.writer.submit = lambda job, nbytes=0: False  # the queue is full
    run(w, LevelOps(publishes=[Publish(KEYS[0], 0, True, False)], deletes=[KEYS[2]]))
    assert w.report()[0] == [(KEYS[0], False)]
    w.writer.submit = submit
    run(w, LevelOps())  # the delete the full queue put off runs next step
    assert not w.files.path(KEYS[2]).exists()
    run(w, LevelOps(publishes=[Publish(KEYS[3], 3, True, False)]))
    # refuses the delete only
    w.writer.submit = lambda job, nbytes=0, first=[True]: not first.pop() if first else submit(job, nbytes)
    run(w, LevelOps(deletes=[KEYS[3]], publishes=[Publish(KEYS[3], 3, True, False)]))  # deleted and written again
    w.writer.submit = submit
    run(w, LevelOps())
    assert w.files.path(KEYS[3]).exists()  # the put-off delete never removes the new file
    w.report()
    run(w, LevelOps(publishes=[Publish(KEYS[1], 1, True, False)]))
    run(w, LevelOps(deletes=[KEYS[1]], publishes=[Publish(KEYS[1], 1, True, False)]))
    assert w.files.path(KEYS[1]).exists() and w.report()[0] == [(KEYS[1], True), (KEYS[1], True)]
