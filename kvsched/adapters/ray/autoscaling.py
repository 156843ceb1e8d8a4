"""A Ray Serve autoscaling policy on the sizing guide's signals: queue depth (each engine's own, as the replica reports
it in `EngineReplica.record_autoscaling_stats`, plus the requests Ray's handles hold in front of saturated replicas)
and P95 TTFT, never GPU utilisation. The arithmetic is `kvsched.core.routing_autoscale.desired_replicas`; Ray applies
min/max bounds and the up/down delays around it.

Two TTFT readings (`kvsched.adapters.ray.stats`): `ttft_p95_fresh_s`, from first tokens since the replica's previous
report, is what a pool scales up on; `ttft_p95_s`, held for a while after the last sample, only keeps a pool from
scaling down. Found by review: the held value read as live pressure and scaled an idle pool up to its maximum.
"""

from __future__ import annotations

import math
import time
from typing import Any

from kvsched.core.routing_autoscale import AutoscaleTargets, ReplicaLoad, ScaleDecision, desired_replicas

POLICY_PATH = "kvsched.adapters.ray.autoscaling:QueueTTFTPolicy"
HELD_TTFT = "ttft_p95_s"
FRESH_TTFT = "ttft_p95_fresh_s"


def replica_loads(aggregated: dict[str, dict[Any, float]], replicas: list[Any],
                  ttft_key: str = FRESH_TTFT) -> list[ReplicaLoad]:
    """Per running replica: its queue depth and its P95 TTFT under `ttft_key` (absent or < 0: no samples)."""
    queue, ttft = aggregated.get("queue_depth", {}), aggregated.get(ttft_key, {})
    out = []
    for r in replicas:
        if r not in queue and r not in ttft:
            continue  # not reported yet (starting)
        t = ttft.get(r)
        out.append(ReplicaLoad(float(queue.get(r, 0.0)), float(t) if t is not None and t >= 0 else None))
    return out


def decide(current: int, aggregated: dict[str, dict[Any, float]], replicas: list[Any], targets: AutoscaleTargets,
           now_s: float, queued_in_ray: float = 0.0) -> ScaleDecision:
    """Scale on the fresh TTFT; a downscale happens only if the held TTFT would allow it too. `queued_in_ray`: requests
    Ray Serve's handles hold because every replica is at `max_ongoing_requests` (the engines never see them)."""
    fresh = desired_replicas(current, replica_loads(aggregated, replicas, FRESH_TTFT), targets, now_s=now_s,
                             last_change_s=None, queued_upstream=queued_in_ray)  # Ray's delays apply on top
    if fresh.replicas >= current:
        return fresh
    held = desired_replicas(current, replica_loads(aggregated, replicas, HELD_TTFT), targets, now_s=now_s,
                            last_change_s=None, queued_upstream=queued_in_ray)
    if held.replicas >= current:
        return ScaleDecision(current, f"steady: the recent p95 ttft keeps this size ({held.reason})")
    return fresh


START_GRACE_S = 600.0  # replicas asked for and not running after this long are not waited for (they may never fit)


def while_starting(decision: ScaleDecision, running: int, target: int, starting_for_s: float = 0.0) -> ScaleDecision:
    """The target to return for a decision made on the `running` replicas. Found by review: deciding on the target
    compounded while the replicas asked for were still loading their model (2 -> 4 -> 8 -> 16 in three ticks on the
    same two replicas' load). Up: never below the target, so a scale-up in progress is neither compounded nor
    cancelled; steady: the target stands; down: only while no replica is starting (running at or above the target),
    and never above the target. Replicas asked for `starting_for_s` ago and still not running (the cluster cannot
    place them) are held for at most START_GRACE_S: after that the decision on the running replicas stands, so an
    idle deployment scales down (found by review: it held its target at max for good)."""
    if starting_for_s > START_GRACE_S:
        return decision
    if decision.replicas > running:
        return ScaleDecision(max(decision.replicas, target), decision.reason)
    if decision.replicas < running and running >= target:
        return ScaleDecision(min(decision.replicas, target), decision.reason)
    if target != running:
        return ScaleDecision(target, f"steady: {abs(target - running)} replica(s) still "
                                     f"{'starting' if target > running else 'stopping'} ({decision.reason})")
    return decision


def queued_in_ray(ctx: Any) -> float:
    """`AutoscalingContext.total_queued_requests`: requests queued at the deployment's handles (None or absent: 0)."""
    try:
        queued = float(getattr(ctx, "total_queued_requests", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return queued if math.isfinite(queued) and queued > 0 else 0.0


class QueueTTFTPolicy:
    """Class policy: Ray instantiates it once with `policy_kwargs` (AutoscaleTargets fields) and calls it with an
    `AutoscalingContext` every control-loop tick."""

    def __init__(self, **targets: Any) -> None:
        self.targets = AutoscaleTargets(**targets)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        replicas = list(ctx.running_replicas)
        running = getattr(ctx, "current_num_replicas", None)
        running = int(running) if running is not None else len(replicas)
        now = ctx.current_time or time.time()
        target = int(ctx.target_num_replicas)
        state = dict(ctx.policy_state or {})
        if target > running:  # replicas starting: since when (kept in Ray's policy state between ticks)
            state.setdefault("kvsched_starting_since", now)
        else:
            state.pop("kvsched_starting_since", None)
        starting_for = now - state.get("kvsched_starting_since", now)
        decision = while_starting(decide(running, ctx.aggregated_metrics or {}, replicas, self.targets, now_s=now,
                                         queued_in_ray=queued_in_ray(ctx)), running, target, starting_for)
        state["kvsched_reason"] = decision.reason
        return decision.replicas, state
