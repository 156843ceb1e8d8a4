"""A Ray Serve autoscaling policy on the sizing guide's signals: engine queue depth and P95 TTFT, as each engine
replica reports them (`EngineReplica.record_autoscaling_stats`), never GPU utilisation. The arithmetic is
`kvsched.core.routing_autoscale.desired_replicas`; Ray applies min/max bounds and the up/down delays around it.
"""

from __future__ import annotations

import time
from typing import Any

from kvsched.core.routing_autoscale import AutoscaleTargets, ReplicaLoad, desired_replicas

POLICY_PATH = "kvsched.adapters.ray.autoscaling:QueueTTFTPolicy"


def replica_loads(aggregated: dict[str, dict[Any, float]], replicas: list[Any]) -> list[ReplicaLoad]:
    """Per running replica: its queue depth and P95 TTFT (reported as -1 when it has no recent samples)."""
    queue, ttft = aggregated.get("queue_depth", {}), aggregated.get("ttft_p95_s", {})
    out = []
    for r in replicas:
        if r not in queue and r not in ttft:
            continue  # not reported yet (starting)
        t = ttft.get(r)
        out.append(ReplicaLoad(float(queue.get(r, 0.0)), float(t) if t is not None and t >= 0 else None))
    return out


class QueueTTFTPolicy:
    """Class policy: Ray instantiates it once with `policy_kwargs` (AutoscaleTargets fields) and calls it with an
    `AutoscalingContext` every control-loop tick."""

    def __init__(self, **targets: Any) -> None:
        self.targets = AutoscaleTargets(**targets)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        aggregated = ctx.aggregated_metrics or {}
        loads = replica_loads(aggregated, list(ctx.running_replicas))
        current = int(ctx.target_num_replicas)
        decision = desired_replicas(current, loads, self.targets, now_s=ctx.current_time or time.time(),
                                    last_change_s=None)  # Ray's upscale/downscale delays apply on top
        state = dict(ctx.policy_state or {})
        state["kvsched_reason"] = decision.reason
        return decision.replicas, state
