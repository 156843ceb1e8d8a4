"""A running replica none of whose reports reached the policy in Ray's look-back window (no queue depth, no TTFT
buckets: it has just started and Ray's metrics push has not carried its first report yet, or its stats calls time
out): its load is unknown, so the pool does not scale down on the others' alone, as it does not while a replica's
engine metrics go unread (test_autoscaling_unscraped.py). Stop 57 withheld the fleet's P95 for such a replica (no
scale-up on the others' P95: test_autoscaling_signals.py); the scale-down path still went ahead, an idle pool of two
shrinking to one under a replica that had said nothing yet. Pure: no cluster."""

from __future__ import annotations

from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy
from tests.ray.test_autoscaling_signals import fleet_ctx, reports

IDLE = {0.1: 100}  # r0's counts: 100 fast first tokens before the window, none in it


def idle_pool(with_r1_report: bool, now: float = 1000.0) -> object:
    """Two running replicas: r0 idle (queue 0, its buckets unchanged over the window); r1 reporting as idle too,
    or (`with_r1_report` False) not at all."""
    counts = {"r0": [IDLE, IDLE, IDLE]} | ({"r1": [IDLE, IDLE, IDLE]} if with_r1_report else {})
    ctx = fleet_ctx(reports(counts), now=now)
    ctx.running_replicas, ctx.current_num_replicas, ctx.target_num_replicas = ["r0", "r1"], 2, 2
    return ctx


def test_an_idle_pool_does_not_scale_down_while_a_running_replica_has_reported_nothing() -> None:
    n, state = QueueTTFTPolicy(min_replicas=1, max_replicas=4, ttft_p95_s=2.0)(idle_pool(with_r1_report=False))
    assert n == 2, state["kvsched_reason"]  # before: 1 ("down: load at 0.00x target")
    assert "no scale-down while replica(s) r1 have reported nothing" in state["kvsched_reason"], state
    assert "down: load at 0.00x target" in state["kvsched_reason"]  # the decision it holds, named


def test_once_the_replica_reports_idle_the_idle_pool_scales_down() -> None:
    """The hold lasts while the replica is silent, not for good: its first reports (idle) let the pool shrink."""
    n, state = QueueTTFTPolicy(min_replicas=1, max_replicas=4, ttft_p95_s=2.0)(idle_pool(with_r1_report=True))
    assert n == 1 and state["kvsched_reason"].startswith("down: load at 0.00x target"), state["kvsched_reason"]


def test_a_scale_up_on_the_reporting_replicas_queues_stands() -> None:
    """As for an unread replica: the replicas that report show the pressure; the silent one holds only a shrink."""
    ctx = idle_pool(with_r1_report=False)
    ctx.aggregated_metrics["queue_depth"] = {"r0": 40.0}
    n, state = QueueTTFTPolicy(min_replicas=1, max_replicas=4, queue_per_replica=4.0, ttft_p95_s=2.0)(ctx)
    assert n == 4 and state["kvsched_reason"].startswith("up: queue depth"), state["kvsched_reason"]
