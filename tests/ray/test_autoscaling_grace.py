"""The grace a live replica's engine metrics may go unread before the pool's P95 leaves it out and the pool stops
scaling down: a pool setting, `autoscaling: {unscraped_grace_s}` (default 60 s, the constant it was), reaching the
policy (Ray's `policy_kwargs`) and the engine replicas (`describe`, shown at `GET /kvsched/replicas`), refused at
start-up when it is no finite number of seconds > 0. The behaviour itself: test_autoscaling_unscraped.py, and on a real
Ray cluster test_serve_unscraped.py."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray import stats as stats_module
from kvsched.adapters.ray.autoscaling import UNSCRAPED_GAUGE, QueueTTFTPolicy
from kvsched.adapters.ray.config import parse_config
from kvsched.adapters.ray.stats import ReplicaStats
from kvsched.core.routing_autoscale import AutoscaleTargets
from kvsched.core.ttft_histogram import UNSCRAPED_GRACE_S
from tests.ray.test_autoscaling_signals import fleet_ctx, reports
from tests.ray.test_autoscaling_unscraped import failing_replica, with_unread
from tests.ray.test_autoscaling_window import pool


def test_the_grace_reaches_the_policy_and_the_engine_replicas() -> None:
    from kvsched.adapters.ray.app import build_app, engine_args, engine_options

    cfg = parse_config(pool(unscraped_grace_s=20))
    assert engine_options(cfg.pools[0], cfg)["autoscaling_config"].policy.policy_kwargs["unscraped_grace_s"] == 20.0
    engine = build_app(cfg)._bound_deployment.init_args[1]["w"]._bound_deployment
    assert engine.init_args == engine_args(cfg.pools[0]) and engine.init_args[2] == 20.0
    default = parse_config(pool())
    assert default.pools[0].autoscaling.unscraped_grace_s == UNSCRAPED_GRACE_S == 60.0  # the constant it was
    fixed = parse_config({"pools": [{"name": "w", "model": "/m", "replicas": 2}]})  # no policy: the default labels
    assert engine_args(fixed.pools[0])[2] == UNSCRAPED_GRACE_S


def test_a_shorter_grace_leaves_out_a_replica_the_default_still_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """r0 and r1 idle and fast, r2's metrics failing for 30 s: within the default minute it is waited for (no fleet
    value); with `unscraped_grace_s: 20` it is left out by name, counted, and the pool of three does not shrink."""
    unread = failing_replica(monkeypatch, [100.0, 130.0])

    def decide(**targets: object) -> tuple[int, dict]:
        window = with_unread(reports({"r0": [{}, {0.1: 100}], "r1": [{}, {0.1: 100}]}), unread)
        return QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0, **targets)(fleet_ctx(window, 1000.0))

    _, state = decide()
    assert "r2's engine metrics not read yet" in state["kvsched_reason"] and state[UNSCRAPED_GAUGE] == 0
    n, state = decide(unscraped_grace_s=20)
    reason = state["kvsched_reason"]
    assert n == 3 and reason.startswith("steady: no scale-down while replica(s) r2 cannot be read"), reason
    assert "engine metrics unread: r2 (30 s)" in reason and state[UNSCRAPED_GAUGE] == 1


def test_a_longer_grace_waits_for_a_replica_the_default_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    unread = failing_replica(monkeypatch, [100.0, 190.0])  # 90 s unread: past the default minute
    window = with_unread(reports({"r0": [{}, {0.1: 100}], "r1": [{}, {0.1: 100}]}), unread)
    _, state = QueueTTFTPolicy(ttft_p95_s=2.0, unscraped_grace_s=120)(fleet_ctx(window, 1000.0))
    assert "r2's engine metrics not read yet" in state["kvsched_reason"] and state[UNSCRAPED_GAUGE] == 0


def test_the_replica_calls_its_engine_metrics_stale_by_the_pools_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """`GET /kvsched/replicas` shows `describe`: the replica's label must agree with the policy's grace."""
    from kvsched.adapters.ray.engine import EngineReplica

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("metrics endpoint down")

    monkeypatch.setattr(stats_module, "get", refused)  # the replica's GET of its engine
    now = [100.0]
    stats = ReplicaStats("http://127.0.0.1:9", clock=lambda: now[0])
    for t in (100.0, 130.0):
        now[0] = t
        with pytest.raises(OSError):
            stats.poll()
    cls = getattr(EngineReplica, "func_or_class", EngineReplica)

    def described(grace_s: float) -> dict:
        replica = cls.__new__(cls)
        replica.pool, replica.replica_id, replica.stats, replica.unscraped_grace_s = "w", "r2", stats, grace_s
        replica.server = SimpleNamespace(proc=None, base="http://127.0.0.1:9")
        return replica.describe()

    assert described(UNSCRAPED_GRACE_S)["engine_metrics"] == "failing"
    assert described(20.0)["engine_metrics"] == "never read" and described(20.0)["engine_metrics_unread_s"] == 30.0


def test_the_readme_names_every_autoscaling_key_and_the_gauge_as_ray_exports_it() -> None:
    """Found on a real cluster (test_serve_unscraped.py): Ray's metrics endpoint exports the gauge as
    `ray_kvsched_ttft_replicas_unscraped`; README named only `kvsched_ttft_replicas_unscraped`, which no query finds."""
    from dataclasses import fields

    from kvsched.adapters.ray.autoscaling import UNSCRAPED_GAUGE_EXPORTED

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"`{UNSCRAPED_GAUGE_EXPORTED}" in readme
    assert not [f.name for f in fields(AutoscaleTargets) if not re.search(rf"[`{{ ]{f.name}[`,}}]", readme)]
