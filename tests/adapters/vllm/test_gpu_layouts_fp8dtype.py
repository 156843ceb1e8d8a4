"""A cache vLLM already quantized is copied byte for byte, whatever dtype its tensors carry. vLLM's CUDA backends keep
fp8 caches as uint8, but a float8-typed cache (`fp8_inc`'s float8_e4m3fn, a backend that types its pages) failed
every restore: torch has no `index_copy_` (CPU, and CUDA builds of several versions) for float8 dtypes (found by
review: NotImplementedError "index_copy_cpu" not implemented for 'Float8_e4m3fn', so each load was reported failed and
recomputed). The store now moves such pages as bytes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from kvsched.adapters.vllm.fp8_tier_store import TierStore  # noqa: E402
from kvsched.adapters.vllm.tier_layout import RAW, geometry_of, layer_views  # noqa: E402
from tests.adapters.vllm.tier_engine_caches import engine_caches  # noqa: E402

NUM_BLOCKS = 12
FLOAT8_SPEC = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float8_e4m3fn,
                                kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)


def byte_round_trip(layout: KVCacheLayout, device: str = "cpu", link=None) -> None:  # type: ignore[no-untyped-def]
    """Store blocks 5, 0, 2; overwrite the pool; restore them into 1, 7, 9: exactly those bytes come back there."""
    config, caches = engine_caches(FLOAT8_SPEC, layout, NUM_BLOCKS, device=device)
    geometry = geometry_of(config, config.kv_cache_layout)
    assert geometry.mode == RAW and geometry.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(3)
    for t in caches.values():
        t.view(torch.uint8).copy_(torch.randint(0, 255, t.shape, generator=g, dtype=torch.uint8).to(device))
    original = {n: t.view(torch.uint8).clone() for n, t in caches.items()}
    store = TierStore(layer_views(caches, geometry, NUM_BLOCKS), geometry.mode, link)
    store.store([5, 0, 2], [3, 4, 5])
    for t in caches.values():
        t.view(torch.uint8).zero_()
    assert store.load([3, 4, 5], [1, 7, 9]) == []
    store.fence_all()
    if device != "cpu":
        torch.cuda.synchronize()
    for name, t in caches.items():
        got = t.view(torch.uint8)
        for src, dst in ((5, 1), (0, 7), (2, 9)):
            assert torch.equal(got[dst], original[name][src]), (name, src, dst)
        assert int(got[[b for b in range(NUM_BLOCKS) if b not in (1, 7, 9)]].sum()) == 0, name


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda lay: lay.name)
def test_a_float8_typed_cache_round_trips_byte_for_byte_in_every_layout(layout: KVCacheLayout) -> None:
    byte_round_trip(layout)
