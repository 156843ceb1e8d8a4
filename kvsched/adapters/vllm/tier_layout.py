"""What one FP8-tier slot holds, read from vLLM's own KV cache spec and layout, and the per-layer views the copies use.

vLLM 0.32 gives every attention backend one logical per-layer cache `[B, H, N, C]` (blocks, head slots, states, content;
`vllm/v1/kv_cache_interface.py`, RFC #42082): CPU attention, FlashAttention, FlashInfer and Triton attention all hold
`C = head_size + head_size_v` (K then V: per token for the GPU backends, as all K rows then all V rows of the page for
the CPU backend; FlashInfer's nvfp4 cache instead holds 2 x heads slots of C = head_size, read from the spec alike), and the engine-wide `KVCacheLayout` only permutes the physical order of B, H and N (LBHNC = "HND",
the CPU's; LBNHC = "NHD", the GPU backends' default; block-outermost layouts for cross-layer blocks). C is innermost and
contiguous in every layout, so a page (block, head) is N runs of C elements at some stride, which is what kvsched's
quantize kernels take: the tier needs no per-backend shape table, only the spec and the tensor's own strides. When a
backend's kernel block is smaller than `--block-size`, vLLM hands the connector kernel-block-granular tensors
(`shape[0] = num_blocks * ratio`); each manager block then spans `ratio` kernel blocks, one view each.

What is copied how, decided from the spec (`kv_quant_mode`, dtype), the same way on the scheduler and the workers:
- float16 / bfloat16 / float32 caches: quantized to FP8 e4m3 with one float32 scale per (block, head slot);
- caches vLLM already quantized (fp8 per tensor, per-token-head modes with their scales inline in C, nvfp4): copied
  byte for byte (each page is self-contained; the per-tensor scales live on the layer and never change);
- MLA latent caches in bfloat16: refused (one scale over a page of latent and RoPE dimensions would cost the RoPE part
  its precision); MLA caches already in FP8 are copied as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

QUANTIZE = "quantize"
RAW = "raw"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TierUnsupported(ValueError):
    """The tier cannot hold this engine's KV cache; the message says why (logged once at start-up, metrics show the
    tier disabled; the engine serves as without the tier)."""


@dataclass(frozen=True, slots=True)
class TierGeometry:
    """One slot = one KV block of every attention layer in the (single) KV cache group."""

    layers: tuple[str, ...]
    heads: int  # head slots per layer page (spec.num_heads)
    rows: int  # states per block (tokens; spec.num_states)
    content: int  # elements per row (C / element size)
    dtype: torch.dtype  # the cache tensors' dtype (uint8 for caches vLLM quantized)
    mode: str  # QUANTIZE or RAW
    layout: str  # the engine's KVCacheLayout name (logged; views follow the tensors' own strides)

    @property
    def block_bytes(self) -> int:
        """Tier bytes per KV block (all layers): one byte per element, plus a float32 scale per head when quantizing.
        With kernel-block splitting a block carries `ratio` scales per head; the budget counts one (the difference is
        4 bytes per head per extra kernel block)."""
        element = 1 if self.mode == QUANTIZE else self.dtype.itemsize
        scales = 4 if self.mode == QUANTIZE else 0
        return len(self.layers) * self.heads * (self.rows * self.content * element + scales)


@dataclass(frozen=True, slots=True)
class LayerView:
    """One copy unit: a 4-D view `[num_blocks, heads, rows, content]` (content contiguous, other strides as vLLM laid
    them out) of one layer tensor; `part` is the kernel block within a manager block (0 without splitting)."""

    name: str
    cache: torch.Tensor
    part: int = 0


def geometry_of(kv_cache_config: Any, layout: str | None, parallel_config: Any = None) -> TierGeometry:
    """The tier geometry of an engine's KV cache config; TierUnsupported with the reason otherwise."""
    if kv_cache_config is None:
        raise TierUnsupported("the FP8 tier needs vLLM's KV cache config")
    # Context parallelism shards a block's tokens over ranks and hashes blocks of block_size x ranks tokens: the tier's
    # block arithmetic (one pool block = one hashed block) would misplace them.
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if int(getattr(parallel_config, name, 1) or 1) > 1:
            raise TierUnsupported(f"the FP8 tier does not support context parallelism ({name} > 1)")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise TierUnsupported(f"the FP8 tier supports models with one KV cache group (full attention); this one has "
                              f"{len(groups)} (hybrid or sliding-window models)")
    group = groups[0]
    specs = getattr(group.kv_cache_spec, "kv_cache_specs", None) or {n: group.kv_cache_spec for n in group.layer_names}
    kinds = {_cell(spec) for spec in specs.values()}
    if len(kinds) != 1:
        raise TierUnsupported("the FP8 tier needs every attention layer to have one page shape and dtype")
    heads, rows, content, dtype, mode = kinds.pop()
    return TierGeometry(tuple(specs), heads, rows, content, dtype, mode, layout or "LBHNC")


