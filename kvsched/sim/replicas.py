"""Session-affine replay over N replicas: every session's requests go to one replica, chosen by the consistent-hash ring
the Ray router uses (`kvsched.core.routing_ring`, slots "slot-0".."slot-{N-1}"), and each replica replays its share
against its own pool under the same policy. What is not modelled: the router's bounded-load spill (a session stays on
its ring owner however loaded it is) and any KV shared across replicas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvsched.core.routing_ring import HashRing, slot_name
from kvsched.sim.compaction import served_session
from kvsched.sim.replay import ReplayConfig, ReplayResult, replay
from kvsched.sim.trace import Trace


def replica_of_sessions(trace: Trace, replicas: int) -> np.ndarray:
    """Replica index of every session of `trace`: its ring owner by session id; a compaction summary call's is its
    session's (`served_session`; found by review: the compaction side was replayed on one replica's pool)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    ring = HashRing(slot_name(i) for i in range(replicas))
    index: dict[str | None, int] = {slot_name(i): i for i in range(replicas)}
    return np.array([index[ring.owner(served_session(sid, trace.meta))] for sid, _ in trace.sessions], dtype=np.int64)


def merge_stats(parts: Sequence[dict[str, Any]], settings: frozenset[str], states: frozenset[str]) -> dict[str, Any]:
    """The fleet's policy stats: counts, capacities and peaks add up (each replica has its own pool and tier), a
    setting is every replica's (checked) and taken once, a state is listed per replica (found by review: settings
    were summed, so 4 replicas reported a tier block 4x the size)."""
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        values = [p[k] for p in parts if k in p]
        if k in settings:
            if any(v != values[0] for v in values):
                raise RuntimeError(f"replicas disagree on the setting {k}: {values}")
            out[k] = values[0]
        else:
            out[k] = values if k in states else sum(values)
    return out


def replay_replicas(trace: Trace, policy: str, cfg: ReplayConfig, replicas: int,
                    progress: Callable[[int], None] | None = None) -> tuple[ReplayResult, list[int]]:
    """Replay each replica's share with `cfg` (its pool is `cfg.capacity_blocks`); returns the fleet's sums and the
    requests each replica served. Peaks add up (each replica holds its own), TTFTs are pooled, the policy's stats
    merge as `merge_stats` says."""
    owner = replica_of_sessions(trace, replicas)[trace.session]
    total = ReplayResult(policy=policy)
    parts: list[ReplayResult] = []
    served: list[int] = []
    for r in range(replicas):
        share = trace.subset(owner == r)
        served.append(len(share))
        if not len(share):
            continue
        part = replay(share, policy, cfg, progress)
        parts.append(part)
        for name in ("requests", "rejected", "prompt_tokens_total", "hit_tokens", "restored_tokens",
                     "peak_held_blocks", "evictions"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.wall_s += part.wall_s
        total.stat_kinds = part.stat_kinds
    total.policy_stats = merge_stats([p.policy_stats for p in parts], *total.stat_kinds)
    # a state listed at its replica's index, None for a replica that served nothing (found by review: left out, so
    # the list was shorter than `served` and entry k was not replica k's)
    ran = [r for r in range(replicas) if served[r]]
    for k in total.stat_kinds[1] & total.policy_stats.keys():
        if len(total.policy_stats[k]) == len(ran):
            by_replica = dict(zip(ran, total.policy_stats[k], strict=True))
            total.policy_stats[k] = [by_replica.get(r) for r in range(replicas)]
    total.ttft_s = np.concatenate([p.ttft_s for p in parts]) if parts else np.empty(0)
    total.wait_s = np.concatenate([p.wait_s for p in parts]) if parts else np.empty(0)
    return total, served
