"""The levels' fetches on the worker, off the engine step (tier_levels_worker): against a slow in-memory store whose
reads block until the test lets them go, the step returns while the read is under way, the slot fails its checksum
until its block is checked and filled, reads come in chunks of at most KVSCHED_TIER_FETCH_MB, a bad frame is never
served, and a shutdown stops fetches from writing slots. No test waits on a timer: the store's gate orders events
(each `wait` has a generous bound only so that a bug fails the test instead of hanging it)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from kvsched.adapters.vllm import tier_blob
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_levels import DISK, SHARED, SHARED_PUT, Fetch, LevelOps, Publish, Spill
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.core.shared_state import block_key
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of

IDENT = "cd" * 16
KEYS = [bytes([i]) * 32 for i in range(8)]
BOUND_S = 60.0  # never reached unless the code under test hangs


class SlowStore:
    """An in-memory shared store whose MGET blocks until `gate` is set; records each MGET's size."""

    up = True

    def __init__(self, frames: dict[str, bytes] | None = None) -> None:
        self.frames = dict(frames or {})
        self.gate = threading.Event()
        self.reading = threading.Event()
        self.mgets: list[int] = []

    def get_state(self, key: str) -> None:  # no session metadata
        return None

    def get_states(self, keys: list[str]) -> list[None]:
        return [None] * len(keys)

    def stats(self) -> dict[str, float]:
        return {}

    def has_blocks(self, names: list[str]) -> list[bool]:
        return [n in self.frames for n in names]

    def get_blocks(self, names: list[str]) -> list[bytes | None]:
        self.mgets.append(len(names))
        self.reading.set()
        assert self.gate.wait(BOUND_S), "the test never opened the gate"
        return [self.frames.get(n) for n in names]


def frames_of(kv: dict[str, torch.Tensor], keys: list[bytes]) -> tuple[dict[str, bytes], list[bytes]]:
    """Frames of pool blocks 0.. (as another replica published them) under `keys`, and their payloads."""
    src = TierStore(views_of(kv), "quantize")
    src.store(list(range(len(keys))), list(range(len(keys))))
    payloads = [src.slot_payload(i) for i in range(len(keys))]
    return ({block_key(IDENT, k, 0): tier_blob.encode(IDENT, 0, k, p) for k, p in zip(keys, payloads, strict=True)},
            payloads)


def worker(store: SlowStore | None, fetch_mb: float = 64.0, disk: Path | None = None) -> TierLevelsWorker:
    cfg = LevelsConfig(disk_dir=str(disk) if disk else None, fetch_mb=fetch_mb)
    w = TierLevelsWorker(cfg, IDENT, {"model": "t"}, 0, 1, TierStore(views_of(caches(seed=3)), "quantize"))
    w.shared = store
    return w


def landed(w: TierLevelsWorker) -> list[tuple[bytes, int, bool]]:
    from kvsched.adapters.vllm.tier_meta import TierWorkerMeta

    meta = TierWorkerMeta()
    w.fill(meta)
    return meta.fetch_landed


def test_the_step_returns_while_the_store_is_read_and_the_slots_fill_after() -> None:
    kv = caches(seed=1)
    frames, payloads = frames_of(kv, KEYS[:3])
    store = SlowStore(frames)
    w = worker(store)
    w.tier.store([5], [0])  # slot 0 held another block before: it must not be served as this one meanwhile
    w.start_fetch(LevelOps(fetches=[Fetch(k, i, SHARED) for i, k in enumerate(KEYS[:3])]))
    assert store.reading.wait(BOUND_S)  # the MGET is under way on the fetch thread, and the step has returned
    assert not store.gate.is_set() and landed(w) == []  # nothing landed: the scheduler keeps the request waiting
    assert w.tier.load([0, 1, 2], [9, 10, 11]) == [9, 10, 11]  # a restore read now would recompute, never serve
    store.gate.set()
    assert w.fetcher.flush(BOUND_S)
    assert landed(w) == [(k, i, True) for i, k in enumerate(KEYS[:3])]
    assert [w.tier.slot_payload(i) for i in range(3)] == payloads  # exactly the published blocks


def test_reads_come_in_chunks_of_at_most_the_fetch_setting_disk_first(tmp_path: Path) -> None:
    kv = caches(seed=2)
    frames, _ = frames_of(kv, KEYS[:5])
    store = SlowStore(frames)
    store.gate.set()
    frame = tier_blob.framed_len(32, TierStore(views_of(kv), "quantize").payload_len)
    w = worker(store, fetch_mb=2.5 * frame / 2**20, disk=tmp_path)  # two frames fit, three do not
    assert w.files is not None
    w.files.write(KEYS[7], tier_blob.encode(IDENT, 0, KEYS[7], frames_of(kv, [KEYS[7]])[1][0]))
    order: list[str] = []
    read = w.files.read
    w.files.read = lambda key: order.append("disk") or read(key)
    get = store.get_blocks
    store.get_blocks = lambda names: order.append("shared") or get(names)
    w.start_fetch(LevelOps(fetches=[Fetch(k, i, SHARED) for i, k in enumerate(KEYS[:5])] + [Fetch(KEYS[7], 7, DISK)]))
    assert w.fetcher.flush(BOUND_S)
    assert store.mgets == [2, 2, 1] and order == ["disk", "shared", "shared", "shared"]
    assert all(ok for _, _, ok in landed(w))
    w_big = worker(store, fetch_mb=0.001)  # less than one block: still one block at a time
    w_big.start_fetch(LevelOps(fetches=[Fetch(k, i, SHARED) for i, k in enumerate(KEYS[:2])]))
    assert w_big.fetcher.flush(BOUND_S) and store.mgets[-2:] == [1, 1]


