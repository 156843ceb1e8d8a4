"""`retention_values` and `score_and_select`: the retention formula of `kvsched.core.scoring` over arrays.

The torch reference below is the specification: it evaluates `kvsched.core.scoring.retention_value` element-wise in
float64 with the same operation order (so the values agree with the scalar version to the last few ulps; the only
difference is `exp`'s implementation), and selects the k lowest-value unpinned candidates, lowest first, ties broken
by candidate index. A NaN value (from NaN inputs) sorts after every number; -0.0 ties with +0.0.

Inputs are 1-D arrays of equal length on one device: `tokens`, `bytes_per_token`, `idle_s`, `next_use_s`,
`role_weight`, `reuse_count` (any real dtype; every implementation computes in float64, so float64 columns are the
zero-copy fast path) and `pinned` (bool, or None for "nothing pinned").

Tolerances (tests): values within rtol 1e-12 of the reference (exp differs by at most a few ulps between libm, Sleef
and CUDA); a selection equals the reference's except where two candidates' reference values are within that tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvsched.core import scoring
from kvsched.core.scoring import ATTN_KNEE_TOKENS, PREFILL_TOK_S, Candidate
from kvsched.ops import backends
from kvsched.ops.registry import Impl, Op, any_device, on_devices

Columns = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_columns(*cols: torch.Tensor) -> None:
    """ValueError unless the columns are real (not bool, not complex), 1-D, of one length and on one device: every
    implementation's precondition (the Triton launcher would otherwise read a bool or complex column as numbers)."""
    n = cols[0].shape[0] if cols[0].dim() == 1 else -1
    for c in cols:
        if c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"candidate columns must be real numbers, got {c.dtype}")
        if c.dim() != 1 or c.shape[0] != n:
            raise ValueError(f"candidate columns must be 1-D of one length, got shapes {[tuple(x.shape) for x in cols]}")
        if c.device != cols[0].device:
            raise ValueError("candidate columns must be on one device")


def _columns(*cols: torch.Tensor) -> Columns:
    """The six numeric columns, checked (`_check_columns`), as contiguous float64 (a no-op for float64 contiguous
    input)."""
    _check_columns(*cols)
    out = tuple(c.to(torch.float64).contiguous() for c in cols)
    return out  # type: ignore[return-value]


