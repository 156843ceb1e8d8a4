"""kvsched's autoscaling policy on a real Ray Serve cluster: the TTFT bucket counts the engine replicas report reach
the policy through Ray (`AutoscalingContext.raw_metrics`) and are merged into the fleet's P95. Two stand-in replicas
(`standin_ttft.py`, no vLLM), one slow on 10% of its first tokens (its own P95 3.75 s over a 2 s target): the pool's
P95 is under 0.1 s and the pool stays at two (the slowest replica's P95 scaled it to four). With two CPU burners
beside it, the slow replica ran five seconds before the other: until the other's reports reached Ray the pool's P95
was the slow one's alone and the policy asked for four (`fleet_ttft` now gives no P95 until both have a window)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_the_policy_merges_the_replicas_ttft_buckets_reported_through_ray(tmp_path: Path,
                                                                           serve_cluster: dict[str, Any]) -> None:
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    from kvsched.adapters.ray.app import engine_options
    from kvsched.adapters.ray.config import parse_config
    from tests.ray.shared_cluster import QUICK_DRAIN, deployed
    from tests.ray.standin_ttft import TTFTStandInEngine

    report = tmp_path / "decisions.jsonl"
    cfg = parse_config({"router": {"stats_period_s": 1}, "pools": [
        {"name": "w", "model": "/m", "num_cpus": 0, "replicas": 2,
         "autoscaling": {"min_replicas": 2, "max_replicas": 4, "ttft_p95_s": 2.0, "upscale_delay_s": 0}}]})
    pool = cfg.pools[0]
    opts = engine_options(pool, cfg)
    auto = opts["autoscaling_config"]
    opts["autoscaling_config"] = AutoscalingConfig(
        min_replicas=auto.min_replicas, max_replicas=auto.max_replicas, initial_replicas=2, upscale_delay_s=0,
        downscale_delay_s=600, look_back_period_s=5, metrics_interval_s=1,
        policy=AutoscalingPolicy(policy_function="tests.ray.standin_ttft:RecordingPolicy",
                                 policy_kwargs={**auto.policy.policy_kwargs, "report_path": str(report)}))
    app = serve.deployment(TTFTStandInEngine).options(**{**opts, **QUICK_DRAIN}).bind(pool.name,
                                                                                      pool.engine.model_dump())
    with deployed(app, name="kvsched-autoscale", route_prefix=None):
        merged: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a wait for Ray's reports to arrive, not a timing assert
            rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
            assert all(r["replicas"] <= 2 for r in rows), [r for r in rows if r["replicas"] > 2][:3]
            merged = [r for r in rows if r["running"] == 2 and "fleet p95 none" not in (r["reason"] or "none")
                      and "merged buckets of 2 of 2 replicas" in r["reason"]]
            if len(merged) >= 3:
                break
            time.sleep(0.2)
        assert len(merged) >= 3, rows[-5:]
        for r in merged:  # 3,090 of each 3,100 first tokens under 0.1 s: the P95 is in that bucket (about 0.095 s)
            p95 = re.search(r"fleet p95 ([0-9.e+-]+) s from the merged buckets", r["reason"])
            assert r["replicas"] == 2 and p95 is not None and 0.09 < float(p95.group(1)) < 0.1, r
