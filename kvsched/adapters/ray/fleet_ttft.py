"""The fleet's P95 TTFT for the autoscaling policy, from the replicas' own vLLM histograms as Ray carries them.

Each engine replica reports its `vllm:time_to_first_token_seconds` bucket counts, cumulative since its first scrape
with each engine's counter resets taken out (`kvsched.adapters.ray.stats`), one autoscaling metric per bound
(`ttft_le:0.25`, ..., `ttft_le:+Inf`; `EngineReplica.record_autoscaling_stats`). Ray keeps each replica's points for
`look_back_period_s` (a pool's `autoscaling: {look_back_period_s}`) and hands them to the policy as
`AutoscalingContext.raw_metrics` (its `aggregated_metrics` are time-averages, which would blur a counter); the points
recorded together share a timestamp, so each timestamp is one scrape, and the first in the window is its baseline.
Each replica also reports `ttft_unread_s`, for how long its engine's metrics have gone unread (0 while read): one
unread past the grace (the pool's `autoscaling: {unscraped_grace_s}`, default 60 s) is left out of the P95 and named,
the P95 then being the others' only (found by review: a replica whose metrics failed from its start reported no
buckets and was silently left out).
The arithmetic (window increase over each replica's own window as a rate, counter resets, merge, quantile) is
`kvsched.core.ttft_histogram`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from kvsched.adapters.ray.stats import MIN_TTFT_SAMPLES
from kvsched.core.ttft_histogram import (
    TTFT_HOLD_S,
    UNSCRAPED_GRACE_S,
    FleetQuantile,
    bucket_bound,
    bucket_key,
    fleet_quantile,
)

HELD_STATE = "kvsched_fleet_ttft_p95"  # [seconds, when] in the policy's state
UNREAD_TTFT = "ttft_unread_s"  # a replica's report: seconds its engine metrics have gone unread (0: read)


def bucket_stats(buckets: Mapping[float, float]) -> dict[str, float]:
    """A replica's cumulative TTFT bucket counts as autoscaling metrics (none before its first scrape, zeros at it)."""
    return {bucket_key(b): float(c) for b, c in buckets.items()}


def _point(p: Any) -> tuple[float, float]:
    """A Ray `TimeStampedValue` (or a `(timestamp, value)` pair) as a pair."""
    if isinstance(p, tuple | list):
        return float(p[0]), float(p[1])
    return float(p.timestamp), float(p.value)


def replica_scrapes(raw: Mapping[str, Mapping[Any, Any]],
                    replicas: list[Any]) -> dict[Any, list[tuple[float, dict[float, float]]]]:
    """Per running replica that reports TTFT buckets: its scrapes in the window, `(timestamp, buckets)` oldest first."""
    by_replica: dict[Any, dict[float, dict[float, float]]] = {}
    running = set(replicas)
    for name, series in raw.items():
        bound = bucket_bound(name)
        if bound is None:
            continue
        for replica, points in series.items():
            if replica not in running:
                continue
            at = by_replica.setdefault(replica, {})
            for p in points or ():
                t, v = _point(p)
                at.setdefault(t, {})[bound] = v
    return {r: [(t, at[t]) for t in sorted(at)] for r, at in by_replica.items() if at}


def replica_unread(raw: Mapping[str, Mapping[Any, Any]], replicas: list[Any]) -> dict[Any, float]:
    """Per running replica: for how long its engine metrics have gone unread (`UNREAD_TTFT`, its latest report)."""
    out: dict[Any, float] = {}
    running = set(replicas)
    for replica, points in (raw.get(UNREAD_TTFT) or {}).items():
        pairs = [_point(p) for p in points or ()] if replica in running else []
        if pairs:
            out[replica] = max(pairs)[1]
    return out


def fleet_ttft(ctx: Any, replicas: list[Any], grace_s: float = UNSCRAPED_GRACE_S) -> FleetQuantile:
    """The fleet's P95 TTFT over Ray's look-back window, leaving out (and naming) replicas whose engine metrics went
    unread past `grace_s` (the pool's `autoscaling: {unscraped_grace_s}`)."""
    try:
        raw = ctx.raw_metrics or {}
    except Exception:  # noqa: BLE001 - a Ray without raw metrics, or one failing to build them: fall back
        raw = {}
    windows = replica_scrapes(raw, replicas)
    fleet = fleet_quantile(windows, 0.95, min_samples=MIN_TTFT_SAMPLES, unread_s=replica_unread(raw, replicas),
                           grace_s=grace_s)
    # A running replica none of whose reports in the window carries TTFT buckets (its first reports not yet pushed,
    # or timed out) is waited for, as one with a single scrape is: found on a real Ray cluster on a loaded host, the
    # slow replica of two had a window, the other none, and the pool asked for four replicas on the slow one's P95.
    # (One unread past the grace stays left out and named; none with buckets at all: not merged, as before.)
    silent = [r for r in replicas if r not in windows and str(r) not in fleet.unscraped]
    if silent and fleet.value is not None:
        return replace(fleet, value=None, note=f"replica {silent[0]} has reported no TTFT buckets yet; {fleet.note}")
    return fleet


def held_fleet_p95(state: dict[str, Any], fleet: FleetQuantile, now_s: float,
                   hold_s: float = TTFT_HOLD_S) -> float | None:
    """The fleet P95 that keeps a pool from scaling down: this window's, else the last one for `hold_s` (the pool's
    `autoscaling: {ttft_hold_s}`; kept in the policy's state). Like the replicas' held P95: a quiet window does not
    read as "fast"."""
    if fleet.value is not None:
        state[HELD_STATE] = [fleet.value, now_s]
        return fleet.value
    held = state.get(HELD_STATE)
    if isinstance(held, list | tuple) and len(held) == 2 and now_s - float(held[1]) <= hold_s:
        value = float(held[0])
        return value if math.isfinite(value) else None
    state.pop(HELD_STATE, None)
    return None
