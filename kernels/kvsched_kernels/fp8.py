"""FP8 e4m3 quantize+gather and dequantize+scatter of KV pages (one program per (block, KV head) page).

Specification and layout: kvsched.ops.fp8 (its torch reference). The cache is a 4-D view [num_blocks, num_kv_heads,
block_size, 2*head_size] with any strides and a contiguous last dimension; the compact buffer is q (uint8 view of
float8_e4m3fn) [n, H, N, C] plus float32 scales [n, H].

The e4m3 rounding (and bf16 rounding on dequantize, bf16 widening on quantize) is done with integer operations on the
float32 bits instead of `.to(tl.float8e4nv)` / `.to(tl.bfloat16)` / `.to(tl.float32)`: the Triton CPU interpreter casts
those wrongly (no round-to-nearest-even, NaN becomes a number, bf16 subnormals flushed), and the integer version is
bit-exact with torch on GPUs as well. Costs a few ALU operations per element in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_OUT_F32, _OUT_F16, _OUT_BF16 = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_F32, torch.float16: _OUT_F16, torch.bfloat16: _OUT_BF16}
TILE_ELEMS = 4096  # elements of a page a program holds at once (tests shrink it to exercise the loops)


@triton.jit
def _e4m3_bits(v):
    """e4m3fn codes (int32, 0..255) of float32 values already clamped to [-448, 448] (NaN allowed)."""
    bits = v.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    # below 2^-6 (subnormal): adding 2^14, whose ulp is 2^-9, rounds to the subnormal step (nearest even)
    den = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    # normal: round the 20 dropped mantissa bits to nearest even, rebias the exponent from 127 to 7
    nrm = (a + (0x7FFFF - (120 << 23)) + ((a >> 20) & 1)) >> 20
    code = tl.where(a < (121 << 23), den, nrm)
    code = tl.where(a > 0x7F800000, 0x7F, code)
    return code | tl.where(bits < 0, 0x80, 0)


@triton.jit
def _e4m3_values(code):
    """float32 values of e4m3fn codes (int32)."""
    em = code & 0x7F
    normal = ((em << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(em < 8, em.to(tl.float32) * 0.001953125, normal)  # subnormal: em * 2^-9
    value = tl.where(em == 0x7F, float("nan"), value)
    return tl.where((code & 0x80) != 0, -value, value)


@triton.jit
def _load_f32(ptrs, mask, IN_BF16: tl.constexpr):
    """float32 values of cache elements (0 where masked). bf16 comes as int16 bits (the cache viewed as int16) and is
    widened by hand, which is exact everywhere; found by review: the interpreter's `.to(tl.float32)` of a bf16 load
    flushed subnormals to 0, so the CI check disagreed with the reference on pages of tiny values."""
    if IN_BF16:
        x = (tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _gather_quantize_kernel(
    cache_ptr,
    ids_ptr,
    q_ptr,
    scale_ptr,
    H,
    stride_b,
    stride_h,
    stride_n,
    N: tl.constexpr,
    C: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_C: tl.constexpr,
    IN_BF16: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    src = cache_ptr + blk * stride_b + h * stride_h
    page = q_ptr + (i * H + h) * (N * C)
    rows = tl.arange(0, TILE_N)[:, None]
    cols = tl.arange(0, TILE_C)[None, :]
    # Pass 1: the page's largest finite |x|, a tile at a time (a whole page in registers spills on a GPU).
    amax = tl.zeros((TILE_N, TILE_C), dtype=tl.float32)
    for r0 in range(0, N, TILE_N):
        for c0 in range(0, C, TILE_C):
            r, c = r0 + rows, c0 + cols
            a = tl.abs(_load_f32(src + r * stride_n + c, (r < N) & (c < C), IN_BF16))
            amax = tl.maximum(amax, tl.where(a < float("inf"), a, 0.0))  # finite elements only (NaN < inf is false)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(amax, axis=1), axis=0), 448.0), 1.1754943508222875e-38)  # >= 2^-126
    inv = tl.math.div_rn(1.0, scale)
    # Pass 2: quantize (the page is read again, from L2 on a GPU).
    for r0 in range(0, N, TILE_N):
        for c0 in range(0, C, TILE_C):
            r, c = r0 + rows, c0 + cols
            m = (r < N) & (c < C)
            v = _load_f32(src + r * stride_n + c, m, IN_BF16) * inv
            v = tl.where(v > 448.0, 448.0, tl.where(v < -448.0, -448.0, v))  # NaN passes through
            tl.store(page + r * C + c, _e4m3_bits(v).to(tl.uint8), mask=m)
    tl.store(scale_ptr + i * H + h, scale)


@triton.jit
def _scatter_dequantize_kernel(
    q_ptr,
    scale_ptr,
    cache_ptr,
    ids_ptr,
    H,
    stride_b,
    stride_h,
    stride_n,
    N: tl.constexpr,
    C: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_C: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    page = q_ptr + (i * H + h) * (N * C)
    dst = cache_ptr + blk * stride_b + h * stride_h
    scale = tl.load(scale_ptr + i * H + h)
    rows = tl.arange(0, TILE_N)[:, None]
    cols = tl.arange(0, TILE_C)[None, :]
    for r0 in range(0, N, TILE_N):
        for c0 in range(0, C, TILE_C):
            r, c = r0 + rows, c0 + cols
            m = (r < N) & (c < C)
            x = _e4m3_values(tl.load(page + r * C + c, mask=m, other=0).to(tl.int32)) * scale
            out = dst + r * stride_n + c
            if OUT_KIND == 2:  # bfloat16 bits (cache viewed as int16), round to nearest even, NaN -> 0x7FC0
                u = x.to(tl.int32, bitcast=True)
                b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
                b = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, b)
                tl.store(out, b.to(tl.int16), mask=m)
            elif OUT_KIND == 1:
                tl.store(out, x.to(tl.float16), mask=m)
            else:
                tl.store(out, x, mask=m)


def _tiles(n: int, c: int) -> dict[str, int]:
    """Tile of a page a program holds at once: at most TILE_ELEMS elements (32 a thread at 4 warps), so a page of any
    size stays in registers on a GPU (a whole 64-token x 256 page is 16k values, 128 a thread)."""
    tile_c = min(triton.next_power_of_2(c), TILE_ELEMS)
    return {"TILE_N": min(triton.next_power_of_2(n), max(TILE_ELEMS // tile_c, 1)), "TILE_C": tile_c}


def gather_quantize(cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [len(ids), H, N, C], scales float32 [len(ids), H]) of pages cache[block_ids]."""
    _, h, n, c = cache.shape
    num = block_ids.numel()
    q = torch.empty((num, h, n, c), dtype=torch.float8_e4m3fn, device=cache.device)
    scales = torch.empty((num, h), dtype=torch.float32, device=cache.device)
    bf16 = cache.dtype == torch.bfloat16
    if num and h:
        _gather_quantize_kernel[(num, h)](
            cache.view(torch.int16) if bf16 else cache, block_ids, q.view(torch.uint8), scales, h, cache.stride(0),
            cache.stride(1), cache.stride(2), N=n, C=c, **_tiles(n, c), IN_BF16=bf16, enable_fp_fusion=False,
        )  # fmt: skip
    return q, scales


def scatter_dequantize(q: torch.Tensor, scales: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """cache[block_ids] = float(q) * scales, rounded to the cache dtype (ids unique)."""
    _, h, n, c = cache.shape
    num = block_ids.numel()
    out = cache.view(torch.int16) if cache.dtype == torch.bfloat16 else cache
    if num and h:
        _scatter_dequantize_kernel[(num, h)](
            q.view(torch.uint8), scales, out, block_ids, h, cache.stride(0), cache.stride(1), cache.stride(2),
            N=n, C=c, **_tiles(n, c),
            OUT_KIND=_OUT_KIND[cache.dtype], enable_fp_fusion=False,
        )  # fmt: skip
