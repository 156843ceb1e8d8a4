"""The FP8 tier on CUDA caches laid out by vLLM's own allocator: quantized on the device (Triton, the dispatch layer's
CUDA default), copied to pinned host slots on a side stream, sealed once the copy's event completed, restored through
a staging copy and the Triton dequantize-scatter, each layer fenced before its attention. The store before this change
failed here: it filled slots with `index_copy_` of CUDA rows into host tensors, took `.numpy()` of CUDA tensors for
its CRCs (TypeError: can't convert cuda:0 device type tensor to numpy) and indexed with CPU ids."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from kvsched.adapters.vllm.tier_link import CudaLink  # noqa: E402
from tests.adapters.vllm.test_tier_layout import NUM_BLOCKS, round_trip  # noqa: E402
from tests.adapters.vllm.tier_engine_caches import BACKEND_SPECS, engine_caches  # noqa: E402

GPU_BACKENDS = ("flash_attn", "flashinfer", "triton_attn", "fp8_cache", "triton_int8_per_token_head", "mla_fp8")


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda lay: lay.name)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_round_trip_on_a_cuda_cache_of_every_backend_layout(backend, layout):
    config, caches = engine_caches(BACKEND_SPECS[backend], layout, NUM_BLOCKS, device="cuda")
    link = CudaLink(torch.device("cuda"))
    store = round_trip(config, caches, link)
    for chunk in store.slots.chunks.values():
        assert all(q.is_pinned() for q, _ in chunk)  # the end of an asynchronous device copy
        # one pinned allocation per chunk, a power of two (what torch's pinned allocator takes): counted as taken
        storages = {t.untyped_storage().data_ptr() for q, s in chunk for t in (q, s) if t is not None}
        nbytes = chunk[0][0].untyped_storage().nbytes()
        assert len(storages) == 1 and nbytes & (nbytes - 1) == 0
        assert store.slots.allocated_bytes == nbytes * len(store.slots.chunks)
    assert store.pending == [] and all(c >= 0 for c in store.crc.values())


def test_a_kernel_block_split_on_cuda():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float16)
    config, caches = engine_caches(spec, KVCacheLayout.LBNHC, NUM_BLOCKS, kernel_block_size=16, device="cuda")
    round_trip(config, caches, CudaLink(torch.device("cuda")))


def test_the_compute_stream_waits_for_a_store_before_reusing_its_blocks():
    """A store is read on the side stream; work enqueued on the compute stream afterwards (the next step overwriting
    the very blocks) must not overtake it. The compute stream is busy when the store is enqueued (a step in flight):
    the side stream's reads and the overwrite become ready together, and only the store's fence orders them (found by
    review: with both streams idle the side stream ran first anyway, so the test passed without the fence)."""
    from kvsched.adapters.vllm.fp8_tier_store import TierStore
    from kvsched.adapters.vllm.tier_layout import geometry_of, layer_views
    from tests.adapters.vllm.tier_engine_caches import fill

    config, caches = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.LBNHC, NUM_BLOCKS, device="cuda")
    fill(caches)
    original = {n: t[3].clone() for n, t in caches.items()}
    store = TierStore(layer_views(caches, geometry_of(config, None), NUM_BLOCKS), "quantize",
                      CudaLink(torch.device("cuda")))
    store.store([4], [1])  # the kernels are compiled before the timed part
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the step in flight (~0.1 s)
    store.store([3], [0])
    for t in caches.values():
        t[3].fill_(1000.0)  # enqueued on the compute stream right after the store
    assert store.load([0], [5]) == []
    store.fence_all()
    torch.cuda.synchronize()
    for name, t in caches.items():
        x, y = original[name].float(), t[5].float()
        assert float((x - y).norm() / x.norm()) < 0.07, name


def test_the_forward_reads_restored_blocks_only_once_their_copies_landed():
    """`fence_all` makes the compute stream wait for every restore (the forward, a FULL CUDA graph included, reads the
    blocks with no per-layer wait). Read here on the compute stream right after the fence, with no host wait between:
    without the fence the read runs as soon as the compute stream's earlier work ends, beside the side stream's copies
    it is not ordered after, and finds the zeroed block. The same ordering on the CPU: test_fp8_tier_store.py
    `test_every_restore_of_a_step_is_fenced_before_the_forward` (the connector fences each restore of a step)."""
    store, caches = _store_on()
    original = {n: t[2].clone() for n, t in caches.items()}
    store.store([2], [0])
    assert store.load([0], [3]) == []  # the kernels are compiled before the timed part
    store.fence_all()
    torch.cuda.synchronize()
    store.seal_ready()
    for t in caches.values():
        t[6].zero_()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy: the restore's copies wait for it
    assert store.load([0], [6]) == []
    store.fence_all()
    seen = {n: t[6].clone() for n, t in caches.items()}  # the forward's read, enqueued on the compute stream
    torch.cuda.synchronize()
    for name in caches:
        assert _close(original[name][2], seen[name]), name


def _store_on(device: str = "cuda"):
    from kvsched.adapters.vllm.fp8_tier_store import TierStore
    from kvsched.adapters.vllm.tier_layout import geometry_of, layer_views
    from tests.adapters.vllm.tier_engine_caches import fill

    config, caches = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.LBNHC, NUM_BLOCKS, device=device)
    fill(caches)
    store = TierStore(layer_views(caches, geometry_of(config, None), NUM_BLOCKS), "quantize",
                      CudaLink(torch.device(device)))
    return store, caches


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return float((x.float() - y.float()).norm() / x.float().norm()) < 0.07


def test_a_store_reads_what_the_compute_stream_wrote_before_it_even_while_that_write_is_in_flight():
    """A store enqueued behind a slow write on the compute stream (the step in flight that wrote the block) must copy
    the written values. Before the fix the side stream waited on itself and copied the block's old bytes."""
    store, caches = _store_on()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy (~0.1 s) ...
    for t in caches.values():
        t[3].fill_(0.5)  # ... then writes block 3
    store.store([3], [0])
    for t in caches.values():
        t[5].zero_()
    assert store.load([0], [5]) == []
    store.fence_all()
    torch.cuda.synchronize()
    for name, t in caches.items():
        assert _close(torch.full_like(t[5], 0.5), t[5]), name