def _cell(spec: Any) -> tuple[int, int, int, torch.dtype, str]:
    from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode, MLAAttentionSpec

    name = type(spec).__name__
    if not isinstance(spec, AttentionSpec):
        raise TierUnsupported(f"the FP8 tier holds attention KV caches, not {name}")
    if getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
        raise TierUnsupported(f"the FP8 tier supports full-attention KV caches, not sliding-window/chunked ({name})")
    if spec.tokens_per_state != 1:
        raise TierUnsupported(f"the FP8 tier needs one state per token; {name} stores {spec.tokens_per_state}")
    dtype = spec.dtype
    if spec.state_content_size_bytes % dtype.itemsize:
        raise TierUnsupported(f"page content of {spec.state_content_size_bytes} bytes is not whole {dtype} elements")
    content = spec.state_content_size_bytes // dtype.itemsize
    quantized = spec.kv_quant_mode != KVQuantMode.NONE or dtype not in FLOAT_DTYPES
    if isinstance(spec, MLAAttentionSpec) or spec.head_size_v == 0:
        if not quantized:
            raise TierUnsupported("MLA latent caches are tiered only when vLLM already stores them in FP8 "
                                  "(--kv-cache-dtype fp8): one scale over a page of latent and RoPE dimensions would "
                                  "cost the RoPE part its precision")
    return spec.num_heads, spec.num_states, content, dtype, RAW if quantized else QUANTIZE


def layer_views(kv_caches: Mapping[str, torch.Tensor], geometry: TierGeometry, num_blocks: int) -> list[LayerView]:
    """The copy units of the tensors vLLM registered: per distinct tensor (layers sharing a cache are copied once) and
    kernel block, a `[num_blocks, heads, rows / ratio, content]` view. TierUnsupported if a tensor is not what the
    spec says (the message names the layer, its shape and strides)."""
    views: list[LayerView] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in kv_caches.items():
        ident = (t.data_ptr(), tuple(t.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        where = f"layer {name}: KV cache of shape {tuple(t.shape)}, strides {t.stride()}, {t.dtype}"
        if t.dim() != 4 or t.shape[0] % num_blocks or t.shape[0] == 0:
            raise TierUnsupported(f"{where} is not [k * {num_blocks} blocks, heads, states, content]")
        ratio = t.shape[0] // num_blocks
        if geometry.rows % ratio or tuple(t.shape[1:]) != (geometry.heads, geometry.rows // ratio, geometry.content):
            raise TierUnsupported(f"{where} does not match the KV cache spec ({geometry.heads} heads, "
                                  f"{geometry.rows} states per block, {geometry.content} elements per state)")
        if t.dtype != geometry.dtype:
            raise TierUnsupported(f"{where}: the spec says {geometry.dtype}")
        if t.stride(3) != 1 and t.shape[3] > 1:
            raise TierUnsupported(f"{where}: the content dimension is not contiguous")
        if ratio == 1:
            views.append(LayerView(name, t))
        else:
            grouped = t.unflatten(0, (num_blocks, ratio))  # kernel blocks of one manager block are adjacent
            views.extend(LayerView(name, grouped[:, j], part=j) for j in range(ratio))
    if not views:
        raise TierUnsupported("no KV cache tensors to tier")
    return views


def kernel_split(views: list[LayerView]) -> list[tuple[str, int, tuple[int, ...]]]:
    """How a slot's payload is laid out when kernel blocks split the manager blocks: (layer, kernel block, [heads,
    rows, content]) of each view in payload order; empty without splitting. Only the workers see it (the backend
    chooses the kernel block there), so it enters the frame identity, not the scheduler's (tier_blob.frame_identity)."""
    if all(v.part == 0 for v in views):
        return []
    return [(v.name, v.part, tuple(v.cache.shape[1:])) for v in views]


def view_bytes(views: list[LayerView], mode: str) -> int:
    """Tier bytes per block these views actually take (the budget's `block_bytes` up to kernel-block scales)."""
    total = 0
    for v in views:
        _, heads, rows, content = v.cache.shape
        total += heads * (rows * content * (1 if mode == QUANTIZE else v.cache.element_size()) +
                          (4 if mode == QUANTIZE else 0))
    return total
