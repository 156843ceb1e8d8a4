"""A replica's poll of its engine as deployment settings: `router: {poll_deadline_s, routing_wait_s}` (default 5 s
and 2 s, the constants they were), refused at parse when they cannot work (no finite number of seconds > 0; a
routing wait over Ray's timeout of the routing-stats call, 5 s or two stats periods, less 0.5 s; a poll deadline
over Ray's timeout of record_autoscaling_stats, which waits for the poll, less 0.5 s: 10 s or what
RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S says, read as Ray reads it), shown by `--dry-run`, and reaching every
pool's engine replicas (the poll's deadline, the routing call's wait) and Ray's call timeout."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray.config import ConfigError, parse_config
from kvsched.adapters.ray.poll_settings import (
    POLL_DEADLINE_S,
    RAY_AUTOSCALING_STATS_TIMEOUT_ENV,
    RAY_AUTOSCALING_STATS_TIMEOUT_S,
    RAY_CALL_MARGIN_S,
    ROUTING_WAIT_S,
    autoscaling_stats_timeout_s,
    poll_problems,
    routing_stats_timeout_s,
)
from kvsched.cli import main

SETTINGS = ("poll_deadline_s", "routing_wait_s")


@pytest.fixture(autouse=True)
def _rays_default_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Each test starts from Ray's default, whatever the environment running the tests says.)"""
    monkeypatch.delenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, raising=False)


def config(**router: object) -> dict[str, object]:
    return {"router": router, "pools": [{"name": "a", "model": "/m", "replicas": 2},
                                        {"name": "b", "model": "/m", "autoscaling": {"min_replicas": 1}}]}


def refused(problem: str, **router: object) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(config(**router))
    msg = str(exc.value)
    assert msg.startswith("router") and problem in msg, msg
    return msg


def test_the_defaults_are_the_constants_they_were() -> None:
    router = parse_config(config()).router
    assert (router.poll_deadline_s, router.routing_wait_s) == (POLL_DEADLINE_S, ROUTING_WAIT_S) == (5.0, 2.0)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("value", "problem"), [(0, "greater than 0"), (-1.5, "greater than 0"), (math.inf, "finite"),
                                                (math.nan, "finite"), (True, "valid number"), ("2s", "valid number")])
def test_a_value_that_is_no_number_of_seconds_is_refused_naming_it(setting: str, value: object, problem: str) -> None:
    assert f"router.{setting}: " in refused(problem, **{setting: value})


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "2"])
def test_the_check_itself_refuses_them_too(setting: str, value: object) -> None:
    """(The check the config calls, for a caller that builds the settings another way.)"""
    args = {"poll_deadline_s": 1.0, "routing_wait_s": 1.0, setting: value}
    assert poll_problems(args["poll_deadline_s"], args["routing_wait_s"], 2.0) == [  # type: ignore[arg-type]
        f"{setting} must be a finite number of seconds > 0, got {value!r}"]


def test_a_routing_wait_without_a_margin_below_rays_call_timeout_is_refused() -> None:
    """The routing call's answer still has to get back through Ray after the wait, before Ray's timeout."""
    assert routing_stats_timeout_s(2.0) == 5.0 and routing_stats_timeout_s(4.0) == 8.0 and RAY_CALL_MARGIN_S == 0.5
    refused("routing_wait_s must be <= 4.5 s (Ray's timeout of the routing-stats call", routing_wait_s=5)
    refused("less 0.5 s for the call's way through Ray), got 4.9", routing_wait_s=4.9)
    refused("routing_wait_s must be <= 7.5 s", routing_wait_s=7.6, stats_period_s=4)
    assert parse_config(config(routing_wait_s=7.5, stats_period_s=4)).router.routing_wait_s == 7.5
    assert parse_config(config(routing_wait_s=4.5)).router.routing_wait_s == 4.5


