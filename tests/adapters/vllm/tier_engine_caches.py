"""KV caches exactly as a vLLM 0.32 engine lays them out, for the tier's tests: the engine core's tensor plan
(`compute_layout_strides`, as `get_kv_cache_config_from_groups` makes it) and the worker's own allocator
(`allocate_kv_cache`), on CPU tensors, for any spec, `KVCacheLayout` and kernel block size."""

from __future__ import annotations

import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    KVQuantMode,
    MLAAttentionSpec,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

# The per-layer spec each attention backend publishes for a Llama-like layer (2 KV heads, head_size 64); vLLM 0.32
# gives them all the logical page [B, H, N, C] with C = K|V (tier_layout's docstring says how they read it).
BACKEND_SPECS = {
    "cpu_attn": FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.bfloat16),
    "flash_attn": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16),
    "flashinfer": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16),
    "triton_attn": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32),
    "fp8_cache": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                                   kv_quant_mode=KVQuantMode.FP8_PER_TENSOR),
    "triton_int8_per_token_head": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                                                    kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD,
                                                    state_content_bytes=2 * 64 + 8),
    "mla_fp8": MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.uint8,
                                cache_dtype_str="fp8", kv_quant_mode=KVQuantMode.FP8_PER_TENSOR),
}


def engine_caches(spec, layout: KVCacheLayout, num_blocks: int = 12, layers: int = 2,
                  kernel_block_size: int | None = None, device: str = "cpu",
                  ) -> tuple[KVCacheConfig, dict[str, torch.Tensor]]:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    interleaved = spec.page_size_bytes * layers if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, layers, layout,
                                                            fixed_strides=(None, interleaved, None, None, None))
    size = spec.page_size_bytes * layers * num_blocks
    config = KVCacheConfig(num_blocks=num_blocks,
                           kv_cache_tensors=[KVCacheTensor(size=size, layers=names, layer_stride=layer_stride,
                                                           block_stride=block_stride)],
                           kv_cache_groups=[KVCacheGroupSpec(names, spec)], kv_cache_layout=layout.name)
    caches = allocate_kv_cache(config, torch.device(device), layout,
                               [kernel_block_size] if kernel_block_size else None)
    return config, caches


def fill(caches: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Random KV in every layer (floats with per-head magnitudes; raw bytes for quantized caches)."""
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():
        if t.dtype.is_floating_point:
            x = torch.randn(t.shape, generator=g) * torch.logspace(-2, 1, t.shape[1])[None, :, None, None]
        else:
            x = torch.randint(0, 255, t.shape, generator=g, dtype=torch.uint8)
        t.copy_(x.to(t.device))
