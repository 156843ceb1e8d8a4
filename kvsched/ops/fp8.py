"""FP8 (e4m3) quantization of KV blocks, and quantize+gather / dequantize+scatter of a session's blocks in one call.

Layout. vLLM 0.32 gives every attention layer a logical 4-D cache view `[num_blocks, num_kv_heads, block_size,
2 * head_size]` (`v1/kv_cache_interface.py: compute_layer_kv_cache_shape_bytes`, "(B, H, N, C)"; the CPU and
FlashAttention backends document the same shape). A (block, head) page holds that head's K and V for the block's
tokens (the CPU backend reads it as `[2 * block_size, head_size]`: K rows then V rows). The physical order of B, H and N
depends on the layout vLLM picked (LBHNC on CPU: contiguous; LBNHC/"NHD": H and N swapped), so every op here takes the
4-D view with any strides as long as the last dimension is contiguous.

Quantization (the torch reference below is the specification), per (block, head) page P of N x C elements:

    amax  = max |x| over the finite elements of P             (NaN and +-inf are ignored)
    scale = max(amax / 448, 2**-126)                           float32; 448 = largest e4m3fn value; the floor keeps
                                                               1/scale finite (an all-zero page gets scale 2**-126)
    q     = e4m3fn(clamp(x * (1 / scale), -448, 448))         float32 product, round-to-nearest-even; NaN stays NaN,
                                                               +-inf saturates to +-448
    x'    = dtype(float32(q) * scale)                          dequantization, rounded to nearest even

`1 / scale` is a float32 reciprocal computed once per page (all implementations use the same one, so their output is
bit-identical to the reference). Round trip: for finite x, |x' - x| <= amax * 2**-4 (half an e4m3 ulp at the top
binade, relative 2**-4) plus 2**-10 * scale (subnormals) and the output dtype's own rounding; tested.

The compact buffer of a session: `q` float8_e4m3fn `[len(block_ids), H, N, C]` (contiguous) and `scales` float32
`[len(block_ids), H]`.
"""

from __future__ import annotations

import torch

from kvsched.ops import backends
from kvsched.ops.registry import Impl, Op, any_device, on_devices

FP8_MAX = 448.0
SCALE_MIN = 2.0**-126
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_cache(cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"KV cache view must be 4-D [blocks, kv_heads, block_size, 2*head_size], got {tuple(cache.shape)}")
    if cache.dtype not in KV_DTYPES:
        raise ValueError(f"KV dtype must be one of {KV_DTYPES}, got {cache.dtype}")
    if cache.shape[2] == 0 or cache.shape[3] == 0:
        raise ValueError("empty pages")
    if cache.stride(3) != 1 and cache.shape[3] > 1:
        raise ValueError("the last dimension of the KV cache view must be contiguous")


def check_writable(cache: torch.Tensor, *others: torch.Tensor) -> None:
    """A scatter's target: no two elements in one place (an `expand`ed view; found by review: the C++ path wrote one
    block's data over another's), and every tensor on the cache's device (a CUDA tensor beside a CPU cache sent a
    device pointer to the host kernel: a segfault)."""
    if any(st == 0 and size > 1 for st, size in zip(cache.stride(), cache.shape, strict=True)):
        raise ValueError(f"the KV cache view has overlapping elements (strides {cache.stride()}): cannot write to it")
    for t in others:
        if t.device != cache.device:
            raise ValueError(f"all tensors must be on the KV cache's device {cache.device}, got one on {t.device}")


