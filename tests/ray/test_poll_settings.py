"""A replica's poll of its engine as deployment settings: `router: {poll_deadline_s, routing_wait_s}` (default 5 s
and 2 s, the constants they were), refused at parse when they cannot work (no finite number of seconds > 0; a
routing wait not shorter than Ray's timeout of the routing-stats call, 5 s or two stats periods; a poll deadline not
shorter than Ray's 10-s timeout of record_autoscaling_stats, which waits for the poll), shown by `--dry-run`, and
reaching every pool's engine replicas (the poll's deadline, the routing call's wait) and Ray's call timeout."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray.config import ConfigError, parse_config
from kvsched.adapters.ray.poll_settings import (
    POLL_DEADLINE_S,
    RAY_AUTOSCALING_STATS_TIMEOUT_S,
    ROUTING_WAIT_S,
    poll_problems,
    routing_stats_timeout_s,
)
from kvsched.cli import main

SETTINGS = ("poll_deadline_s", "routing_wait_s")


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


def test_a_routing_wait_not_shorter_than_rays_call_timeout_is_refused() -> None:
    assert routing_stats_timeout_s(2.0) == 5.0 and routing_stats_timeout_s(4.0) == 8.0
    refused("routing_wait_s must be < 5 s (Ray's timeout of the routing-stats call", routing_wait_s=5)
    refused("routing_wait_s must be < 8 s", routing_wait_s=9, stats_period_s=4)
    assert parse_config(config(routing_wait_s=6, stats_period_s=4)).router.routing_wait_s == 6.0  # within 8 s
    assert parse_config(config(routing_wait_s=4.5)).router.routing_wait_s == 4.5


def test_a_poll_deadline_not_shorter_than_rays_autoscaling_call_timeout_is_refused() -> None:
    assert RAY_AUTOSCALING_STATS_TIMEOUT_S == 10.0
    refused("poll_deadline_s must be < 10 s (Ray Serve's timeout of record_autoscaling_stats", poll_deadline_s=10)
    # no relation to the period or the routing wait: one poll at a time, the calls made meanwhile share it
    cfg = parse_config(config(poll_deadline_s=9, stats_period_s=1, routing_wait_s=0.5))
    assert (cfg.router.poll_deadline_s, cfg.router.stats_period_s, cfg.router.routing_wait_s) == (9.0, 1.0, 0.5)


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