def test_a_restore_lands_after_the_compute_streams_earlier_writes_to_its_block():
    """vLLM's async scheduler plans step N+1 (a restore into a block a preemption just freed) while step N still
    writes that block on the compute stream: the restore must land after, not be overwritten by it."""
    store, caches = _store_on()
    original = {n: t[2].clone() for n, t in caches.items()}
    store.store([2], [0])
    torch.cuda.synchronize()
    store.seal_ready()
    torch.cuda._sleep(200_000_000)
    for t in caches.values():
        t[6].fill_(7.0)  # step N's late write into block 6
    assert store.load([0], [6]) == []  # step N+1's restore into block 6
    store.fence_all()
    torch.cuda.synchronize()
    for name, t in caches.items():
        assert _close(original[name][2], t[6]), name


def test_stores_and_restores_never_make_the_host_wait_for_the_device():
    """Block ids are checked on the host and copied over from pinned memory: a store or a restore per step must not
    synchronize (before: each layer's id check read min, max and unique of device ids, waiting for the forward in
    flight, which cancels async scheduling's overlap)."""
    store, caches = _store_on()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        store.store([1, 2], [0, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    store.seal_ready()  # the copies completed: a load of their slots has nothing to wait for
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert store.load([0, 1], [7, 8]) == []
        store.fence_all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLNHC],
                         ids=lambda lay: lay.name)
def test_a_float8_typed_cuda_cache_round_trips_byte_for_byte(layout):
    """Pages of a cache typed float8_e4m3fn move as bytes (torch's CUDA index_copy_ has no float8 kernel in several
    versions; the CPU's has none): tests/adapters/vllm/test_gpu_layouts_fp8dtype.py on the device."""
    from tests.adapters.vllm.test_gpu_layouts_fp8dtype import byte_round_trip

    byte_round_trip(layout, "cuda", CudaLink(torch.device("cuda")))


def _staged_store(blocks_per_group: int):
    from kvsched.adapters.vllm.fp8_tier_store import TierStore
    from kvsched.adapters.vllm.tier_layout import geometry_of, layer_views
    from kvsched.adapters.vllm.tier_link import StagePool, stage_plan
    from tests.adapters.vllm.tier_engine_caches import fill

    config, caches = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.LBNHC, NUM_BLOCKS, device="cuda")
    fill(caches)
    geometry = geometry_of(config, None)
    pool = StagePool(stage_plan(4 << 20), pin=True, allocate=True,
                     device_bytes=blocks_per_group * geometry.block_bytes)
    store = TierStore(layer_views(caches, geometry, NUM_BLOCKS), "quantize", CudaLink(torch.device("cuda")),
                      stage=pool)
    return store, caches, pool, geometry.block_bytes


