"""The FP8 tier takes every layer's layout from vLLM's own spec and tensors: a round trip on caches laid out by vLLM's
own allocator, for each attention backend's spec, every KVCacheLayout and a kernel block split, restores exactly the
blocks it stored (within e4m3's bound, or bit for bit when vLLM already quantized the cache) and writes nothing else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from kvsched.adapters.vllm.fp8_tier_store import TierStore  # noqa: E402
from kvsched.adapters.vllm.tier_layout import RAW, TierUnsupported, geometry_of, layer_views  # noqa: E402
from tests.adapters.vllm.tier_engine_caches import BACKEND_SPECS, engine_caches, fill  # noqa: E402

NUM_BLOCKS = 12
STORED, SLOTS, TARGETS = [3, 7, 10], [5, 0, 2], [9, 1, 4]


def manager_block(t: torch.Tensor, b: int) -> torch.Tensor:
    """Manager block b of a (possibly kernel-block-granular) layer tensor."""
    ratio = t.shape[0] // NUM_BLOCKS
    return t[b * ratio:(b + 1) * ratio]


def round_trip(config, caches, link=None) -> TierStore:
    """Store three blocks, overwrite the pool, restore them elsewhere: exactly those blocks come back (device-agnostic:
    tests/gpu runs it on CUDA caches with the CUDA link)."""
    geometry = geometry_of(config, config.kv_cache_layout)
    fill(caches)
    original = {name: t.clone() for name, t in caches.items()}
    store = TierStore(layer_views(caches, geometry, NUM_BLOCKS), geometry.mode, link)
    store.store(STORED, SLOTS)
    for t in caches.values():  # the blocks are reused by other requests meanwhile
        t.zero_()
    assert store.load([5, 0, 2], TARGETS) == []
    store.fence_all()
    if link is not None and hasattr(link, "stream"):
        torch.cuda.synchronize()
    for name, t in caches.items():
        for src, dst in zip(STORED, TARGETS, strict=True):
            x, y = manager_block(original[name], src), manager_block(t, dst)
            if geometry.mode == RAW:
                assert torch.equal(x, y), name
            else:
                rel = float((x.float() - y.float()).norm() / x.float().norm())
                assert 0 < rel < 0.07, (name, rel)
        untouched = [b for b in range(NUM_BLOCKS) if b not in TARGETS]
        assert all(torch.count_nonzero(manager_block(t, b)) == 0 for b in untouched), name
    return store


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda lay: lay.name)
@pytest.mark.parametrize("backend", sorted(BACKEND_SPECS))
def test_every_backend_spec_round_trips_in_every_layout(backend, layout):
    config, caches = engine_caches(BACKEND_SPECS[backend], layout, NUM_BLOCKS)
    round_trip(config, caches)


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC],  # vLLM refuses splits in the others
                         ids=lambda lay: lay.name)
def test_a_block_split_into_kernel_blocks_is_tiered_whole(layout):
    """FlashInfer's fixed kernel block sizes make vLLM hand the connector tensors of num_blocks * ratio kernel
    blocks; a tier slot still holds one manager block (all its kernel blocks)."""
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float16)
    config, caches = engine_caches(spec, layout, NUM_BLOCKS, kernel_block_size=16)
    assert next(iter(caches.values())).shape[0] == 2 * NUM_BLOCKS
    round_trip(config, caches)


def test_the_geometry_follows_the_spec():
    config, _ = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.LBNHC, NUM_BLOCKS, layers=3)
    g = geometry_of(config, config.kv_cache_layout)
    assert (g.heads, g.rows, g.content, g.mode, g.layout) == (2, 16, 128, "quantize", "LBNHC")
    assert g.block_bytes == 3 * 2 * (16 * 128 + 4)  # one byte per element and a scale per head, every layer
    config, _ = engine_caches(BACKEND_SPECS["triton_int8_per_token_head"], KVCacheLayout.LBHNC, NUM_BLOCKS)
    g = geometry_of(config, None)
    assert (g.mode, g.content, g.block_bytes) == (RAW, 136, 2 * 2 * 16 * 136)  # inline scales: copied as they are


def test_an_mla_cache_in_bf16_is_refused_with_the_reason():
    spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    config, _ = engine_caches(spec, KVCacheLayout.LBHNC, NUM_BLOCKS)
    with pytest.raises(TierUnsupported, match="MLA latent caches are tiered only when vLLM already stores them in FP8"):
        geometry_of(config, None)


def test_a_tensor_that_disagrees_with_the_spec_is_refused_naming_the_layer():
    config, caches = engine_caches(BACKEND_SPECS["cpu_attn"], KVCacheLayout.LBHNC, NUM_BLOCKS)
    geometry = geometry_of(config, None)
    name = next(iter(caches))
    bad = {name: caches[name][:, :, :, :64]}
    with pytest.raises(TierUnsupported, match=f"layer {name}: .* does not match the KV cache spec"):
        layer_views(bad, geometry, NUM_BLOCKS)
    with pytest.raises(TierUnsupported, match="is not \\[k \\* 12 blocks"):
        layer_views({name: caches[name][:7]}, geometry, NUM_BLOCKS)
    with pytest.raises(TierUnsupported, match="the spec says"):
        layer_views({name: caches[name].float()}, geometry, NUM_BLOCKS)


@pytest.mark.parametrize("name", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallelism_is_refused_with_the_reason(name):
    """Its blocks hash block_size x ranks tokens, sharded over ranks: the tier's one-block-one-hash arithmetic would
    misplace them."""
    from types import SimpleNamespace

    config, _ = engine_caches(BACKEND_SPECS["cpu_attn"], KVCacheLayout.LBHNC, NUM_BLOCKS)
    assert geometry_of(config, None, SimpleNamespace(**{name: 1})).block_bytes > 0
    with pytest.raises(TierUnsupported, match=name):
        geometry_of(config, None, SimpleNamespace(**{name: 2}))