def _pinned(pinned: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if pinned is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    if pinned.shape != (n,):
        raise ValueError(f"pinned must have shape ({n},), got {tuple(pinned.shape)}")
    return pinned.to(device=device, dtype=torch.bool).contiguous()


# ----------------------------------------------------------------------------------------------- torch reference
def retention_values_torch(
    tokens: torch.Tensor,
    bytes_per_token: torch.Tensor,
    idle_s: torch.Tensor,
    next_use_s: torch.Tensor,
    role_weight: torch.Tensor,
    reuse_count: torch.Tensor,
) -> torch.Tensor:
    """Float64 retention value per candidate, [s / (B * s)]; see `kvsched.core.scoring` for the formula and units."""
    tok, bpt, idle, nxt, role, reuse = _columns(tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
    p_reuse = (reuse + 1.0) / (reuse + 2.0)
    overdue = torch.clamp(idle - 2.0 * nxt, min=0.0)
    p_reuse = p_reuse * torch.exp(-overdue / torch.clamp(nxt, min=1.0))
    wait_s = torch.clamp(nxt - idle, min=0.0) + 1.0
    nbytes = torch.clamp(tok * bpt, min=1.0)
    # divisors as device tensors: CUDA divides by a host scalar through its rounded reciprocal (`page_scales_torch`)
    cost_s = tok / tok.new_tensor(PREFILL_TOK_S) * (1.0 + tok / tok.new_tensor(ATTN_KNEE_TOKENS))
    return role * p_reuse * cost_s / (nbytes * wait_s)


def select_lowest(values: torch.Tensor, pinned: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k lowest `values` whose `pinned` is False, lowest first, ties by index, NaN last.

    torch.topk finds the k-th smallest value; everything at or below it is then ordered with a stable sort, which
    keeps index order among ties (topk alone does not promise any tie order)."""
    free = torch.nonzero(~pinned).squeeze(1)
    k = min(max(int(k), 0), free.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=values.device)
    v = values[free]
    kth = torch.topk(v, k, largest=False, sorted=False).values.max()
    keep = torch.ones_like(v, dtype=torch.bool) if torch.isnan(kth) else (v <= kth)
    cand = torch.nonzero(keep).squeeze(1)
    order = torch.sort(v[cand], stable=True).indices[:k]
    return free[cand[order]]


def values_then_select(values_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """score_and_select from a retention-values implementation and torch's selection (`select_lowest`)."""

    def score_and_select(
        tokens: torch.Tensor,
        bytes_per_token: torch.Tensor,
        idle_s: torch.Tensor,
        next_use_s: torch.Tensor,
        role_weight: torch.Tensor,
        reuse_count: torch.Tensor,
        pinned: torch.Tensor | None,
        k: int,
    ) -> torch.Tensor:
        values = values_fn(tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
        return select_lowest(values, _pinned(pinned, values.shape[0], values.device), k)

    return score_and_select


score_and_select_torch = values_then_select(retention_values_torch)


# ----------------------------------------------------------------------------------------------- C++ (kvsched._C)
def retention_values_cxx(*cols: torch.Tensor) -> torch.Tensor:
    c = _columns(*cols)
    out = torch.empty_like(c[0])
    backends.cxx().retention_values(*(x.data_ptr() for x in c), c[0].shape[0], out.data_ptr())  # type: ignore[union-attr]
    return out


def score_and_select_cxx(
    tokens: torch.Tensor,
    bytes_per_token: torch.Tensor,
    idle_s: torch.Tensor,
    next_use_s: torch.Tensor,
    role_weight: torch.Tensor,
    reuse_count: torch.Tensor,
    pinned: torch.Tensor | None,
    k: int,
) -> torch.Tensor:
    c = _columns(tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
    n = c[0].shape[0]
    pins = _pinned(pinned, n, c[0].device)
    k = min(max(int(k), 0), n)
    out = torch.empty(k, dtype=torch.int64)
    got = backends.cxx().score_select(  # type: ignore[union-attr]
        *(x.data_ptr() for x in c), pins.data_ptr(), n, k, out.data_ptr()
    )
    return out[:got]


# ----------------------------------------------------------------------------------------------- Triton
def retention_values_triton(*cols: torch.Tensor) -> torch.Tensor:
    # found by review: only the shapes were checked, so bool and complex columns (and columns on different devices)
    # were scored instead of refused as by the torch and C++ paths. The launcher reads the columns in their own dtype.
    _check_columns(*cols)
    with backends.on_device_of(cols[0]):
        return backends.triton_kernels().score.retention_values(*cols)  # type: ignore[union-attr]


# Triton computes the values (one fused kernel); the selection is torch's (`select_lowest`: topk + stable sort).
score_and_select_triton = values_then_select(retention_values_triton)


_TRITON_OK = on_devices(("cuda",), FLOAT_DTYPES, backends.has_triton_cuda)
_TRITON_INTERP_OK = on_devices(("cpu",), FLOAT_DTYPES, backends.has_triton_interpreter)


def _triton_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return _TRITON_OK(device, dtype) or _TRITON_INTERP_OK(device, dtype)


RETENTION_VALUES = Op(
    "retention_values",
    reference=Impl("torch", retention_values_torch, any_device(FLOAT_DTYPES), priority=0),
    impls=(
        Impl("cxx", retention_values_cxx, on_devices(("cpu",), FLOAT_DTYPES, backends.has_cxx), 20, frozenset({"cpu"})),
        Impl("triton", retention_values_triton, _triton_supported, 30, frozenset({"cuda"})),
    ),
)

SCORE_AND_SELECT = Op(
    "score_and_select",
    reference=Impl("torch", score_and_select_torch, any_device(FLOAT_DTYPES), priority=0),
    impls=(
        Impl("cxx", score_and_select_cxx, on_devices(("cpu",), FLOAT_DTYPES, backends.has_cxx), 20, frozenset({"cpu"})),
        Impl("triton", score_and_select_triton, _triton_supported, 30, frozenset({"cuda"})),
    ),
)


def _dtype_of(*cols: torch.Tensor) -> torch.dtype:
    floats = [c.dtype for c in cols if c.is_floating_point()]
    return floats[0] if floats else torch.float64


def retention_values(
    tokens: torch.Tensor,
    bytes_per_token: torch.Tensor,
    idle_s: torch.Tensor,
    next_use_s: torch.Tensor,
    role_weight: torch.Tensor,
    reuse_count: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Float64 retention value of every candidate (see the module docstring)."""
    cols = (tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
    chosen = RETENTION_VALUES.resolve(tokens.device, _dtype_of(*cols), impl)
    return chosen.fn(*cols)


def score_and_select(
    tokens: torch.Tensor,
    bytes_per_token: torch.Tensor,
    idle_s: torch.Tensor,
    next_use_s: torch.Tensor,
    role_weight: torch.Tensor,
    reuse_count: torch.Tensor,
    pinned: torch.Tensor | None,
    k: int,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Indices (int64) of the k lowest-value unpinned candidates, lowest first, ties by index (fewer when fewer are
    unpinned). ValueError for k < 0 or columns of different lengths or devices."""
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cols = (tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count)
    chosen = SCORE_AND_SELECT.resolve(tokens.device, _dtype_of(*cols), impl)
    return chosen.fn(*cols, pinned, k)

KERNEL_MIN_CANDIDATES = 4096


def select_candidates(candidates: Sequence[Candidate], k: int, *, impl: str | None = None) -> list[int]:
    """`kvsched.core.scoring.select_lowest` through `score_and_select`: the retention policy's release order computed
    by the kernels (the policy core stays free of torch; the vLLM adapter injects this)."""
    if len(candidates) < KERNEL_MIN_CANDIDATES and impl is None:
        # Same order, no tensors: below a few thousand candidates building the columns costs more than sorting them,
        # and the engine-core process must not wake an OpenMP team that would spin on the worker's cores.
        return scoring.select_lowest(candidates, k)
    if not candidates:
        return []
    cols = torch.tensor([(c.tokens, c.bytes_per_token, c.idle_s, c.next_use_s, c.role_weight, c.reuse_count)
                         for c in candidates], dtype=torch.float64).T.contiguous()
    pinned = torch.tensor([c.pinned for c in candidates], dtype=torch.bool)
    return score_and_select(*cols, pinned, k, impl=impl).tolist()  # type: ignore[no-any-return]
