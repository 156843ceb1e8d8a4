"""How many engine replicas a pool wants, from queue depth and P95 time-to-first-token.

The sizing guide says to scale agent fleets on queue depth or P95 TTFT, not on GPU utilisation: a queue growing by
ten requests a minute overwhelms a fleet in twenty minutes even at 70% utilisation. Scale up when either signal is
above its target (proportionally, like Ray Serve's default policy does for ongoing requests); scale down one replica
at a time, only when both are well below target and the last change is older than the cool-down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvsched.core.routing import RoutingConfigError
from kvsched.core.ttft_histogram import TTFT_HOLD_S, UNSCRAPED_GRACE_S


@dataclass(frozen=True, slots=True)
class AutoscaleTargets:
    """`queue_per_replica`: waiting requests per replica (engine queue, not running batch); `ttft_p95_s`: seconds;
    `downscale_below`: share of both targets under which a replica may go; delays in seconds; `look_back_period_s`:
    the window the signals are taken over, in seconds (the orchestrator's: Ray Serve's `look_back_period_s`, whose
    default this is; the P95 TTFT is the fleet's over it, the queue depth its average); `unscraped_grace_s`: how long
    a live replica's engine metrics may go unread, in seconds, before the pool's P95 leaves it out and the pool stops
    scaling down (`ttft_histogram.fleet_quantile`). Within it the replica's last counts (none, if never read) stand,
    so Ray's `downscale_delay_s` is what keeps the pool from shrinking meanwhile: keep it the longer of the two;
    `ttft_hold_s`: how long the last P95 TTFT keeps the pool from scaling down once too few first tokens follow it, in
    seconds (the fleet's, and where the buckets do not merge each replica's own held one; it never scales up)."""

    min_replicas: int = 1
    max_replicas: int = 4
    queue_per_replica: float = 4.0
    ttft_p95_s: float = 2.0
    downscale_below: float = 0.5
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    look_back_period_s: float = 30.0
    unscraped_grace_s: float = UNSCRAPED_GRACE_S
    ttft_hold_s: float = TTFT_HOLD_S

    def __post_init__(self) -> None:
        if not isinstance(self.min_replicas, int) or self.min_replicas < 0:
            raise RoutingConfigError(f"min_replicas must be an integer >= 0, got {self.min_replicas!r}")
        if not isinstance(self.max_replicas, int) or self.max_replicas < max(1, self.min_replicas):
            raise RoutingConfigError(f"max_replicas must be an integer >= max(1, min_replicas), got "
                                     f"{self.max_replicas!r}")
        for name in ("queue_per_replica", "ttft_p95_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise RoutingConfigError(f"{name} must be a positive number, got {v!r}")
        if not 0 < self.downscale_below < 1:
            raise RoutingConfigError(f"downscale_below must be in (0, 1), got {self.downscale_below!r}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise RoutingConfigError("upscale_delay_s and downscale_delay_s must be >= 0")
        for name in ("look_back_period_s", "unscraped_grace_s", "ttft_hold_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise RoutingConfigError(f"{name} must be a finite number of seconds > 0, got {v!r}")


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's own report: requests waiting in its engine queue and its recent P95 TTFT (None: no samples)."""

    queue_depth: float
    ttft_p95_s: float | None


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    replicas: int
    reason: str


def desired_replicas(current: int, loads: Iterable[ReplicaLoad], targets: AutoscaleTargets, now_s: float,
                     last_change_s: float | None, queued_upstream: float = 0.0,
                     fleet_ttft_p95_s: float | None = None) -> ScaleDecision:
    """The replica count to ask for. `last_change_s`: when the count last changed (None: never); `queued_upstream`:
    requests waiting before any engine took them (in Ray Serve's handles, every replica at `max_ongoing_requests`),
    counted in the queue with the engines' own. Found by review: only the engines' queues counted, so 500 requests
    held in Ray in front of two saturated replicas read as no queue, and a pool could scale down under a backlog.
    `fleet_ttft_p95_s`: the fleet's P95 TTFT from the replicas' merged histograms (`ttft_histogram.fleet_quantile`);
    given, it is the TTFT signal and the replicas' own P95s are not read; None: no fleet value (the caller passes the
    loads' TTFTs, or None in them for "no TTFT signal")."""
    rows = _finite(loads)
    upstream = max(0.0, queued_upstream) if math.isfinite(queued_upstream) else 0.0
    clamp = min(max(current, targets.min_replicas), targets.max_replicas)
    if clamp != current:
        return ScaleDecision(clamp, "bounds")
    if not rows and not upstream:
        return ScaleDecision(current, "no reports")
    queue = upstream + sum(max(0.0, r.queue_depth) for r in rows)
    ttfts = [r.ttft_p95_s for r in rows if r.ttft_p95_s is not None]
    # Without a fleet value, the slowest replica's P95 (a fallback: it is an upper bound of the fleet's, as a mixture's
    # quantile lies between its parts'; a mean weighted by samples would not be the fleet's P95 either and would hide
    # one slow replica). The fleet's P95 comes from the merged bucket counts (found by review: with eight replicas and
    # one slow on 10% of its first tokens, the slowest replica's 3.75 s P95 scaled up a fleet whose P95 was 0.1 s).
    if fleet_ttft_p95_s is not None and math.isfinite(fleet_ttft_p95_s):
        ttft = max(0.0, fleet_ttft_p95_s)
    else:
        ttft = max(ttfts) if ttfts else 0.0
    queue_ratio = queue / (targets.queue_per_replica * max(current, 1))
    ttft_ratio = ttft / targets.ttft_p95_s
    since = math.inf if last_change_s is None else now_s - last_change_s
    pressure = max(queue_ratio, ttft_ratio)
    if pressure > 1.0 and current < targets.max_replicas:
        if since < targets.upscale_delay_s:
            return ScaleDecision(current, "up: waiting for upscale delay")
        want = min(targets.max_replicas, max(current + 1, math.ceil(min(current * pressure, targets.max_replicas))))
        signal = "queue depth" if queue_ratio >= ttft_ratio else "p95 ttft"
        return ScaleDecision(want, f"up: {signal} at {pressure:.2f}x target")
    if pressure < targets.downscale_below and current > targets.min_replicas:
        if since < targets.downscale_delay_s:
            return ScaleDecision(current, "down: waiting for downscale delay")
        return ScaleDecision(current - 1, f"down: load at {pressure:.2f}x target")
    return ScaleDecision(current, "steady")


def held_while_unread(decision: ScaleDecision, current: int, unread: Sequence[str]) -> ScaleDecision:
    """`decision`, but no scale-down while live replicas' load is unknown (`unread`: their engine metrics unread now,
    within the grace or past it, `ttft_histogram.FleetQuantile.unread`): the others' P95 and queues say nothing of
    theirs, and a replica whose scrapes time out may be the busiest. A scale-up stands: the replicas that are read
    show the pressure."""
    if not unread or decision.replicas >= current:
        return decision
    return ScaleDecision(current, f"steady: no scale-down while replica(s) {_names(unread)} cannot be read "
                                  f"({decision.reason})")


def held_while_unreported(decision: ScaleDecision, current: int, unreported: Sequence[str]) -> ScaleDecision:
    """`decision`, but no scale-down while running replicas have reported nothing (`unreported`: none of their
    reports reached the policy in the window: just started, their first report not carried yet, or their stats calls
    timing out). As for an unread replica, their load is unknown: the fleet's P95 already waits for them before it
    scales up (found by review: it did not before it scaled down, and an idle pool of two shrank to one under a
    replica that had said nothing yet). A scale-up stands."""
    if not unreported or decision.replicas >= current:
        return decision
    return ScaleDecision(current, f"steady: no scale-down while replica(s) {_names(unreported)} have reported nothing "
                                  f"({decision.reason})")


def _names(replicas: Sequence[str]) -> str:
    return ", ".join(replicas[:3]) + (" ..." if len(replicas) > 3 else "")


def _finite(loads: Iterable[ReplicaLoad]) -> list[ReplicaLoad]:
    """The reports with a non-finite reading (an overflowed or broken gauge) read as missing, and a replica with no
    finite reading as not reported (found by review: inf raised OverflowError in the control loop)."""
    out = []
    for r in loads:
        queue = r.queue_depth if math.isfinite(r.queue_depth) else None
        ttft = r.ttft_p95_s if r.ttft_p95_s is not None and math.isfinite(r.ttft_p95_s) else None
        if queue is not None or ttft is not None:
            out.append(ReplicaLoad(queue or 0.0, ttft))
    return out
