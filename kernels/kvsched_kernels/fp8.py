"""FP8 e4m3 quantize+gather and dequantize+scatter of KV pages (one program per (block, KV head) page).

Specification and layout: kvsched.ops.fp8 (its torch reference). The cache is a 4-D view [num_blocks, num_kv_heads,
block_size, 2*head_size] with any strides and a contiguous last dimension; the compact buffer is q (uint8 view of
float8_e4m3fn) [n, H, N, C] plus float32 scales [n, H].

The e4m3 rounding (and bf16 rounding on dequantize) is done with integer operations on the float32 bits instead of
`.to(tl.float8e4nv)` / `.to(tl.bfloat16)`: the Triton CPU interpreter casts those wrongly (no round-to-nearest-even,
NaN becomes a number), and the integer version is bit-exact with torch on GPUs as well. Costs a few ALU operations per
element in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_OUT_F32, _OUT_F16, _OUT_BF16 = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_F32, torch.float16: _OUT_F16, torch.bfloat16: _OUT_BF16}


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
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    m = (rows < N) & (cols < C)
    x = tl.load(cache_ptr + blk * stride_b + h * stride_h + rows * stride_n + cols, mask=m, other=0.0)
    x = x.to(tl.float32)
    a = tl.abs(x)
    amax = tl.max(tl.max(tl.where(a < float("inf"), a, 0.0), axis=1), axis=0)  # finite elements only
    scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)  # floor 2^-126
    inv = tl.math.div_rn(1.0, scale)
    v = x * inv
    v = tl.where(v > 448.0, 448.0, tl.where(v < -448.0, -448.0, v))  # NaN passes through
    code = _e4m3_bits(v)
    page = (i * H + h) * (N * C)
    tl.store(q_ptr + page + rows * C + cols, code.to(tl.uint8), mask=m)
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
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    m = (rows < N) & (cols < C)
    page = (i * H + h) * (N * C)
    code = tl.load(q_ptr + page + rows * C + cols, mask=m, other=0).to(tl.int32)
    x = _e4m3_values(code) * tl.load(scale_ptr + i * H + h)
    dst = cache_ptr + blk * stride_b + h * stride_h + rows * stride_n + cols
    if OUT_KIND == 2:  # bfloat16 bits (cache viewed as int16), round to nearest even, NaN -> 0x7FC0
        u = x.to(tl.int32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(dst, r.to(tl.int16), mask=m)
    elif OUT_KIND == 1:
        tl.store(dst, x.to(tl.float16), mask=m)
    else:
        tl.store(dst, x, mask=m)


def gather_quantize(cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [len(ids), H, N, C], scales float32 [len(ids), H]) of pages cache[block_ids]."""
    _, h, n, c = cache.shape
    num = block_ids.numel()
    q = torch.empty((num, h, n, c), dtype=torch.float8_e4m3fn, device=cache.device)
    scales = torch.empty((num, h), dtype=torch.float32, device=cache.device)
    if num and h:
        _gather_quantize_kernel[(num, h)](
            cache, block_ids, q.view(torch.uint8), scales, h, cache.stride(0), cache.stride(1), cache.stride(2),
            N=n, C=c, BLOCK_N=triton.next_power_of_2(n), BLOCK_C=triton.next_power_of_2(c), enable_fp_fusion=False,
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
            N=n, C=c, BLOCK_N=triton.next_power_of_2(n), BLOCK_C=triton.next_power_of_2(c),
            OUT_KIND=_OUT_KIND[cache.dtype], enable_fp_fusion=False,
        )  # fmt: skip
