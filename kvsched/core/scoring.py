"""Retention value of a candidate (a session's retained KV): the single formula every eviction order uses.

The value is the *expected recompute time avoided per byte-second of KV memory held*:

    cost_s   = tokens / PREFILL_TOK_S * (1 + tokens / ATTN_KNEE_TOKENS)
               prefill time to recompute the prefix, seconds: a linear (MLP) term plus attention's quadratic term,
               which matches the prefill-time shape measured for Llama-class models (attention dominates past ~32k).
    p_reuse  = (reuse_count + 1) / (reuse_count + 2)
               * exp(-max(idle_s - 2 * next_use_s, 0) / max(next_use_s, 1))
               Laplace's rule of succession on past returns, decayed once the session is overdue by more than its
               expected gap (an agent that did not come back when expected probably will not).
    wait_s   = max(next_use_s - idle_s, 0) + 1
               seconds the bytes must still be held before the expected reuse (1 s floor: nothing is free to hold).
    bytes    = max(tokens * bytes_per_token, 1)
    value    = role_weight * p_reuse * cost_s / (bytes * wait_s)          [s / (B * s)]

Candidates with the lowest value are released first; pinned candidates (e.g. in use by a running request) are never
selected. Ties break by candidate index, so the order is deterministic. `kvsched.ops.score_and_select` implements the
same formula over arrays (torch reference, C++, Triton); this module is its scalar definition, used by the policy core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PREFILL_TOK_S = 10_000.0
ATTN_KNEE_TOKENS = 32_768.0


@dataclass(frozen=True, slots=True)
class Candidate:
    tokens: int
    bytes_per_token: float
    idle_s: float
    next_use_s: float
    role_weight: float = 1.0
    reuse_count: int = 0
    pinned: bool = False


def recompute_cost_s(tokens: float) -> float:
    """Seconds of prefill needed to rebuild `tokens` of KV (reference throughput, see module docstring)."""
    return tokens / PREFILL_TOK_S * (1.0 + tokens / ATTN_KNEE_TOKENS)


def retention_value(c: Candidate) -> float:
    """Expected recompute seconds avoided per byte-second held (higher = keep longer)."""
    return value_of(c.tokens, c.bytes_per_token, c.idle_s, c.next_use_s, c.role_weight, c.reuse_count)


def value_of(tokens: float, bytes_per_token: float, idle_s: float, next_use_s: float, role_weight: float = 1.0,
             reuse_count: int = 0) -> float:
    """`retention_value` from its fields: the release order keys every pinned session with it, and building a
    frozen Candidate per key was a third of that cost (`kvsched bench sched`, 10,000 sessions)."""
    p_reuse = (reuse_count + 1.0) / (reuse_count + 2.0)
    overdue = idle_s - 2.0 * next_use_s
    # NaN overdue (inf - inf: idle_s = inf and 2 * next_use_s overflows) is overdue, as in the kernels, which clamp
    # with NaN kept and take exp (found by review: it was skipped, a number here and NaN there)
    if overdue > 0.0 or overdue != overdue:
        p_reuse *= math.exp(-overdue / max(next_use_s, 1.0))
    wait_s = max(next_use_s - idle_s, 0.0) + 1.0
    nbytes = max(tokens * bytes_per_token, 1.0)
    return role_weight * p_reuse * recompute_cost_s(tokens) / (nbytes * wait_s)


def select_lowest(candidates: Sequence[Candidate], k: int) -> list[int]:
    """Indices of the k lowest-value unpinned candidates, lowest first, ties by index, a NaN value last (as the
    kernels order them; found by review: a NaN in the tuples made `sort` misorder the whole list)."""
    scored = []
    for i, c in enumerate(candidates):
        if not c.pinned:
            v = retention_value(c)
            scored.append((v != v, v, i))
    scored.sort()
    return [i for _, _, i in scored[: max(k, 0)]]
