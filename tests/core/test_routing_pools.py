"""Pool choice (model, role, long-context threshold) and the queue-depth / P95-TTFT autoscaling decision."""

from __future__ import annotations

import pytest

from kvsched.core.routing import RoutingConfigError
from kvsched.core.routing_autoscale import AutoscaleTargets, ReplicaLoad, desired_replicas
from kvsched.core.routing_pools import PoolRouting, PoolRule, PoolSelector, UnknownModel

POOLS = PoolRouting(pools=(
    PoolRule("orchestrator", models=("llama-70b",), roles=("orchestrator",)),
    PoolRule("workers", models=("llama-8b",), roles=("worker", "critic")),
    PoolRule("workers-fast", models=("llama-8b",), roles=("summarizer",)),
    PoolRule("long", models=("llama-8b",), long_context=True),
), long_context_tokens=16_000)


def test_pool_by_model_then_role() -> None:
    sel = PoolSelector(POOLS)
    assert sel.select("llama-70b").name == "orchestrator"
    assert sel.select("llama-8b").name == "workers"
    assert sel.select("llama-8b", role="summarizer").name == "workers-fast"
    assert sel.select(None, role="orchestrator").name == "orchestrator"
    assert sel.select(None).name == "orchestrator"  # first non-long pool


def test_unknown_model_is_a_typed_error_naming_the_served_models() -> None:
    with pytest.raises(UnknownModel, match="llama-8b"):
        PoolSelector(POOLS).select("gpt-7")


def test_long_sessions_move_to_the_long_pool_and_stay_there() -> None:
    sel = PoolSelector(POOLS)
    assert sel.select("llama-8b", session_id="a", session_tokens=15_000).name == "workers"
    assert sel.select("llama-8b", session_id="a", session_tokens=16_001).name == "long"
    assert sel.select("llama-8b", session_id="a", session_tokens=900).name == "long"  # compacted: KV is there
    assert sel.select("llama-8b", session_id="b", session_tokens=900).name == "workers"
    # the long pool does not serve the orchestrator's model: a long orchestrator session stays in its pool
    assert sel.select("llama-70b", session_id="c", session_tokens=50_000).name == "orchestrator"
    sel.forget("a")  # the session ended: a new one under its id starts by its own size
    assert sel.select("llama-8b", session_id="a", session_tokens=900).name == "workers"


@pytest.mark.parametrize("kw", [
    {"pools": ()},
    {"pools": (PoolRule("a"), PoolRule("a"))},
    {"pools": (PoolRule("a"),), "default_pool": "b"},
    {"pools": (PoolRule("a"),), "long_context_tokens": 100},
    {"pools": (PoolRule("a", long_context=True), PoolRule("b", long_context=True))},
    {"pools": (PoolRule("a"), PoolRule("l", long_context=True)), "long_context_tokens": 0},
])
def test_bad_pool_config_is_a_typed_error(kw: dict[str, object]) -> None:
    with pytest.raises(RoutingConfigError):
        PoolRouting(**kw)  # type: ignore[arg-type]


def test_bad_pool_name_is_a_typed_error() -> None:
    with pytest.raises(RoutingConfigError):
        PoolRule("no spaces")


T = AutoscaleTargets(min_replicas=1, max_replicas=8, queue_per_replica=4, ttft_p95_s=2.0, upscale_delay_s=10,
                     downscale_delay_s=60)


def test_scale_up_on_queue_depth_proportionally() -> None:
    d = desired_replicas(2, [ReplicaLoad(12, 0.5), ReplicaLoad(12, 0.5)], T, now_s=100, last_change_s=None)
    assert d.replicas == 6 and "queue" in d.reason  # 24 waiting / (4 x 2) = 3x target


def test_scale_up_on_p95_ttft_even_with_short_queues() -> None:
    d = desired_replicas(2, [ReplicaLoad(0, 5.0), ReplicaLoad(0, 0.1)], T, now_s=100, last_change_s=None)
    assert d.replicas == 5 and "ttft" in d.reason


def test_scale_up_waits_for_its_delay_and_stops_at_max() -> None:
    hot = [ReplicaLoad(100, 9.0)]
    assert desired_replicas(1, hot, T, now_s=100, last_change_s=95).replicas == 1
    assert desired_replicas(1, hot, T, now_s=100, last_change_s=80).replicas == 8


def test_scale_down_one_at_a_time_after_cool_down() -> None:
    idle = [ReplicaLoad(0, 0.1)] * 3
    assert desired_replicas(3, idle, T, now_s=100, last_change_s=90).replicas == 3
    assert desired_replicas(3, idle, T, now_s=100, last_change_s=30).replicas == 2
    assert desired_replicas(1, [ReplicaLoad(0, 0.1)], T, now_s=100, last_change_s=None).replicas == 1


def test_steady_between_thresholds_and_bounds_enforced() -> None:
    assert desired_replicas(2, [ReplicaLoad(3, 1.5)] * 2, T, now_s=100, last_change_s=None).reason == "steady"
    assert desired_replicas(12, [], T, now_s=100, last_change_s=None).replicas == 8


@pytest.mark.parametrize("kw", [{"min_replicas": -1}, {"max_replicas": 0}, {"min_replicas": 3, "max_replicas": 2},
                                {"queue_per_replica": 0}, {"ttft_p95_s": float("inf")}, {"downscale_below": 1.0}])
def test_bad_autoscale_targets_are_a_typed_error(kw: dict[str, object]) -> None:
    with pytest.raises(RoutingConfigError):
        AutoscaleTargets(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_report_reads_as_missing(bad: float) -> None:
    """Found by review: an infinite queue depth or TTFT raised OverflowError in Ray's control loop."""
    t = AutoscaleTargets(min_replicas=1, max_replicas=8, ttft_p95_s=2.0)
    assert desired_replicas(3, [ReplicaLoad(bad, bad)], t, 0.0, None).replicas == 3  # no finite report: no change
    assert desired_replicas(3, [ReplicaLoad(bad, 4.0)], t, 0.0, None).replicas == 6  # the finite TTFT still counts
    assert desired_replicas(3, [ReplicaLoad(1e308, bad)], t, 0.0, None).replicas == 8
    assert desired_replicas(20, [ReplicaLoad(0.0, 1e308)], AutoscaleTargets(max_replicas=40, ttft_p95_s=1e-3),
                            0.0, None).replicas == 40