def test_a_garbage_or_foreign_block_leaves_its_slot_failing_and_is_reported() -> None:
    kv = caches(seed=4)
    frames, payloads = frames_of(kv, KEYS[:4])
    names = [block_key(IDENT, k, 0) for k in KEYS[:4]]
    flipped = bytearray(frames[names[1]])
    flipped[-3] ^= 0x10
    frames[names[1]] = bytes(flipped)  # a flipped payload byte: CRC mismatch
    frames[names[2]] = frames[names[3]]  # another block's frame under this key
    del frames[names[3]]  # expired
    store = SlowStore(frames)
    store.gate.set()
    w = worker(store)
    w.start_fetch(LevelOps(fetches=[Fetch(k, 10 + i, SHARED) for i, k in enumerate(KEYS[:4])]))
    assert w.fetcher.flush(BOUND_S)
    _, _, failures = w.report()
    assert sorted(failures) == sorted((k, SHARED) for k in KEYS[1:4])
    assert landed(w) == [(KEYS[0], 10, True), (KEYS[1], 11, False), (KEYS[2], 12, False), (KEYS[3], 13, False)]
    assert w.tier.load([10, 11, 12, 13], [0, 1, 2, 3]) == [1, 2, 3]  # recomputed, never served
    assert w.tier.slot_payload(10) == payloads[0]


def test_a_store_that_raises_or_a_full_queue_lands_the_blocks_unfilled() -> None:
    store = SlowStore()
    store.get_blocks = lambda names: (_ for _ in ()).throw(ConnectionError("reset by peer"))
    w = worker(store)
    w.start_fetch(LevelOps(fetches=[Fetch(KEYS[0], 0, SHARED)]))
    assert w.fetcher.flush(BOUND_S) and landed(w) == [(KEYS[0], 0, False)]
    w.fetcher.submit = lambda job: False  # the queue is full: the chunk is dropped, reported at once
    w.start_fetch(LevelOps(fetches=[Fetch(KEYS[1], 1, SHARED)]))
    assert landed(w) == [(KEYS[1], 1, False)] and w.tier.load([1], [4]) == [4]


def test_after_shutdown_no_fetch_writes_a_slot() -> None:
    kv = caches(seed=5)
    frames, _ = frames_of(kv, KEYS[:2])
    store = SlowStore(frames)
    w = worker(store, fetch_mb=1e-6)  # one block per chunk: the second is queued behind the first
    w.start_fetch(LevelOps(fetches=[Fetch(k, i, SHARED) for i, k in enumerate(KEYS[:2])]))
    assert store.reading.wait(BOUND_S)
    w.close()  # the engine shuts down with the first chunk's MGET under way and the second queued
    store.gate.set()
    assert w.fetcher.flush(BOUND_S)
    assert landed(w) == [(KEYS[0], 0, False), (KEYS[1], 1, False)] and store.mgets == [1]
    assert w.tier.load([0, 1], [0, 1]) == [0, 1]  # neither slot was written


def test_a_publish_and_a_fetch_of_one_step_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """The writer and the fetch thread are separate: a slow fetch holds no write back (and the reverse)."""
    store = SlowStore()
    w = worker(store, disk=tmp_path)
    w.before_stores(LevelOps(publishes=[Publish(KEYS[6], 3, True, False)]))
    w.start_fetch(LevelOps(fetches=[Fetch(KEYS[0], 0, SHARED)]))
    assert store.reading.wait(BOUND_S)
    assert w.writer.flush(BOUND_S) and w.report()[0] == [(KEYS[6], True)]  # written while the fetch still reads
    store.gate.set()
    assert w.fetcher.flush(BOUND_S) and landed(w) == [(KEYS[0], 0, False)]  # (not in the store: a miss)


def test_a_copy_that_raises_in_the_step_fails_its_writes_never_the_step(tmp_path: Path, caplog) -> None:
    """Found by review: the step's copies for the writes behind (a spill's slot, a publish's snapshot) were unguarded,
    unlike the tier's stores: a pinned host buffer that could not be allocated took the worker down. Now their writes
    are reported failed (the scheduler's books wait for each), counted and logged once; the step goes on."""
    store = SlowStore()
    store.gate.set()
    w = worker(store, disk=tmp_path)

    def oom(*args: object) -> None:
        raise RuntimeError("CUDA error: out of memory (pinned staging buffer)")

    w.tier.snapshot = oom
    w.tier.slot_payload = oom
    for _ in range(2):
        w.before_stores(LevelOps(spills=[Spill(KEYS[0], 5)], publishes=[Publish(KEYS[1], 3, True, True),
                                                                         Publish(KEYS[2], 4, False, True)]))
    done, _, failures = w.report()
    assert sorted(done) == sorted([(KEYS[0], False), (KEYS[1], False)] * 2)
    assert sorted(failures) == sorted([(KEYS[1], SHARED_PUT), (KEYS[2], SHARED_PUT)] * 2)
    assert w.counters["copy_failures"] == 4 and caplog.text.count("to write behind failed") == 1
    w.start_fetch(LevelOps(fetches=[Fetch(KEYS[3], 0, SHARED)]))  # the rest of the step runs as ever
    assert w.fetcher.flush(BOUND_S) and landed(w) == [(KEYS[3], 0, False)]