def test_staging_is_one_pinned_allocation_and_stores_and_restores_above_two_groups_round_trip():
    """A store and a restore of 5 groups each go through the two store and the two restore buffers of one pinned
    allocation (counted in the tier's budget), waiting for a buffer's earlier copy where both are in flight."""
    store, caches, pool, _ = _staged_store(1)
    assert store.group_blocks == 1
    original = {n: t[:5].clone() for n, t in caches.items()}
    store.store([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert pool.arena is not None and pool.arena.is_pinned() and pool.allocated_bytes == pool.plan.host_bytes
    for t in caches.values():
        t[5:10].zero_()
    assert store.load([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]) == []
    store.fence_all()
    torch.cuda.synchronize()
    for name, t in caches.items():
        for i in range(5):
            assert _close(original[name][i], t[5 + i]), (name, i)
    assert pool.allocated_bytes == pool.plan.host_bytes


def test_a_large_stores_device_buffers_stay_within_a_group():
    """The device memory a store takes beyond vLLM's profile: one group's quantized pages at a time, not the whole
    store's (before: up to 256 MiB per worker, whatever the free memory)."""
    store, caches, _, block = _staged_store(2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    store.store(list(range(8)), list(range(8)))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 2 * block + (1 << 20)  # + ids and the error sample


def test_the_default_device_stage_is_a_share_of_the_free_memory():
    from kvsched.adapters.vllm.tier_link import DEFAULT_STAGE_BYTES, DEVICE_FREE_SHARE, device_stage_bytes, stage_plan

    plan = stage_plan(DEFAULT_STAGE_BYTES)
    got, how = device_stage_bytes(torch.device("cuda"), plan, None)
    free, _ = torch.cuda.mem_get_info()
    assert 0 < got <= min(plan.buffer_bytes, free // DEVICE_FREE_SHARE + (64 << 20)) and "free" in how


def _pieced_store(layers: int = 4):
    """Pinned staging buffers that hold one layer's block but not a slot (gpustage2: copied in pieces, not grown)."""
    from kvsched.adapters.vllm.fp8_tier_store import TierStore
    from kvsched.adapters.vllm.tier_layout import geometry_of, layer_views
    from kvsched.adapters.vllm.tier_link import StagePool, stage_plan
    from tests.adapters.vllm.tier_engine_caches import fill

    config, caches = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.LBNHC, NUM_BLOCKS, layers=layers,
                                   device="cuda")
    fill(caches)
    geometry = geometry_of(config, None)
    buffer = 1 << (geometry.block_bytes // layers + 64 - 1).bit_length()  # a layer's block and its scales' alignment
    pool = StagePool(stage_plan(4 * buffer), pin=True, allocate=True)
    store = TierStore(layer_views(caches, geometry, NUM_BLOCKS), "quantize", CudaLink(torch.device("cuda")),
                      stage=pool)
    return store, caches, pool, 4 * buffer


def test_a_slot_larger_than_a_pinned_buffer_round_trips_in_pieces_and_the_buffers_stay_as_counted():
    store, caches, pool, setting = _pieced_store()
    assert store.stage is pool and store.group_blocks == 1 and len(store.plan.spans) > 1
    original = {n: t[:4].clone() for n, t in caches.items()}
    store.store([0, 1, 2, 3], [0, 1, 2, 3])  # 4 blocks x several pieces through 2 store buffers
    for t in caches.values():
        t[4:8].zero_()
    assert store.load([0, 1, 2, 3], [4, 5, 6, 7]) == []
    store.fence_all()
    torch.cuda.synchronize()
    for name, t in caches.items():
        for i in range(4):
            assert _close(original[name][i], t[4 + i]), (name, i)
    assert pool.arena is not None and pool.arena.is_pinned()
    assert pool.allocated_bytes == pool.plan.host_bytes == setting == pool.arena.untyped_storage().nbytes()
    snap = store.snapshot([0, 1])
    assert [snap.payload(i) for i in range(2)] == [store.slot_payload(0), store.slot_payload(1)]


def test_a_snapshot_pins_nothing_beyond_the_staging_buffers():
    """gpustage2: a snapshot (the disk and shared levels' publishes) took pinned host tensors of its own per group,
    outside the tier's budget; now it goes through the store buffers and is copied out to pageable memory."""
    store, caches, pool, _ = _staged_store(1)
    store.store([0], [0])  # the slots' first chunk and the staging arena are taken here, before the measure
    torch.cuda.synchronize()
    store.seal_ready()
    torch.cuda.reset_peak_host_memory_stats()
    base = torch.cuda.host_memory_stats()["active_bytes.current"]
    snap = store.snapshot(list(range(NUM_BLOCKS)))  # NUM_BLOCKS groups through 2 store buffers
    payloads = [snap.payload(i) for i in range(NUM_BLOCKS)]
    grown = torch.cuda.host_memory_stats()["active_bytes.peak"] - base
    assert grown <= 16 << 10, grown  # the groups' block ids; before, every group's pages: NUM_BLOCKS slots' bytes
    torch.cuda.synchronize()
    store.seal_ready()
    assert store.pending == [] and not any(q.is_pinned() for p in snap.pieces for q, _ in p.staged)
    store.store(list(range(NUM_BLOCKS)), list(range(NUM_BLOCKS)))
    torch.cuda.synchronize()
    store.seal_ready()
    assert payloads == [store.slot_payload(i) for i in range(NUM_BLOCKS)]
    assert pool.allocated_bytes == pool.plan.host_bytes
