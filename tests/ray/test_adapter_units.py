"""The Ray adapter without a cluster: config loading, replica stats, the request router with fake replicas, the
autoscaling policy (the reaper: test_reaper.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray.config import ConfigError, config_from_dict, load_config, parse_config
from kvsched.adapters.ray.stats import ReplicaStats, histogram_quantile
from kvsched.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ray"
POOL = {"name": "w", "model": "/m"}


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "agents-gpu.yaml"])
def test_example_configs_load_and_survive_the_trip_to_replicas(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert config_from_dict(cfg.to_dict()) == cfg
    cfg.routing()


def test_gpu_pools_default_to_one_gpu_and_cpu_pools_to_none() -> None:
    cfg = parse_config({"pools": [dict(POOL, device="gpu"), dict(POOL, name="c")]})
    assert [p.num_gpus for p in cfg.pools] == [1.0, 0.0]


@pytest.mark.parametrize("raw, key", [
    ({"pools": []}, "pools"),
    ({"pools": [POOL], "colour": 1}, "colour"),
    ({"pools": [{"name": "w"}]}, "model"),
    ({"pools": [dict(POOL, device="tpu")]}, "device"),
    ({"pools": [dict(POOL, num_gpus=1)]}, "num_gpus"),
    ({"pools": [dict(POOL, replicas=0)]}, "replicas"),
    ({"pools": [dict(POOL, replicas=True)]}, "replicas"),
    ({"pools": [dict(POOL, max_model_len="8k")]}, "max_model_len"),
    ({"pools": [dict(POOL, autoscaling={"max_replicas": 0})]}, "max_replicas"),
    ({"pools": [dict(POOL, autoscaling={"target": 3})]}, "target"),
    ({"pools": [POOL], "router": {"load_factor": 0.9}}, "load_factor"),
    ({"pools": [POOL], "long_context_tokens": 1000}, "long_context"),
    ({"pools": [POOL, POOL]}, "unique"),
    ({"pools": [POOL], "http": {"port": "80"}}, "port"),
    ({"pools": [POOL], "http": {"port": 70000}}, "http.port"),
    ({"pools": [POOL], "router": {"load_floor": "lots"}}, "router.load_floor"),
    ({"pools": [POOL], "router": {"stats_period_s": 0}}, "router.stats_period_s"),
    ({"pools": [dict(POOL, models=["a", 3])]}, r"pools\[0\].models\[1\]"),
    ({"pools": [dict(POOL, vllm_args="--x")]}, "vllm_args"),
    ({"pools": "w"}, "pools"),
    ({"pools": [POOL], "request_deadline_s": -1}, "request_deadline_s"),
    ({"pools": [POOL], "max_json_depth": 0}, "max_json_depth"),
])
def test_bad_config_is_a_config_error_naming_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(raw)


def test_config_errors_say_where_and_what_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"pools": [dict(POOL, colour=1, replicas=True)]})
    assert str(err.value) == "pools[0].replicas: Input should be a valid integer; pools[0].colour: unknown key"
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        parse_config([])


def test_yaml_numbers_in_command_lines_and_env_are_words_and_the_floor_follows_the_pool() -> None:
    from kvsched.adapters.ray.app import engine_options

    cfg = parse_config({"pools": [dict(POOL, vllm_args=["--max-num-seqs", 192], env={"A": 1},
                                       max_ongoing_requests=20)]})
    assert cfg.pools[0].engine.vllm_args == ["--max-num-seqs", "192"] and cfg.pools[0].engine.env == {"A": "1"}
    kwargs = engine_options(cfg.pools[0], cfg)["request_router_config"].request_router_kwargs
    assert kwargs["load_floor"] == 10  # auto: half of max_ongoing_requests
    fixed = parse_config({"pools": [POOL], "router": {"load_floor": 3}})
    assert engine_options(fixed.pools[0], fixed)["request_router_config"].request_router_kwargs["load_floor"] == 3


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_ray_serve_dry_run_and_bad_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray-serve", str(EXAMPLES / "tiny-cpu.yaml"), "--dry-run"]) == 0
    assert "pool tiny" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [{name: w}]\n")
    assert main(["ray-serve", str(bad), "--dry-run"]) == 2
    assert "model" in capsys.readouterr().err


def test_app_builder_wires_the_router_and_autoscaling_policy() -> None:
    from kvsched.adapters.ray.app import ROUTER_PATH, engine_options

    cfg = load_config(EXAMPLES / "agents-gpu.yaml")
    workers = next(p for p in cfg.pools if p.name == "workers")
    opts = engine_options(workers, cfg)
    assert opts["request_router_config"].request_router_class == ROUTER_PATH
    assert opts["request_router_config"].request_router_kwargs["load_factor"] == 1.25
    assert opts["request_router_config"].request_router_kwargs["load_floor"] == 16
    auto = opts["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas) == (2, 8) and "num_replicas" not in opts
    assert auto.policy.policy_kwargs["queue_per_replica"] == 4
    assert opts["ray_actor_options"]["num_gpus"] == 1.0


# ---- replica stats ---------------------------------------------------------------------------------------------
def metrics(buckets: dict[str, float], waiting: float = 0) -> str:
    lines = [f"vllm:num_requests_waiting{{engine=\"0\"}} {waiting}"]
    lines += [f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}"}} {c}' for le, c in buckets.items()]
    return "\n".join(lines)


def test_metrics_are_read_from_the_exposition_format_vllm_writes() -> None:
    from kvsched.adapters.ray.stats import read_metrics

    text = "\n".join([
        "# HELP vllm:num_requests_waiting Number of requests waiting.", "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0',
        'vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny"} 4.0',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 5.0',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 5.0',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.9', ""])
    scrape = read_metrics(text)
    assert scrape.gauges == {"vllm:num_requests_waiting": 3.0}
    assert scrape.ttft_buckets == {0.1: 4.0, float("inf"): 5.0}
    with pytest.raises(ValueError):
        read_metrics("vllm:broken{le= 1\n")


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    assert histogram_quantile({0.1: 0, 0.5: 100, float("inf"): 100}, 0.5) == pytest.approx(0.3)
    assert histogram_quantile({0.1: 0, float("inf"): 0}, 0.95) is None


def test_replica_stats_use_recent_ttft_and_list_pinned_sessions() -> None:
    now = [0.0]
    st = ReplicaStats("http://x", hold_s=10, clock=lambda: now[0])
    st.update(metrics({"0.1": 0, "1.0": 0, "+Inf": 0}), None)  # a fresh server: the baseline
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 100}, waiting=3),
              {"sessions": [{"session_id": "a", "pinned_blocks": 2}, {"session_id": "b", "pinned_blocks": 0}]})
    assert st.queue_depth == 3 and st.kv_sessions == ["a"] and st.ttft_p95_s == pytest.approx(0.55)
    # the next window: 20 new requests, all slower than 1 s; the old fast ones no longer count
    now[0] = 5
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s == pytest.approx(1.0) and st.kv_sessions == ["a"]
    now[0] = 8
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s == pytest.approx(1.0)  # nothing new: held
    now[0] = 30  # nothing new for longer than hold_s: no signal rather than a stale one
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s is None


# ---- autoscaling policy ----------------------------------------------------------------------------------------
def test_autoscaling_policy_reads_replica_reported_queue_and_ttft() -> None:
    from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy

    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=6, queue_per_replica=2, ttft_p95_s=1.0)
    ctx = SimpleNamespace(aggregated_metrics={"queue_depth": {"r1": 6.0, "r2": 6.0}, "ttft_p95_fresh_s": {"r1": -1.0}},
                          running_replicas=["r1", "r2"], target_num_replicas=2, current_time=10.0, policy_state={})
    n, state = policy(ctx)
    assert n == 6 and "queue" in state["kvsched_reason"]
    ctx.aggregated_metrics = {"queue_depth": {"r1": 0.0, "r2": 0.0}, "ttft_p95_fresh_s": {"r1": 3.0, "r2": -1.0}}
    assert policy(ctx)[0] == 6


def test_a_scale_up_in_progress_neither_compounds_nor_is_cancelled_while_replicas_start() -> None:
    """Found by review: the policy scaled from the target, not the running replicas, so the same two replicas' load
    asked for 2 -> 4 -> 8 -> 16 over three ticks while the new replicas loaded their model."""
    from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy

    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=16, ttft_p95_s=2.0)
    running, target = ["r0", "r1"], 2

    def tick(ttft: float, queue: float = 1.0) -> int:
        ctx = SimpleNamespace(target_num_replicas=target, current_num_replicas=len(running), running_replicas=running,
                              aggregated_metrics={"queue_depth": {r: queue for r in running},
                                                  "ttft_p95_fresh_s": {r: ttft for r in running}},
                              policy_state={}, current_time=100.0)
        return policy(ctx)[0]

    for _ in range(4):  # one decision per upscale delay while the two new replicas start
        target = tick(4.0)
        assert target == 4
    assert tick(1.0) == 4 and tick(0.0, queue=0.0) == 4  # calm, or idle: the scale-up in progress stands
    running = ["r0", "r1", "r2", "r3"]
    assert tick(0.0, queue=0.0) == 3  # all four up and idle: down one at a time


def test_replicas_that_never_start_are_not_waited_for_past_the_grace() -> None:
    """Found by review: with replicas asked for that the cluster could not place, an idle deployment held its target
    at max for good ("steady: 4 replica(s) still starting")."""
    from kvsched.adapters.ray.autoscaling import START_GRACE_S, QueueTTFTPolicy

    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0)
    running, state = ["r0", "r1", "r2", "r3"], {}

    def tick(now: float) -> int:
        nonlocal state
        ctx = SimpleNamespace(target_num_replicas=8, current_num_replicas=len(running), running_replicas=running,
                              aggregated_metrics={"queue_depth": {r: 0.0 for r in running},
                                                  "ttft_p95_fresh_s": {r: 0.0 for r in running}},
                              policy_state=state, current_time=now)
        target, state = policy(ctx)
        return target

    assert tick(1000.0) == 8 and tick(1000.0 + START_GRACE_S / 2) == 8  # still starting: the scale-up stands
    assert tick(1001.0 + START_GRACE_S) == 3  # never placed: the four running, idle, scale down


def test_a_held_ttft_keeps_an_idle_pool_from_scaling_down_but_never_scales_it_up() -> None:
    """Found by review: the P95 TTFT a replica holds for `hold_s` after its last sample read as live pressure, and an
    idle pool scaled 2 -> 5 -> 8. The engine reports what it holds and what is fresh; the policy scales up on fresh
    samples only. (What the engine reports, through `EngineReplica.record_autoscaling_stats`.)"""
    import asyncio

    from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy
    from kvsched.adapters.ray.engine import EngineReplica

    record = getattr(EngineReplica, "func_or_class", EngineReplica).record_autoscaling_stats
    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0])
    replica = SimpleNamespace(stats=st, _fresh_stats=None)

    async def fresh_stats() -> dict:
        return st.snapshot()

    replica._fresh_stats = fresh_stats
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0)

    def tick(slow: int, target: int) -> int:
        st.update(metrics({"1.0": 0, "5.0": slow, "+Inf": slow}), {"pinned_session_ids": []})
        got = asyncio.run(record(replica))
        agg = {name: {"r1": v, "r2": 0.0} if name == "queue_depth" else {"r1": v} for name, v in got.items()}
        ctx = SimpleNamespace(aggregated_metrics=agg, running_replicas=["r1", "r2"], target_num_replicas=target,
                              current_time=now[0], policy_state={})
        return policy(ctx)[0]

    st.update(metrics({"1.0": 0, "5.0": 0, "+Inf": 0}), None)  # a fresh server: the baseline
    assert tick(20, 2) > 2  # a burst of slow first tokens: fresh pressure scales up
    for t in (10, 20, 30, 40, 50):  # then nothing new, queue empty: the held P95 stays 4.8 s
        now[0] = t
        assert tick(20, 2) == 2, t  # neither up (stale) nor down (it held within the last minute)
    now[0] = 120  # past hold_s: no TTFT at all, the pool may shrink
    assert tick(20, 2) == 1


# ---- deployments and the stats poll -----------------------------------------------------------------------
def test_a_fixed_version_reaches_the_engine_deployments_so_a_replica_change_scales_in_place():
    from kvsched.adapters.ray.app import build_app
    from kvsched.adapters.ray.config import parse_config

    cfg = parse_config({"pools": [{"name": "tiny", "model": "kvsched-tiny:test", "replicas": 2}]})

    def engine(app):
        return app._bound_deployment.init_args[1]["tiny"]._bound_deployment

    assert engine(build_app(cfg, version="v1")).version == "v1"
    assert engine(build_app(cfg, version="v1")).num_replicas == 2
    assert engine(build_app(cfg)).version is None  # serve.run gives it a random one: new code, replicas replaced


def test_a_replica_without_recent_ttft_samples_reports_no_ttft_rather_than_a_marker() -> None:
    """Ray averages a custom metric over its look-back window: a -1 "no samples" marker was averaged into real P95s
    (found by review: 6 s over a 2 s target read as +0.17 and scaled down)."""
    import asyncio
    from types import SimpleNamespace

    from kvsched.adapters.ray.engine import EngineReplica

    cls = getattr(EngineReplica, "func_or_class", EngineReplica)

    async def stats(ttft):
        async def fresh():
            return {"queue_depth": 3, "ttft_p95_s": ttft, "ttft_unread_s": 0.0}

        return await cls.record_autoscaling_stats(SimpleNamespace(_fresh_stats=fresh, stats=SimpleNamespace(
            fresh_ttft_p95=lambda: ttft, ttft_buckets={} if ttft is None else {0.5: 3.0, float("inf"): 3.0})))

    assert asyncio.run(stats(None)) == {"queue_depth": 3.0, "ttft_unread_s": 0.0}  # its metrics read: 0 s unread
    assert asyncio.run(stats(0.5)) == {"queue_depth": 3.0, "ttft_p95_s": 0.5, "ttft_p95_fresh_s": 0.5,
                                       "ttft_le:0.5": 3.0, "ttft_le:+Inf": 3.0,  # the buckets, for the fleet's P95
                                       "ttft_unread_s": 0.0}


def test_the_stats_poll_reports_every_salts_sessions_in_one_call() -> None:
    """Found by review: the poll read one page of 100 unsalted sessions, so a restarted router sent the rest home, away
    from their KV; reading every page instead walked the engine's session table once per page (minutes of engine time
    at 100,000 sessions). One call of the pinned ids, with the replica's own admin key (every salt and tenant)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from kvsched.adapters.ray.stats import ReplicaStats

    everyone = [f"s{i:04d}" for i in range(2500)]
    calls = []

    class Engine(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            body = b""
            if url.path != "/metrics":
                calls.append(url.query)
                admin = self.headers.get("Authorization") == "Bearer k"
                assert parse_qs(url.query) == {"pinned_ids": ["1"]}
                body = json.dumps({"pinned_session_ids": everyone if admin else everyone[:1]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        st = ReplicaStats(base, admin_key="k")
        st.poll()
        assert st.kv_sessions == everyone and len(calls) == 1
        anonymous = ReplicaStats(base)
        anonymous.poll()
        assert anonymous.kv_sessions == everyone[:1]
    finally:
        server.shutdown()
