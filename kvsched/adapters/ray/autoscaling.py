"""A Ray Serve autoscaling policy on the sizing guide's signals: queue depth (each engine's own, as the replica reports
it in `EngineReplica.record_autoscaling_stats`, plus the requests Ray's handles hold in front of saturated replicas)
and P95 TTFT, never GPU utilisation. The arithmetic is `kvsched.core.routing_autoscale.desired_replicas`; Ray applies
min/max bounds and the up/down delays around it.

The TTFT signal is the fleet's P95 (`fleet_ttft.py`): every replica's vLLM TTFT bucket counts over Ray's look-back
window, summed across replicas, the quantile interpolated as Prometheus does; from at least MIN_TTFT_SAMPLES first
tokens, else no TTFT signal; the last one is held for the pool's `autoscaling: {ttft_hold_s}` (default 60 s), only to
keep a pool from scaling down. Found by review: the policy read the slowest replica's P95, so one slow replica of
eight scaled a pool up whose P95 was fine.

Where the buckets cannot be merged (replicas with different bucket bounds, none reported), the replicas' own two
readings stand in, the slowest one's, and the decision's reason says so (`kvsched.adapters.ray.stats`):
`ttft_p95_fresh_s`, from first tokens since the replica's previous report, is what a pool scales up on; `ttft_p95_s`,
held for the same `ttft_hold_s` after the last sample (the replica is given it: `EngineReplica`), only keeps a pool
from scaling down. Found by review: the held value read as live pressure and scaled an idle pool up to its maximum.

A live replica whose engine metrics went unread past the grace (its `ttft_unread_s` over the pool's `autoscaling:
{unscraped_grace_s}`, default 60 s) is left out of the fleet's P95 and named in the reason; while any replica is
unread, within the grace or past it, the pool scales up on the others' signals but never down (its load is unknown;
found by review: within the grace a replica never read counted as an idle one, and a pool of three went to two).
A running replica none of whose reports is in Ray's window (just started, its first report not carried yet, or its
stats calls timing out) holds a scale-down the same way, as it holds the fleet's P95 (`unreported`).
`kvsched_ttft_replicas_unscraped` counts those past the grace in the policy's state and as a Ray gauge, which Ray's
Prometheus endpoint names
`ray_kvsched_ttft_replicas_unscraped` (`UNSCRAPED_GAUGE_EXPORTED`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from kvsched.adapters.ray.fleet_ttft import fleet_ttft, held_fleet_p95
from kvsched.core.routing_autoscale import (
    AutoscaleTargets,
    ReplicaLoad,
    ScaleDecision,
    desired_replicas,
    held_while_unread,
    held_while_unreported,
)
from kvsched.core.ttft_histogram import FleetQuantile

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
           now_s: float, queued_in_ray: float = 0.0, fleet: FleetQuantile | None = None,
           held_fleet_s: float | None = None) -> ScaleDecision:
    """Scale on the fresh TTFT; a downscale happens only if the held TTFT would allow it too. `queued_in_ray`: requests
    Ray Serve's handles hold because every replica is at `max_ongoing_requests` (the engines never see them).
    `fleet`: the fleet's P95 from the replicas' merged TTFT buckets (`fleet_ttft.py`): merged, it is the TTFT signal
    (`held_fleet_s` the held one) and the replicas' own P95s are not read; not merged (or None), the slowest
    replica's P95 stands in, and the reason says so."""
    if fleet is not None and fleet.merged:
        def fleet_rule(ttft: float | None) -> ScaleDecision:
            loads = [ReplicaLoad(r.queue_depth, None) for r in replica_loads(aggregated, replicas, FRESH_TTFT)]
            return desired_replicas(current, loads, targets, now_s=now_s, last_change_s=None,
                                    queued_upstream=queued_in_ray, fleet_ttft_p95_s=ttft)
        fresh, held = fleet_rule(fleet.value), fleet_rule(held_fleet_s)
        how = (f"ttft: fleet p95 {_s(fleet.value)} from the merged buckets of {fleet.replicas} of {len(replicas)} "
               f"replicas ({fleet.note})")
    else:
        def replica_rule(key: str) -> ScaleDecision:
            return desired_replicas(current, replica_loads(aggregated, replicas, key), targets, now_s=now_s,
                                    last_change_s=None, queued_upstream=queued_in_ray)  # Ray's delays apply on top
        fresh, held = replica_rule(FRESH_TTFT), replica_rule(HELD_TTFT)
        how = "ttft: slowest replica's p95" + (f" ({fleet.note})" if fleet is not None else "")
    if fresh.replicas >= current:
        return ScaleDecision(fresh.replicas, f"{fresh.reason}; {how}")
    if held.replicas >= current:
        return ScaleDecision(current, f"steady: the recent p95 ttft keeps this size ({held.reason}); {how}")
    down = held_while_unread(ScaleDecision(fresh.replicas, f"{fresh.reason}; {how}"), current,
                             fleet.unread if fleet is not None else ())
    return held_while_unreported(down, current, unreported(aggregated, replicas))


def unreported(aggregated: dict[str, dict[Any, float]], replicas: list[Any]) -> list[str]:
    """The running replicas in none of the window's reports (`EngineReplica.record_autoscaling_stats` always reports
    `queue_depth`, with its TTFT buckets or its unread seconds; Ray's raw and aggregated metrics come from the same
    reports, so one missing here has no buckets either)."""
    seen = {r for series in aggregated.values() for r in (series or {})}
    return [str(r) for r in replicas if r not in seen]


def _s(v: float | None) -> str:
    return "none" if v is None else f"{v:.3g} s"


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
        fleet = fleet_ttft(ctx, replicas, self.targets.unscraped_grace_s)
        held = held_fleet_p95(state, fleet, now, self.targets.ttft_hold_s) if fleet.merged else None
        decision = while_starting(decide(running, ctx.aggregated_metrics or {}, replicas, self.targets, now_s=now,
                                         queued_in_ray=queued_in_ray(ctx), fleet=fleet, held_fleet_s=held),
                                  running, target, starting_for)
        state["kvsched_reason"] = decision.reason
        state[UNSCRAPED_GAUGE] = len(fleet.unscraped)
        _export_unscraped(ctx, len(fleet.unscraped))
        return decision.replicas, state


UNSCRAPED_GAUGE = "kvsched_ttft_replicas_unscraped"
# The gauge's name on Ray's metrics endpoint: Ray prefixes its namespace to every application metric (checked on a
# real cluster: tests/ray/test_serve_unscraped.py), so a dashboard or alert must query this one.
UNSCRAPED_GAUGE_EXPORTED = f"ray_{UNSCRAPED_GAUGE}"
_gauge: Any = None


def _export_unscraped(ctx: Any, n: int) -> None:
    """The live replicas whose engine metrics went unread past the grace, as a Ray metric (`UNSCRAPED_GAUGE`, tagged
    with the deployment, `engine-<pool>`; exported as `UNSCRAPED_GAUGE_EXPORTED`) beside the policy state's count: an
    operator sees that the pool's P95 leaves replicas out. Best effort: a Ray that cannot export it still scales."""
    global _gauge
    try:
        if _gauge is None:
            from ray.util.metrics import Gauge

            _gauge = Gauge(UNSCRAPED_GAUGE, "live replicas whose engine metrics went unread past the grace: left out "
                                            "of the pool's P95 TTFT, no scale-down meanwhile", tag_keys=("deployment",))
        _gauge.set(n, tags={"deployment": str(getattr(ctx, "deployment_name", "") or "")})
    except Exception:  # noqa: BLE001 - the metric is for operators; the decision stands without it
        pass
