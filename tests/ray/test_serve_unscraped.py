"""A replica whose engine metrics are unreachable, on a real Ray Serve cluster on loopback: kvsched's ingress, its
autoscaling policy (recording each decision, `standin_ttft.RecordingPolicy`) and two engine replicas that read their
engine's `/metrics` over HTTP with kvsched's own stats code (`standin_metrics.py`, no vLLM). Rank 1's endpoint closes
every connection from the start; the pool's grace is 3 s (`autoscaling: {unscraped_grace_s: 3}`). Past it:
`GET /kvsched/replicas` calls that replica "never read", the pool's P95 is rank 0's only (under 0.1 s, where rank 1's
first tokens would put it over 0.5 s), the policy names it and holds the pool at two, and Ray's metrics endpoint
exports `ray_kvsched_ttft_replicas_unscraped` (the name README gives) at 1. Then the endpoint answers again: the
replica reads "ok", the P95 is both replicas' (over 0.5 s in every window where rank 1 brought first tokens, which the
policy records from Ray's raw points), the gauge reads 0 and the policy asks to scale the idle pool down.
(Ray's downscale delay is 600 s: what is checked is the policy's decisions; the pool itself stays at two.)"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsched.adapters.ray.autoscaling import UNSCRAPED_GAUGE, UNSCRAPED_GAUGE_EXPORTED
from kvsched.core.ttft_histogram import UNSCRAPED_GRACE_S

pytestmark = pytest.mark.integration
GRACE_S = 3.0


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """Polls `probe` until it returns something true (a wait for Ray's reports to arrive, not a timing assert)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def pool(serve_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    from kvsched.adapters.ray.app import engine_args, engine_options
    from kvsched.adapters.ray.config import parse_config
    from kvsched.adapters.ray.ingress import OpenAIIngress
    from tests.ray.shared_cluster import QUICK_DRAIN, deployed
    from tests.ray.standin_metrics import MetricsStandInEngine

    tmp = tmp_path_factory.mktemp("unscraped")
    (tmp / "rank-1").touch()  # rank 1's engine metrics unreachable from its start
    report = tmp / "decisions.jsonl"
    cfg = parse_config({"http": {"host": "127.0.0.1", "port": serve_cluster["port"]}, "router": {"stats_period_s": 1},
                        "pools": [{"name": "w", "model": "/m", "num_cpus": 0, "replicas": 2, "autoscaling": {
                            "min_replicas": 1, "max_replicas": 4, "ttft_p95_s": 4.0, "unscraped_grace_s": GRACE_S}}]})
    w = cfg.pools[0]
    opts = engine_options(w, cfg)
    auto = opts["autoscaling_config"]
    assert auto.policy.policy_kwargs["unscraped_grace_s"] == GRACE_S  # the pool's setting, as build_app passes it
    opts["autoscaling_config"] = AutoscalingConfig(  # Ray's windows made short, the policy recording its decisions
        min_replicas=auto.min_replicas, max_replicas=auto.max_replicas, initial_replicas=2, upscale_delay_s=0,
        downscale_delay_s=600, look_back_period_s=5, metrics_interval_s=1,
        policy=AutoscalingPolicy(policy_function="tests.ray.standin_ttft:RecordingPolicy",
                                 policy_kwargs={**auto.policy.policy_kwargs, "report_path": str(report)}))
    engine = serve.deployment(MetricsStandInEngine).options(**{**opts, **QUICK_DRAIN}).bind(*engine_args(w), str(tmp))
    ingress = serve.deployment(OpenAIIngress).options(name="ingress", num_replicas=1,
                                                      ray_actor_options={"num_cpus": 0}, **QUICK_DRAIN)
    with deployed(ingress.bind(cfg.to_dict(), {"w": engine})):
        yield {"base": serve_cluster["base"], "metrics": serve_cluster["metrics"], "block": tmp / "rank-1",
               "report": report}


def replicas(base: str) -> dict[int, dict[str, Any]]:
    """`GET /kvsched/replicas` by slot ({} while the ingress cannot answer yet)."""
    try:
        return {r["slot"]: r for r in json.loads(get(base + "/kvsched/replicas"))["replicas"]}
    except OSError:  # HTTPError and URLError among them
        return {}


def metrics_state(base: str, slot: int) -> str | None:
    return replicas(base).get(slot, {}).get("engine_metrics")


def decisions(report: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []


def fleet_p95(reason: str) -> float | None:
    m = re.search(r"fleet p95 ([0-9.e+-]+) s from the merged buckets", reason)
    return float(m.group(1)) if m else None


def gauge(url: str) -> list[tuple[str, float]]:
    """The unscraped gauge's samples on Ray's metrics endpoint, under whatever prefix Ray gives it: (the sample line's
    name and labels, value)."""
    out = []
    for line in get(url).splitlines():
        if UNSCRAPED_GAUGE in line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            out.append((head, float(value)))
    return out


def test_a_replica_never_read_is_named_left_out_and_holds_the_pool_until_read_again(pool: dict[str, Any]) -> None:
    base, report = pool["base"], pool["report"]
    seen = wait_for("rank 1 named never read, rank 0 read", lambda: (lambda rs: rs if len(rs) == 2 and (
        rs[0]["engine_metrics"], rs[1]["engine_metrics"]) == ("ok", "never read") else None)(replicas(base)))
    assert seen[1]["engine_metrics_unread_s"] >= GRACE_S, seen  # (rounded to 0.1 s)
    blocked_id = seen[1]["replica_id"]

    def left_out() -> list[dict[str, Any]]:
        """The decisions naming an unread replica, both replicas running (while one starts, the policy holds the
        target for it: `while_starting`)."""
        return [r for r in decisions(report) if r["running"] == 2 and "engine metrics unread:" in (r["reason"] or "")]

    rows = wait_for("decisions leaving rank 1 out, with rank 0's P95", lambda: (lambda rs: rs if len(
        [r for r in rs if fleet_p95(r["reason"]) is not None]) >= 3 else None)(left_out()))
    for r in rows:  # named, left out, the pool held at two
        assert blocked_id in r["reason"] and "the P95 is the other replicas' only" in r["reason"], r
        assert r["replicas"] == 2 and r["reason"].startswith("steady"), r
    for r in [r for r in rows if fleet_p95(r["reason"]) is not None]:  # (none while rank 0 has no window yet)
        assert "merged buckets of 1 of 2 replicas" in r["reason"] and (fleet_p95(r["reason"]) or 1.0) < 0.1, r
        assert r["reason"].startswith(f"steady: no scale-down while replica(s) Replica(id='{blocked_id}'"), r
    unread = [int(m.group(1)) for r in rows if (m := re.search(r"\((\d+) s\), left out", r["reason"]))]
    assert len(unread) == len(rows) and min(unread) < UNSCRAPED_GRACE_S, unread  # left out by the pool's grace
    exported = wait_for("the gauge at 1 on Ray's metrics endpoint",
                        lambda: [g for g in gauge(pool["metrics"]) if g[1] == 1.0])
    assert any(head.startswith(UNSCRAPED_GAUGE_EXPORTED + "{") and 'deployment="engine-w"' in head
               for head, _ in exported), exported  # the name README gives: Ray prefixes `ray_`

    pool["block"].unlink()  # the endpoint answers again
    wait_for("rank 1 read again", lambda: metrics_state(base, 1) == "ok")
    start = len(decisions(report))

    def down() -> list[dict[str, Any]]:
        return [r for r in decisions(report)[start:] if "merged buckets of 2 of 2 replicas" in (r["reason"] or "")
                and r["reason"].startswith("down:")]

    def slow_in(r: dict[str, Any]) -> float:
        """Rank 1's first tokens in the decision's window (Ray's raw points: `standin_ttft.window_first_tokens`)."""
        return float(r["windows"].get(blocked_id, [0, 0.0])[1])

    wait_for("decisions on both replicas' buckets, rank 1's first tokens in their window",
             lambda: (lambda rs: rs if len(rs) >= 3 else None)([r for r in down() if slow_in(r) > 0]))
    for r in down():  # both replicas merged; the idle pool may shrink
        assert r["replicas"] == 1 and "engine metrics unread" not in r["reason"], r
        # Rank 1's first tokens (0.5-1 s) now in the P95, in every window that holds some. A window may hold none:
        # read again, rank 1's first scrape is a baseline (it adds nothing), and two reports of it before its next
        # poll make a window of it with no first tokens (found under load: the P95 was then rank 0's, 0.095 s).
        p95 = fleet_p95(r["reason"]) or 0.0
        assert (0.5 < p95 <= 1.0) if slow_in(r) > 0 else p95 < 0.1, r
    wait_for("the gauge back at 0", lambda: [g for g in gauge(pool["metrics"]) if g[1] == 0.0])