def test_a_poll_deadline_without_a_margin_below_rays_autoscaling_call_timeout_is_refused() -> None:
    assert RAY_AUTOSCALING_STATS_TIMEOUT_S == autoscaling_stats_timeout_s() == 10.0
    refused("poll_deadline_s must be <= 9.5 s (Ray Serve's timeout of record_autoscaling_stats", poll_deadline_s=10)
    refused("poll_deadline_s must be <= 9.5 s", poll_deadline_s=9.9)
    assert parse_config(config(poll_deadline_s=9.5)).router.poll_deadline_s == 9.5
    # no relation to the period or the routing wait: one poll at a time, the calls made meanwhile share it
    cfg = parse_config(config(poll_deadline_s=9, stats_period_s=1, routing_wait_s=0.5))
    assert (cfg.router.poll_deadline_s, cfg.router.stats_period_s, cfg.router.routing_wait_s) == (9.0, 1.0, 0.5)


def test_the_poll_deadline_limit_moves_with_rays_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S as its timeout; the check reads it when it runs."""
    monkeypatch.setenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, "4")
    msg = refused("poll_deadline_s must be <= 3.5 s (Ray Serve's timeout of record_autoscaling_stats")  # the default 5
    assert f"4 s ({RAY_AUTOSCALING_STATS_TIMEOUT_ENV} or its default)" in msg, msg
    assert parse_config(config(poll_deadline_s=3.5)).router.poll_deadline_s == 3.5
    monkeypatch.setenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, "30")
    assert parse_config(config(poll_deadline_s=12)).router.poll_deadline_s == 12.0  # refused at Ray's default
    refused("poll_deadline_s must be <= 29.5 s", poll_deadline_s=29.6)
    for bad in ("0", "-1"):  # Ray takes them (every call would time out at once): no deadline fits
        monkeypatch.setenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, bad)
        refused("poll_deadline_s must be <= ", poll_deadline_s=0.1)
    monkeypatch.setenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, "ten")
    refused(f"{RAY_AUTOSCALING_STATS_TIMEOUT_ENV}='ten' is no number of seconds")


READ_BOTH = ("import json; from ray.serve._private import constants as c; "
             "from kvsched.adapters.ray.poll_settings import autoscaling_stats_timeout_s as t; "
             "print(json.dumps([c.RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S, t()]))")


@pytest.mark.parametrize("value", [None, "3", "12.5", " 7 ", "1e1", "ten"])
def test_the_timeout_is_read_as_ray_reads_it(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's constants module, imported fresh with the variable set (as in a replica), and the check agree: the name,
    the default, the conversion. A value Ray cannot read fails Ray's import, and the check calls it no number."""
    env = {k: v for k, v in os.environ.items() if k != RAY_AUTOSCALING_STATS_TIMEOUT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    if value is not None:
        env[RAY_AUTOSCALING_STATS_TIMEOUT_ENV] = value
    run = subprocess.run([sys.executable, "-c", READ_BOTH], env=env, capture_output=True, text=True, timeout=120)
    if value == "ten":
        assert run.returncode != 0 and RAY_AUTOSCALING_STATS_TIMEOUT_ENV in run.stderr, run.stderr[-2000:]
        monkeypatch.setenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, value)
        assert autoscaling_stats_timeout_s() is None
        return
    assert run.returncode == 0, run.stderr[-2000:]
    ray_reads, check_reads = json.loads(run.stdout.strip().splitlines()[-1])
    assert ray_reads == check_reads == (10.0 if value is None else float(value))


def test_a_low_ray_timeout_is_a_config_error_not_a_crash_at_import(tmp_path: Path) -> None:
    """Found by review of this change: the config's default router, built once at import, ran the check then, so a
    RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S under 5.5 s made every import of config.py raise."""
    path = tmp_path / "pools.yaml"
    path.write_text("pools:\n  - {name: w, model: /m}\n")
    env = dict(os.environ, **{RAY_AUTOSCALING_STATS_TIMEOUT_ENV: "4"})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "kvsched.cli", "ray-serve", str(path), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("kvsched ray-serve: router: poll_deadline_s must be <= 3.5 s"), run.stderr[-2000:]


