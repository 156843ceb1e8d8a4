"""Retention values of eviction candidates in one fused float64 kernel (kvsched.core.scoring's formula).

Selection of the k lowest is left to torch (`kvsched.ops.score.select_lowest`: topk + a stable sort for index-order
ties): a GPU top-k over 1M values is one library call and not worth a custom kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsched.core.scoring import ATTN_KNEE_TOKENS, PREFILL_TOK_S

BLOCK = 1024
_LOADABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)


@triton.jit
def _clamp_min(x, lo):
    # max(x, lo) that keeps NaN, like torch.clamp and std::max(x, lo)
    return tl.where(x < lo, lo, x)


@triton.jit
def _retention_values_kernel(
    tok_ptr,
    bpt_ptr,
    idle_ptr,
    next_ptr,
    role_ptr,
    reuse_ptr,
    out_ptr,
    n,
    PREFILL: tl.constexpr,
    KNEE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tok = tl.load(tok_ptr + offs, mask=m, other=0).to(tl.float64)
    bpt = tl.load(bpt_ptr + offs, mask=m, other=0).to(tl.float64)
    idle = tl.load(idle_ptr + offs, mask=m, other=0).to(tl.float64)
    nxt = tl.load(next_ptr + offs, mask=m, other=0).to(tl.float64)
    role = tl.load(role_ptr + offs, mask=m, other=0).to(tl.float64)
    reuse = tl.load(reuse_ptr + offs, mask=m, other=0).to(tl.float64)
    # Same operations, same order as kvsched.core.scoring.retention_value. float64 `/` is IEEE round-to-nearest on
    # GPUs (div.rn.f64); tl.math.div_rn exists for float32 only.
    p_reuse = (reuse + 1.0) / (reuse + 2.0)
    overdue = _clamp_min(idle - 2.0 * nxt, 0.0)
    p_reuse = p_reuse * tl.exp(-overdue / _clamp_min(nxt, 1.0))
    wait_s = _clamp_min(nxt - idle, 0.0) + 1.0
    nbytes = _clamp_min(tok * bpt, 1.0)
    cost_s = tok / PREFILL * (1.0 + tok / KNEE)
    value = role * p_reuse * cost_s / (nbytes * wait_s)
    tl.store(out_ptr + offs, value, mask=m)


def retention_values(
    tokens: torch.Tensor,
    bytes_per_token: torch.Tensor,
    idle_s: torch.Tensor,
    next_use_s: torch.Tensor,
    role_weight: torch.Tensor,
    reuse_count: torch.Tensor,
) -> torch.Tensor:
    """Float64 retention values of n candidates (1-D columns of one length on one device)."""
    cols = [
        c.contiguous() if c.dtype in _LOADABLE else c.to(torch.float64).contiguous()
        for c in (tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
    ]
    n = cols[0].shape[0]
    out = torch.empty(n, dtype=torch.float64, device=cols[0].device)
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        _retention_values_kernel[grid](
            *cols, out, n, PREFILL=PREFILL_TOK_S, KNEE=ATTN_KNEE_TOKENS, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out
