"""The FP8 tier's worker-side bytes on real KV-shaped tensors: round trip, checksums, FP8 caches stored as they are."""

from __future__ import annotations

import pytest
import torch

from kvsched.adapters.vllm.fp8_tier_store import TierLayoutError, TierStore, block_bytes, block_views

BLOCKS, HEADS, N, C = 12, 2, 32, 128


def caches(dtype=torch.bfloat16, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.randn(BLOCKS, HEADS, N, C, generator=g, dtype=torch.float32)
        out[f"layer.{i}"] = t.to(dtype) if dtype.is_floating_point and dtype.itemsize > 1 else \
            (t * 20).clamp(-100, 100).to(torch.int8).view(torch.uint8)
    return out


def test_store_then_load_restores_every_layer_within_the_e4m3_bound():
    kv = caches()
    views = block_views(kv, BLOCKS)
    store = TierStore(views, num_slots=5)
    original = {k: v.clone() for k, v in kv.items()}
    store.store([3, 7, 1], [4, 0, 2])
    for v in kv.values():
        v.zero_()  # the blocks are reused by other requests
    assert store.load([0, 4], [9, 10]) == []
    for name, v in kv.items():
        for src, dst in ((7, 9), (3, 10)):
            x, y = original[name][src].float(), v[dst].float()
            rel = float((x - y).norm() / x.norm())
            assert rel < 0.07, (name, rel)
            assert not torch.equal(v[dst], torch.zeros_like(v[dst]))
        assert torch.count_nonzero(v[:9]) == 0  # nothing else written
    assert store.relative_rms_error is not None and 0 < store.relative_rms_error < 0.07


def test_a_partial_last_block_is_stored_whole_and_garbage_cannot_poison_its_scale():
    """A session's last block holds KV in some positions and stale memory in the others; where they sit is the
    backend's layout, so the block is stored whole. Never-written memory may hold NaN or inf: zeroed in the copy, so
    the scale of the (block, head) stays set by real values and every finite element comes back within the bound."""
    kv = caches()
    for v in kv.values():
        v[5, :, 10, :3] = float("nan")
        v[5, :, 11, :3] = float("inf")
    original = {k: v.clone() for k, v in kv.items()}
    store = TierStore(block_views(kv, BLOCKS), num_slots=2)
    store.store([5, 6], [0, 1], [10, 0])
    assert all(torch.equal(v.view(torch.int16), original[k].view(torch.int16)) for k, v in kv.items())  # pool untouched
    for v in kv.values():
        v.fill_(3.0)
    assert store.load([0, 1], [2, 3]) == []
    for name, v in kv.items():
        x, y = original[name][5].float(), v[2].float()
        finite = torch.isfinite(x)
        assert torch.count_nonzero(~finite) == 2 * HEADS * 3 and torch.all(y[~finite] == 0), name
        assert torch.isfinite(y).all()
        assert float((x[finite] - y[finite]).norm() / x[finite].norm()) < 0.07, name
        full = original[name][6].float()
        assert float((full - v[3].float()).norm() / full.norm()) < 0.07  # a whole block in the same call is whole


def test_a_corrupt_slot_fails_its_checksum_and_is_not_written():
    kv = caches(layers=2)
    store = TierStore(block_views(kv, BLOCKS), num_slots=4)
    store.store([1, 2], [0, 1])
    store.q[1][1, 0, 0, 0] ^= 0x5A  # one byte of layer 1, slot 1
    before = kv["layer.0"][5].clone()
    failed = store.load([0, 1], [4, 5])
    assert failed == [5]
    assert torch.equal(kv["layer.0"][5], before)  # the failed slot wrote nothing
    assert store.counters["checksum_failures"] == 1 and store.counters["loaded_blocks"] == 1


def test_an_invalidated_slot_is_never_read():
    kv = caches(layers=1)
    store = TierStore(block_views(kv, BLOCKS), num_slots=2)
    store.store([1], [0])
    store.invalidate([0])
    assert store.load([0], [3]) == [3]


def test_an_fp8_cache_is_copied_as_is_without_scales():
    kv = caches(dtype=torch.uint8)
    views = block_views(kv, BLOCKS)
    assert block_bytes(views) == 3 * HEADS * N * C  # one byte per element, no scales
    store = TierStore(views, num_slots=3)
    original = {k: v.clone() for k, v in kv.items()}
    store.store([2, 5], [1, 2])
    assert store.load([2, 1], [8, 9]) == []
    for name, v in kv.items():
        assert torch.equal(v[8], original[name][5]) and torch.equal(v[9], original[name][2])  # bit-exact
    assert store.relative_rms_error is None


def test_bf16_block_bytes_count_fp8_pages_and_scales():
    views = block_views(caches(layers=2), BLOCKS)
    assert block_bytes(views) == 2 * HEADS * (N * C + 4)


@pytest.mark.parametrize("bad", [
    {"l": torch.zeros(BLOCKS, HEADS, N)},  # 3-D
    {"l": torch.zeros(BLOCKS + 1, HEADS, N, C)},  # wrong block count
    {"l": torch.zeros(BLOCKS, HEADS, N, C, dtype=torch.int32)},  # dtype
    {"a": torch.zeros(BLOCKS, HEADS, N, C), "b": torch.zeros(BLOCKS, HEADS, N, 64)},  # mixed page shapes
    {},
])
def test_unsupported_layouts_are_typed_errors(bad):
    with pytest.raises(TierLayoutError):
        block_views(bad, BLOCKS)
