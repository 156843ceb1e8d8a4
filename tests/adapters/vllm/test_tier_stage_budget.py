"""The FP8 tier pins no more host memory than its budget counts (tier_link.StagePlan, tier_pieces, tier_snapshot):
a slot larger than a staging buffer is copied in pieces of its views, never by growing the buffers past the setting;
the disk and shared levels' snapshots go through the counted store buffers and are copied out to pageable memory.
Run here on the CPU with the buffers allocated unpinned (`allocate=True`) and copies that complete later (LaterLink);
tests/gpu/test_tier_cuda.py runs the same on pinned buffers and a CUDA stream."""

from __future__ import annotations

import re

import pytest
import torch

from kvsched.adapters.vllm import tier_host
from kvsched.adapters.vllm.fp8_tier_store import UNSEALED
from kvsched.adapters.vllm.tier_config import stage_bytes_of
from kvsched.adapters.vllm.tier_layout import QUANTIZE, TierGeometry
from kvsched.adapters.vllm.tier_link import STAGE_BUFFERS, StagePool, stage_plan
from kvsched.adapters.vllm.tier_pieces import refuse_unless_fits
from kvsched.core.tier_config import TierConfigError
from tests.adapters.vllm.test_fp8_tier_store import LaterLink, caches, tier

KIB = 1 << 10
# caches(): 2 heads x 32 rows x 128 bytes a layer's block, + 8 bytes of scales: 8,200 bytes staged per layer alone
LAYER = 8200
GEOMETRY = TierGeometry(("layer.0", "layer.1", "layer.2"), 2, 32, 128, torch.bfloat16, QUANTIZE, "NHD")


def _in(t: torch.Tensor, arena: torch.Tensor) -> bool:
    lo = arena.data_ptr()
    return lo <= t.data_ptr() < lo + arena.numel()


def test_the_staging_counted_is_never_above_the_setting_whatever_the_slot():
    """Found by the gpustage stop: a slot larger than a quarter of KVSCHED_TIER_STAGE_MB rounded the buffers up to its
    power of two, so 64 KiB asked for pinned (and took off the budget) 128 KiB."""
    assert GEOMETRY.block_bytes == 3 * LAYER > 64 * KIB // 4
    for setting in (64 * KIB, 100 * KIB, 1 << 20, 128 << 20):
        assert tier_host.staging_bytes(setting, GEOMETRY, "cuda") <= setting
    assert tier_host.staging_bytes(64 * KIB, GEOMETRY, "cuda") == 64 * KIB
    assert tier_host.staging_bytes(64 * KIB, GEOMETRY, "cpu") == 0  # nothing pinned on a CPU engine


def test_a_setting_whose_buffer_holds_no_layers_block_is_refused_naming_it():
    with pytest.raises(TierConfigError, match="KVSCHED_TIER_STAGE_MB.*stage_mb.*at least 0.0625 MiB"):
        tier_host.staging_bytes(16 * KIB, GEOMETRY, "cuda")  # 4 KiB buffers, a layer's block takes 8,200 bytes
    kv = caches(layers=3)
    with pytest.raises(TierConfigError, match="KVSCHED_TIER_STAGE_MB"):  # the worker, where the buffers are allocated
        tier(kv, stage=StagePool(stage_plan(16 * KIB), pin=False, allocate=True))
    assert tier(kv, stage=StagePool(stage_plan(16 * KIB), pin=False, allocate=False)).plan.spans == (
        (0, 1), (1, 2), (2, 3))  # the CPU: the kernels' outputs are the staging, nothing allocated, a view a piece


@pytest.mark.parametrize("view_bytes", [*range(1, 5000, 7), 300, 512, 513, 3 << 20, (1 << 30) + 1])
def test_the_least_setting_a_refusal_gives_is_itself_accepted(view_bytes: int) -> None:
    """Found by review: the least setting was printed with 6 significant figures rounded to nearest, so a small
    layer's block (300 bytes: 2,048 bytes of setting, 0.001953125 MiB) was told 0.00195312 MiB, which makes 511-byte
    buffers and is refused again. Rounded up, the value given holds the block."""
    with pytest.raises(TierConfigError, match="give at least") as refused:
        refuse_unless_fits(False, 1, view_bytes, STAGE_BUFFERS)
    given = re.search(r"give at least (\S+) MiB", str(refused.value))[1]  # type: ignore[index]
    setting, _ = stage_bytes_of({"stage_mb": given}, 0)
    assert stage_plan(setting).buffer_bytes >= view_bytes
    refuse_unless_fits(view_bytes <= stage_plan(setting).buffer_bytes, stage_plan(setting).buffer_bytes, view_bytes,
                       STAGE_BUFFERS)


