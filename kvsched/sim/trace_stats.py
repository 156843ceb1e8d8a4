"""What a trace says about retention before any replay (`kvsched trace stats`): its sessions and turns, the idle
gaps between a session's turns (what share of returns a pin held for a given TTL would still be there for), how much
of each prompt repeats its session's previous request, and the KV it needs against the pool it was recorded on.

Issue 24 started from exactly these figures (Mooncake's conversations: 94% of gaps over the 30 s default TTL, 69% of
sessions single-turn); for a recording of one's own engine (`KVSCHED_RECORD_TRACE`) they come first, the replay
(`kvsched simulate`) second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvsched.sim.trace import Trace

DEFAULT_TTLS = (30.0, 120.0, 600.0)


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    q = np.quantile(values, [0.5, 0.9, 0.99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(values.max())}


def _shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    k = min(len(a), len(b))
    differ = np.flatnonzero(a[:k] != b[:k])
    return int(differ[0]) if len(differ) else k


def trace_stats(trace: Trace, ttls: tuple[float, ...] = DEFAULT_TTLS) -> dict[str, Any]:
    """The trace's figures (JSON-ready). A gap runs from a turn's finish (its `duration_s`, when recorded; else its
    arrival) to the session's next arrival: the time a pin must last for the next turn to find it."""
    n = len(trace)
    turns = np.bincount(trace.session, minlength=len(trace.sessions)) if n else np.zeros(0, dtype=np.int64)
    finish = trace.t + (np.nan_to_num(trace.duration_s) if trace.duration_s is not None else 0.0)
    gaps: list[float] = []
    repeated = 0
    last: dict[int, int] = {}  # session -> its previous request (the trace is in arrival order)
    for i in range(n):
        s = int(trace.session[i])
        j = last.get(s)
        if j is not None:
            gaps.append(max(float(trace.t[i] - finish[j]), 0.0))
            # of this prompt's full blocks only (found by review: a resent prompt counted its output's blocks too)
            full = int(trace.prompt_tokens[i]) // trace.block_size
            shared = min(_shared_prefix(trace.blocks(j), trace.blocks(i)), full)
            repeated += shared * trace.block_size
        last[s] = i
    gap = np.asarray(gaps, dtype=np.float64)
    prompt = int(trace.prompt_tokens.sum())
    live = trace.peak_live_blocks()
    capacity = trace.recorded_capacity_blocks
    return {
        "requests": n, "sessions": int(len(turns)), "single_turn_sessions": int((turns == 1).sum()),
        "span_s": float(trace.t[-1] - trace.t[0]) if n else 0.0,
        "turns_per_session": _quantiles(turns.astype(np.float64)),
        "gap_basis": "finish_to_arrival" if trace.duration_s is not None else "arrival_to_arrival",
        "gaps": len(gap), "gap_s": _quantiles(gap),
        "returns_within_ttl": {f"{ttl:g}": float((gap <= ttl).mean()) if len(gap) else None for ttl in ttls},
        "prompt_tokens": _quantiles(trace.prompt_tokens.astype(np.float64)),
        "output_tokens": _quantiles(trace.output_tokens.astype(np.float64)),
        "prompt_tokens_total": prompt,
        # tokens a request repeats of its session's previous one (full blocks): what retention could serve at best
        "repeated_prompt_share": repeated / prompt if prompt else None,
        "block_size": trace.block_size, "distinct_blocks": trace.working_set_blocks(), "peak_live_blocks": live,
        "capacity_blocks": capacity,
        "live_pressure_at_capacity": live / capacity if capacity else None,
    }


def describe(stats: dict[str, Any]) -> str:
    """The figures in a few plain lines."""
    s = stats
    lines = [f"{s['requests']:,} requests over {s['span_s']:,.0f} s, {s['sessions']:,} sessions "
             f"({s['single_turn_sessions']:,} single-turn)"]
    if s["gap_s"]:
        g = s["gap_s"]
        within = ", ".join(f"{v:.0%} within {k} s" for k, v in s["returns_within_ttl"].items())
        lines.append(f"gaps between a session's turns ({s['gap_basis'].replace('_', ' ')}): median {g['p50']:.1f} s, "
                     f"p90 {g['p90']:.1f} s, p99 {g['p99']:.1f} s; {within}")
    p, share = s["prompt_tokens"], s["repeated_prompt_share"]
    if p:
        repeat = f"; {share:.0%} of prompt tokens repeat the session's previous request" if share is not None else ""
        lines.append(f"prompts: median {p['p50']:,.0f} tokens, p90 {p['p90']:,.0f}{repeat}")
    pressure = s["live_pressure_at_capacity"]
    lines.append(f"KV: {s['distinct_blocks']:,} distinct blocks of {s['block_size']} tokens, peak live set "
                 f"{s['peak_live_blocks']:,}" + (f" = {pressure:.2f}x the recorded pool of {s['capacity_blocks']:,}"
                                                 if pressure is not None else ""))
    return "\n".join(lines)
