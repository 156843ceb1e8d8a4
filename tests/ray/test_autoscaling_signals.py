"""What the autoscaling policy reads as pressure: requests queued in Ray in front of the engines, and a P95 TTFT only
from enough first tokens to have one."""

from __future__ import annotations

from types import SimpleNamespace

from kvsched.adapters.ray.autoscaling import FRESH_TTFT, HELD_TTFT, QueueTTFTPolicy


def ctx(queued_in_ray: float | None, replicas: int = 2, ttft: float = 0.6) -> SimpleNamespace:
    names = [f"r{i}" for i in range(replicas)]
    return SimpleNamespace(running_replicas=names, current_num_replicas=replicas, target_num_replicas=replicas,
                           current_time=1000.0, policy_state={}, total_queued_requests=queued_in_ray,
                           aggregated_metrics={"queue_depth": {r: 0.0 for r in names},
                                               FRESH_TTFT: {r: ttft for r in names},
                                               HELD_TTFT: {r: ttft for r in names}})


def test_requests_queued_in_ray_count_as_queue_depth() -> None:
    """Found by review: with every replica at max_ongoing_requests, Ray's handles hold the rest; the engines report
    no queue and vLLM's TTFT starts at the engine, so 500 requests waiting in Ray on 2 replicas read as steady (and an
    idle-looking pool could scale down under the backlog)."""
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, queue_per_replica=4.0, ttft_p95_s=2.0)
    n, state = policy(ctx(500.0))
    assert n == 8 and "queue" in state["kvsched_reason"]
    assert policy(ctx(6.0))[0] == 2  # 6 waiting on 2 replicas: under 4 each, over the downscale share: steady
    assert policy(ctx(None, ttft=0.1))[0] == 1  # nothing queued anywhere (Ray may give None): idle, down one

