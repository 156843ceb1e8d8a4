"""How long the last P95 TTFT keeps a pool from scaling down once too few first tokens follow it: a pool setting,
`autoscaling: {ttft_hold_s}` (default 60 s, the constants it was: `fleet_ttft.HOLD_S` and `ReplicaStats.hold_s`),
one knob for the fleet's held P95 (the policy) and each replica's own (where the buckets do not merge), refused at
start-up when it is no finite number of seconds > 0. The counting's own span (`ServerCounts.hold_s`, the fresh P95's
gathering) is not the hold: a hold shorter than the polls must not stop the first tokens from counting."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray.autoscaling import FRESH_TTFT, HELD_TTFT, QueueTTFTPolicy
from kvsched.adapters.ray.config import parse_config
from kvsched.adapters.ray.stats import ReplicaStats
from kvsched.cli import main
from kvsched.core.ttft_histogram import SERIES_SPAN_S, TTFT_HOLD_S, UNSCRAPED_GRACE_S
from tests.ray.test_autoscaling_signals import fleet_ctx, reports, ttft_metrics
from tests.ray.test_autoscaling_window import pool

BUSY = {0.1: 90, 2.5: 10}  # a fleet P95 of 1.75 s: under a 2 s target, over its downscale share (1 s)


def quiet_pool(hold_s: float | None, quiet_for_s: float) -> tuple[int, str]:
    """Two replicas: a busy window (fleet P95 1.75 s), then `quiet_for_s` seconds with no first tokens and no queue:
    the replica count the policy asks for then, and why."""
    targets = {} if hold_s is None else {"ttft_hold_s": hold_s}
    window = reports({"r0": [{}, BUSY, BUSY, BUSY], "r1": [{}, BUSY, BUSY, BUSY]})
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0, **targets)
    n, state = policy(fleet_ctx(window[:2], now=1000.0))
    assert n == 2 and "fleet p95 1.75 s" in state["kvsched_reason"], state["kvsched_reason"]
    n, state = policy(fleet_ctx(window[2:], now=1000.0 + quiet_for_s, state=state))  # an empty window
    return n, state["kvsched_reason"]


def test_a_short_hold_lets_a_quiet_pool_scale_down_after_it_the_default_does_not() -> None:
    n, reason = quiet_pool(5.0, 6.0)
    assert n == 1 and reason.startswith("down: load at"), reason
    n, reason = quiet_pool(None, 6.0)
    assert n == 2 and reason.startswith("steady: the recent p95 ttft keeps this size"), reason
    n, reason = quiet_pool(5.0, 4.0)  # within the short hold: held as before
    assert n == 2 and reason.startswith("steady: the recent p95 ttft keeps this size"), reason


def test_a_long_hold_keeps_a_quiet_pool_past_the_default_minute() -> None:
    n, reason = quiet_pool(None, 61.0)
    assert n == 1 and reason.startswith("down:"), reason
    n, reason = quiet_pool(300.0, 61.0)
    assert n == 2 and reason.startswith("steady: the recent p95 ttft keeps this size"), reason


def replica_hold(hold_s: float, quiet_for_s: float) -> int:
    """Where the buckets do not merge (none reported here): one replica's own held P95 (4.8 s from 20 slow first
    tokens) after `quiet_for_s` seconds with no new ones, in a pool of two: the replicas the policy asks for."""
    from kvsched.adapters.ray.engine import EngineReplica

    record = getattr(EngineReplica, "func_or_class", EngineReplica).record_autoscaling_stats
    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=hold_s)

    async def fresh_stats() -> dict:
        return st.snapshot()

    replica = SimpleNamespace(stats=st, _fresh_stats=fresh_stats)
    st.update(ttft_metrics({}), None)  # the baseline
    st.update(ttft_metrics({5.0: 20}), None)
    assert asyncio.run(record(replica))[FRESH_TTFT] > 2.0  # reported fresh once (that report scaled up)
    now[0] = quiet_for_s
    st.update(ttft_metrics({5.0: 20}), None)  # nothing new since
    got = asyncio.run(record(replica))
    agg = {k: {"r1": v, **({"r2": 0.0} if k == "queue_depth" else {})} for k, v in got.items()
           if k in ("queue_depth", HELD_TTFT, FRESH_TTFT)}
    ctx = SimpleNamespace(aggregated_metrics=agg, running_replicas=["r1", "r2"], target_num_replicas=2,
                          current_time=1000.0, policy_state={})
    return QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0, ttft_hold_s=hold_s)(ctx)[0]


def test_the_replicas_own_held_p95_follows_the_same_hold() -> None:
    assert replica_hold(5.0, 6.0) == 1  # past the pool's hold: the idle pool may shrink
    assert replica_hold(TTFT_HOLD_S, 6.0) == 2  # the default minute: held, as before


def test_a_hold_shorter_than_the_polls_still_counts_the_first_tokens() -> None:
    """Ray asks for a replica's stats every 10 s: had the hold been the counting's span too, each poll would be a new
    baseline (a series unseen for longer), no first token would count, and the pool would have no TTFT signal."""
    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=5.0)
    assert st.span_s == SERIES_SPAN_S
    for t, fast in ((0.0, 0), (10.0, 40), (20.0, 80)):
        now[0] = t
        st.update(ttft_metrics({0.1: fast}), None)
    assert st.ttft_buckets[math.inf] == 80
    assert st.fresh_ttft_p95() is not None  # and the fresh P95 from them, which only scales up


def test_the_hold_reaches_the_policy_and_the_engine_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvsched.adapters.ray import engine as engine_mod
    from kvsched.adapters.ray.app import build_app, engine_args, engine_options

    cfg = parse_config(pool(ttft_hold_s=15))
    assert engine_options(cfg.pools[0], cfg)["autoscaling_config"].policy.policy_kwargs["ttft_hold_s"] == 15.0
    bound = build_app(cfg)._bound_deployment.init_args[1]["w"]._bound_deployment
    assert bound.init_args == engine_args(cfg.pools[0]) and bound.init_args[3] == 15.0
    assert parse_config(pool()).pools[0].autoscaling.ttft_hold_s == TTFT_HOLD_S == 60.0  # the constants it was
    fixed = parse_config({"pools": [{"name": "w", "model": "/m", "replicas": 2}]})  # no policy: the default
    assert engine_args(fixed.pools[0])[3] == TTFT_HOLD_S
    # the replica holds its own P95 as long (its engine not started: a server that is not there)
    monkeypatch.setattr(engine_mod, "VllmServer", lambda spec, **kw: SimpleNamespace(base="http://x", proc=None))
    monkeypatch.setattr(engine_mod, "start_with_reaper", lambda server: None)
    cls = getattr(engine_mod.EngineReplica, "func_or_class", engine_mod.EngineReplica)
    replica = cls(*bound.init_args)
    assert replica.stats.hold_s == 15.0 and replica.stats.span_s == SERIES_SPAN_S


def test_ray_serve_dry_run_shows_both_settings_defaults_included(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`--dry-run` prints what the pool scales by: the hold and the grace, set or (the second pool) defaulted."""
    path = tmp_path / "pools.yaml"
    path.write_text("pools:\n  - {name: a, model: /m, models: [a], autoscaling: {min_replicas: 1, ttft_hold_s: 17, "
                    "unscraped_grace_s: 23}}\n  - {name: b, model: /m, models: [b], autoscaling: {min_replicas: 1}}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    a, b = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  pool ")]
    assert "(ttft_hold_s 17s: " in a and "; unscraped_grace_s 23s: " in a, a
    assert f"(ttft_hold_s {TTFT_HOLD_S:g}s: " in b and f"; unscraped_grace_s {UNSCRAPED_GRACE_S:g}s: " in b, b