def test_a_slot_larger_than_a_buffer_goes_in_pieces_through_the_buffers_the_setting_made():
    kv = caches(layers=3)
    original = {k: v.clone() for k, v in kv.items()}
    pool = StagePool(stage_plan(64 * KIB), pin=False, allocate=True)  # 16 KiB buffers: a layer each, not two
    store = tier(kv, stage=pool)
    assert store.stage is pool and store.group_blocks == 1 and store.plan.spans == ((0, 1), (1, 2), (2, 3))
    store.store([0, 1, 2, 3], [3, 2, 1, 0])
    assert pool.allocated_bytes == pool.plan.host_bytes == 64 * KIB  # what the budget counted, not grown to a slot
    payloads = [store.slot_payload(s) for s in range(4)]
    for v in kv.values():
        v.zero_()
    assert store.load([3, 2, 1, 0], [8, 9, 10, 11]) == []
    for name, v in kv.items():
        for b in range(4):
            x, y = original[name][b].float(), v[8 + b].float()
            assert float((x - y).norm() / x.norm()) < 0.07, (name, b)
    whole = tier({k: t.clone() for k, t in original.items()}, stage=StagePool(stage_plan(1 << 20), False, True))
    assert whole.plan.whole
    whole.store([0, 1, 2, 3], [3, 2, 1, 0])
    assert payloads == [whole.slot_payload(s) for s in range(4)]  # the same bytes as one piece a slot
    assert pool.allocated_bytes == 64 * KIB


def test_a_pieced_slot_is_sealed_only_once_every_piece_landed_in_order():
    """The CRC covers the whole slot: its last piece's copy completing first (an event queried between two others)
    must not seal it over a slot whose other views are not written yet."""
    kv = caches(layers=3)
    link = LaterLink()
    store = tier(kv, link=link, stage=StagePool(stage_plan(64 * KIB), pin=False, allocate=True))
    store.store([4], [0])
    copies = link.events[1::2]
    assert len(copies) == 3 and copies[0].waited and not copies[1].waited  # the third piece reused the first's buffer
    assert store.crc[0] == UNSEALED and [p.last for p in store.pending] == [False, True]
    copies[2].done = True
    store.seal_ready()
    assert store.crc[0] == UNSEALED and len(store.pending) == 2  # the second piece is not in: nothing sealed
    copies[1].done = True
    store.seal_ready()
    assert store.crc[0] != UNSEALED and store.pending == [] and store.slot_payload(0) is not None


def test_a_snapshot_goes_through_the_counted_store_buffers_and_is_copied_out_of_them():
    """Found by the gpustage stop: a snapshot took host tensors of its own per group (pinned on a GPU) outside the
    tier's budget, held until the writer thread serialized them."""
    kv = caches(layers=3)
    link = LaterLink()
    pool = StagePool(stage_plan(1 << 20), pin=False, allocate=True)
    store = tier(kv, link=link, stage=pool, measure_error=False)
    snap = store.snapshot([5, 6])
    assert pool.arena is not None and pool.allocated_bytes == pool.plan.host_bytes
    (piece,) = snap.pieces
    assert piece.in_buffer and all(_in(q, pool.arena) and s is not None and _in(s, pool.arena) for q, s in piece.staged)
    assert [p.buffer for p in store.pending] == [0]  # the buffer is held until the bytes are out of it
    link.events[1].done = True
    store.seal_ready()  # the engine thread copies it out (each step), freeing the buffer
    assert store.pending == [] and not piece.in_buffer
    assert not any(_in(q, pool.arena) for q, _ in piece.staged)
    store.store([5, 6], [0, 1])
    for e in link.events:
        e.done = True
    store.seal_ready()
    assert [snap.payload(i) for i in range(2)] == [store.slot_payload(0), store.slot_payload(1)]


def test_a_pieced_snapshot_read_by_the_writer_first_copies_itself_out():
    """The writer thread may read a piece before the engine's next step: it waits for the copy and copies it out
    itself; the engine then only frees the buffer. More pieces than store buffers: the engine waits for the oldest."""
    kv = caches(layers=3)
    link = LaterLink()
    pool = StagePool(stage_plan(64 * KIB), pin=False, allocate=True)
    store = tier(kv, link=link, stage=pool, measure_error=False)
    snap = store.snapshot([7, 8])  # 2 blocks x 3 pieces through 2 store buffers
    assert len(snap.pieces) == 6 and len(store.pending) == 2 and pool.allocated_bytes == 64 * KIB
    assert sum(p.in_buffer for p in snap.pieces) == 2
    got = snap.payload(1)  # the last block's pieces: waited for and copied out here
    assert store.pending and all(not p.in_buffer for p in snap.pieces)
    store.seal_ready()
    assert store.pending == []
    for e in link.events:
        e.done = True
    store.store([7, 8], [0, 1])
    store.seal_ready()
    assert snap.payload(0) == store.slot_payload(0) and got == store.slot_payload(1)