def check_compact(q: torch.Tensor, scales: torch.Tensor) -> None:
    if q.dtype != FP8 or q.dim() != 4 or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous 4-D {FP8} tensor, got {q.dtype} {tuple(q.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != tuple(q.shape[:2]) or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous float32 of shape {tuple(q.shape[:2])}")
    if scales.device != q.device:
        raise ValueError(f"scales must be on q's device {q.device}, got {scales.device}")


def check_block_ids(block_ids: torch.Tensor, num_blocks: int, *, unique: bool) -> torch.Tensor:
    """Integer ids in range (and unique for a scatter). Host ids are checked on the host; device ids cost the host a
    wait on the device (callers on a GPU hot path pass host ids, pinned: the kernels copy them over without blocking)."""
    if block_ids.dtype.is_floating_point or block_ids.is_complex() or block_ids.dtype == torch.bool:
        raise TypeError(f"block_ids must be an integer tensor, got {block_ids.dtype}")  # 1.9 was block 1
    ids = block_ids.to(dtype=torch.int64).reshape(-1).contiguous()
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise IndexError(f"block id out of range [0, {num_blocks}): min {lo}, max {hi}")
        if unique and torch.unique(ids).numel() != ids.numel():
            raise ValueError("block_ids must be unique for a scatter")
    return ids


# ----------------------------------------------------------------------------------------------- torch reference
def page_scales_torch(x: torch.Tensor) -> torch.Tensor:
    a = x.float().abs()
    amax = torch.where(torch.isfinite(a), a, 0.0).amax(dim=(2, 3))
    # A 0-d tensor on the device, not a Python float: CUDA's division by a host scalar multiplies by its rounded
    # reciprocal (1 ulp off for about half the pages, found by review), the kernels divide exactly
    return torch.clamp(amax / amax.new_tensor(FP8_MAX), min=SCALE_MIN)


def quantize_kv_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_cache(x)
    scales = page_scales_torch(x)
    inv = (1.0 / scales)[:, :, None, None]
    q = torch.clamp(x.float() * inv, -FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scales.contiguous()


def dequantize_kv_fp8_torch(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_compact(q, scales)
    if dtype not in KV_DTYPES:  # found by review: the automatic choice served float64 here (C++ and Triton refuse it)
        raise ValueError(f"KV dtype must be one of {KV_DTYPES}, got {dtype}")
    return (q.float() * scales[:, :, None, None]).to(dtype)


def gather_quantize_blocks_torch(cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_cache(cache)
    ids = check_block_ids(block_ids, cache.shape[0], unique=False).to(cache.device, non_blocking=True)
    return quantize_kv_fp8_torch(cache.index_select(0, ids))


def scatter_dequantize_blocks_torch(
    q: torch.Tensor, scales: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    check_cache(cache)
    check_writable(cache, q, scales)
    ids = check_block_ids(block_ids, cache.shape[0], unique=True).to(cache.device, non_blocking=True)
    _check_pair(q, cache, ids)
    cache.index_copy_(0, ids, dequantize_kv_fp8_torch(q, scales, cache.dtype))


def _empty_compact(cache: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((n, *cache.shape[1:]), dtype=FP8, device=cache.device),
            torch.empty((n, cache.shape[1]), dtype=torch.float32, device=cache.device))


def _check_out(out: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor, n: int) -> None:
    q, scales = out
    check_compact(q, scales)
    if tuple(q.shape) != (n, *cache.shape[1:]) or q.device != cache.device or scales.device != cache.device:
        raise ValueError(f"out q must have shape {(n, *cache.shape[1:])} on {cache.device}, got {tuple(q.shape)}")


def _check_pair(q: torch.Tensor, cache: torch.Tensor, ids: torch.Tensor) -> None:
    if tuple(q.shape) != (ids.numel(), *cache.shape[1:]):
        raise ValueError(f"q shape {tuple(q.shape)} does not match {ids.numel()} blocks of {tuple(cache.shape[1:])}")


# ----------------------------------------------------------------------------------------------- C++ (kvsched._C)
def _cache_args(cache: torch.Tensor) -> tuple[int, ...]:
    b, h, n, c = cache.shape
    return (cache.data_ptr(), _DTYPE_CODE[cache.dtype], b, h, n, c, cache.stride(0), cache.stride(1), cache.stride(2))


def gather_quantize_blocks_cxx(
    cache: torch.Tensor, block_ids: torch.Tensor | None, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_cache(cache)
    ids = (
        torch.arange(cache.shape[0], dtype=torch.int64)
        if block_ids is None
        else check_block_ids(block_ids, cache.shape[0], unique=False).cpu()
    )
    q, scales = out if out is not None else _empty_compact(cache, ids.numel())
    backends.cxx().gather_quantize_fp8(  # type: ignore[union-attr]
        *_cache_args(cache), ids.data_ptr(), ids.numel(), q.data_ptr(), scales.data_ptr()
    )
    return q, scales


def scatter_dequantize_blocks_cxx(
    q: torch.Tensor, scales: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor | None
) -> None:
    check_cache(cache)
    check_compact(q, scales)
    check_writable(cache, q, scales)
    ids = (
        torch.arange(cache.shape[0], dtype=torch.int64)
        if block_ids is None
        else check_block_ids(block_ids, cache.shape[0], unique=True).cpu()
    )
    _check_pair(q, cache, ids)
    backends.cxx().scatter_dequantize_fp8(  # type: ignore[union-attr]
        q.data_ptr(), scales.data_ptr(), *_cache_args(cache), ids.data_ptr(), ids.numel()
    )


def quantize_kv_fp8_cxx(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_quantize_blocks_cxx(x, None)


def dequantize_kv_fp8_cxx(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype)
    scatter_dequantize_blocks_cxx(q, scales, out, None)
    return out


# ----------------------------------------------------------------------------------------------- Triton
def _tk():  # type: ignore[no-untyped-def]
    return backends.triton_kernels().fp8  # type: ignore[union-attr]


def gather_quantize_blocks_triton(cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_cache(cache)
    ids = check_block_ids(block_ids, cache.shape[0], unique=False).to(cache.device, non_blocking=True)
    with backends.on_device_of(cache):
        return _tk().gather_quantize(cache, ids)


def scatter_dequantize_blocks_triton(
    q: torch.Tensor, scales: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    check_cache(cache)
    check_compact(q, scales)
    check_writable(cache, q, scales)
    ids = check_block_ids(block_ids, cache.shape[0], unique=True).to(cache.device, non_blocking=True)
    _check_pair(q, cache, ids)
    with backends.on_device_of(cache):
        _tk().scatter_dequantize(q, scales, cache, ids)


def quantize_kv_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_cache(x)
    with backends.on_device_of(x):
        return _tk().gather_quantize(x, torch.arange(x.shape[0], dtype=torch.int64, device=x.device))


def dequantize_kv_fp8_triton(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_compact(q, scales)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    with backends.on_device_of(q):
        _tk().scatter_dequantize(q, scales, out, torch.arange(q.shape[0], dtype=torch.int64, device=q.device))
    return out


# ----------------------------------------------------------------------------------------------- registry
_CXX_OK = on_devices(("cpu",), KV_DTYPES, backends.has_cxx)
_TRITON_CUDA_OK = on_devices(("cuda",), KV_DTYPES, backends.has_triton_cuda)
_TRITON_INTERP_OK = on_devices(("cpu",), KV_DTYPES, backends.has_triton_interpreter)
_CPU, _CUDA = frozenset({"cpu"}), frozenset({"cuda"})


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return _TRITON_CUDA_OK(device, dtype) or _TRITON_INTERP_OK(device, dtype)


def _op(name: str, ref, cxx, triton) -> Op:  # type: ignore[no-untyped-def]
    return Op(
        name,
        reference=Impl("torch", ref, any_device(KV_DTYPES), priority=0),
        impls=(Impl("cxx", cxx, _CXX_OK, 20, _CPU), Impl("triton", triton, _triton_ok, 30, _CUDA)),
    )


QUANTIZE = _op("quantize_kv_fp8", quantize_kv_fp8_torch, quantize_kv_fp8_cxx, quantize_kv_fp8_triton)
DEQUANTIZE = _op("dequantize_kv_fp8", dequantize_kv_fp8_torch, dequantize_kv_fp8_cxx, dequantize_kv_fp8_triton)
GATHER = _op(
    "gather_quantize_blocks", gather_quantize_blocks_torch, gather_quantize_blocks_cxx, gather_quantize_blocks_triton
)
SCATTER = _op(
    "scatter_dequantize_blocks",
    scatter_dequantize_blocks_torch,
    scatter_dequantize_blocks_cxx,
    scatter_dequantize_blocks_triton,
)


# ----------------------------------------------------------------------------------------------- public API
def quantize_kv_fp8(x: torch.Tensor, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of KV pages `x` [B, H, N, C] (bf16/fp16/fp32): q float8_e4m3fn [B, H, N, C], scales float32 [B, H]."""
    return QUANTIZE.resolve(x.device, x.dtype, impl).fn(x)


def dequantize_kv_fp8(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *, impl: str | None = None
) -> torch.Tensor:
    """KV pages of `dtype` from (q, scales) made by `quantize_kv_fp8` (float32(q) * scale, rounded to `dtype`)."""
    return DEQUANTIZE.resolve(q.device, dtype, impl).fn(q, scales, dtype)


def gather_quantize_blocks(
    cache: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the blocks `block_ids` of one layer's KV cache view into a compact (q, scales) buffer, in one call.

    Equals `quantize_kv_fp8(cache[block_ids])`; block ids may repeat. `out=(q, scales)` writes into preallocated
    buffers (a tier's host pool) instead of allocating: first-touch page faults of fresh buffers cost more than the
    quantization itself at these sizes."""
    chosen = GATHER.resolve(cache.device, cache.dtype, impl)
    if out is None:
        return chosen.fn(cache, block_ids)  # type: ignore[no-any-return]
    _check_out(out, cache, block_ids.numel())
    if chosen.name == "cxx":
        return chosen.fn(cache, block_ids, out)  # type: ignore[no-any-return]
    q, scales = chosen.fn(cache, block_ids)
    out[0].copy_(q)
    out[1].copy_(scales)
    return out


def scatter_dequantize_blocks(
    q: torch.Tensor, scales: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor, *, impl: str | None = None
) -> None:
    """Write `dequantize_kv_fp8(q, scales)` into blocks `block_ids` (unique) of one layer's KV cache view, in place."""
    SCATTER.resolve(cache.device, cache.dtype, impl).fn(q, scales, cache, block_ids)