def test_rays_own_timeouts_are_the_ones_checked_against() -> None:
    from ray.serve._private import constants

    from kvsched.adapters.ray.app import engine_options

    assert constants.RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S == RAY_AUTOSCALING_STATS_TIMEOUT_S
    for period in (1.0, 2.0, 4.0):
        cfg = parse_config(config(stats_period_s=period))
        rrc = engine_options(cfg.pools[0], cfg)["request_router_config"]
        assert rrc.request_routing_stats_timeout_s == routing_stats_timeout_s(period)


def test_the_settings_reach_every_pools_engine_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvsched.adapters.ray import engine as engine_mod
    from kvsched.adapters.ray.app import build_app, engine_args, engine_kwargs

    cfg = parse_config(config(poll_deadline_s=3.5, routing_wait_s=0.75))
    engines = build_app(cfg)._bound_deployment.init_args[1]
    monkeypatch.setattr(engine_mod, "VllmServer", lambda spec, **kw: SimpleNamespace(base="http://x", proc=None))
    monkeypatch.setattr(engine_mod, "start_with_reaper", lambda server: None)
    cls = getattr(engine_mod.EngineReplica, "func_or_class", engine_mod.EngineReplica)
    for p in cfg.pools:
        bound = engines[p.name]._bound_deployment
        assert bound.init_args == engine_args(p)
        assert bound.init_kwargs == engine_kwargs(cfg) == {"poll_deadline_s": 3.5, "routing_wait_s": 0.75}
        replica = cls(*bound.init_args, **bound.init_kwargs)
        assert replica.stats.timeout_s == 3.5 and replica.routing_wait_s == 0.75
    default = cls(*engine_args(cfg.pools[0]))  # (test subclasses bind the positional arguments only)
    assert default.stats.timeout_s == POLL_DEADLINE_S and default.routing_wait_s == ROUTING_WAIT_S


def test_the_routing_call_waits_its_setting_for_a_poll_in_flight() -> None:
    """The routing-stats call answers with the last stats once `routing_wait_s` passed, the poll still reading
    (here a poll that would take 60 s); the poll's own deadline is the replica's `stats.timeout_s`."""
    from kvsched.adapters.ray.engine import EngineReplica
    from kvsched.adapters.ray.stats import ReplicaStats

    replica = EngineReplica.__new__(EngineReplica)
    replica.pool, replica.routing_wait_s = "a", 0.05
    replica.stats = ReplicaStats("http://x")

    async def run() -> None:
        never = asyncio.get_running_loop().create_future()
        replica._poll = asyncio.ensure_future(asyncio.wait_for(never, 60))  # a poll in flight
        stats = await asyncio.wait_for(replica.record_routing_stats(), 30)
        assert stats["kv_sessions"] == [] and not replica._poll.done()
        replica._poll.cancel()

    asyncio.run(run())


def test_ray_serve_shows_the_settings_and_refuses_bad_ones_at_start_up(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text("router: {poll_deadline_s: 3, routing_wait_s: 1.5}\npools:\n  - {name: w, model: /m}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "poll_deadline_s 3s: each replica reads its engine's /metrics and session list within it" in out, out
    assert "routing_wait_s 1.5s: Ray's routing-stats call waits that long for a poll in flight" in out, out
    path.write_text("pools:\n  - {name: w, model: /m}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    assert "poll_deadline_s 5s: " in (out := capsys.readouterr().out) and "routing_wait_s 2s: " in out, out
    for bad in ("poll_deadline_s: 12", "routing_wait_s: 0", "routing_wait_s: 7"):
        path.write_text(f"router: {{{bad}}}\npools:\n  - {{name: w, model: /m}}\n")
        assert main(["ray-serve", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvsched ray-serve: router") and bad.split(":")[0] in err, err
