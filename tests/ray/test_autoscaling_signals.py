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



BOUNDS = (0.1, 0.5, 1.0, 2.5, 5.0)


def ttft_metrics(counts: dict[float, int]) -> str:
    """vLLM's TTFT histogram, cumulative, with `counts` first tokens per bucket bound."""
    lines, total = ["# TYPE vllm:time_to_first_token_seconds histogram"], 0
    for b in BOUNDS:
        total += counts.get(b, 0)
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{b}",model_name="m"}} {total}')
    lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {total}')
    return "\n".join(lines) + "\n"


def test_a_fresh_p95_counts_only_from_enough_first_tokens() -> None:
    """Found by review: one slow first token (a cold 30k-token prefill) since the previous report was the whole
    "P95", and an idle one-replica pool was asked to grow to three. Fewer than MIN_TTFT_SAMPLES first tokens give no
    fresh P95; they count with the next ones, unless they gathered for longer than `hold_s`."""
    from kvsched.adapters.ray.autoscaling import decide
    from kvsched.adapters.ray.stats import ReplicaStats
    from kvsched.core.routing_autoscale import AutoscaleTargets

    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=60.0)
    st.update(ttft_metrics({0.1: 500}), None)
    assert st.fresh_ttft_p95() is not None  # 500 fast ones
    st.update(ttft_metrics({0.1: 500, 5.0: 1}), None)  # then one slow one, queue empty
    fresh = st.fresh_ttft_p95()
    assert fresh is None
    agg = {"queue_depth": {"r0": 0.0}, HELD_TTFT: {"r0": st.ttft_p95_s}}
    targets = AutoscaleTargets(min_replicas=1, max_replicas=4, ttft_p95_s=2.0)
    assert decide(1, agg, ["r0"], targets, now_s=100.0).replicas == 1
    from kvsched.adapters.ray.stats import MIN_TTFT_SAMPLES

    now[0] = 10.0  # more slow ones: with the first, enough for a P95
    st.update(ttft_metrics({0.1: 500, 5.0: MIN_TTFT_SAMPLES}), None)
    assert st.fresh_ttft_p95() > 2.5
    now[0] = 20.0
    st.update(ttft_metrics({0.1: 500, 5.0: MIN_TTFT_SAMPLES + 5}), None)
    assert st.fresh_ttft_p95() is None  # five since: too few
    now[0] = 100.0  # and too old to count with the next ones
    assert st.fresh_ttft_p95() is None
    st.update(ttft_metrics({0.1: 500 + MIN_TTFT_SAMPLES - 1, 5.0: MIN_TTFT_SAMPLES + 5}), None)
    assert st.fresh_ttft_p95() is None  # 19 fast ones since the old five were dropped
