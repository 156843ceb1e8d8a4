"""kvsched ray-serve's YAML: `.inf` refused wherever a number goes (it passed `> 0`, then overflowed in build_app or
made a deadline never come), the replicas' KVSCHED_* environment checked by the policy core's rules at parse, and
the route prefix checked by Ray Serve's rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvsched.adapters.ray.config import ConfigError, config_from_dict, load_config, parse_config

POOL = {"name": "w", "model": "/m"}


@pytest.mark.parametrize(("where", "yaml_text"), [
    ("pools[0].num_cpus", "pools:\n  - {name: w, model: /m, num_cpus: .inf}\n"),
    ("pools[0].num_gpus", "pools:\n  - {name: w, model: /m, device: gpu, num_gpus: .inf}\n"),
    ("pools[0].startup_timeout_s", "pools:\n  - {name: w, model: /m, startup_timeout_s: .inf}\n"),
    ("router.stats_period_s", "router: {stats_period_s: .inf}\npools:\n  - {name: w, model: /m}\n"),
    ("router.session_idle_s", "router: {session_idle_s: .inf}\npools:\n  - {name: w, model: /m}\n"),
    ("request_deadline_s", "request_deadline_s: .inf\npools:\n  - {name: w, model: /m}\n"),
    ("health_check_timeout_s", "health_check_timeout_s: .inf\npools:\n  - {name: w, model: /m}\n"),
    ("health_check_period_s", "health_check_period_s: -.inf\npools:\n  - {name: w, model: /m}\n"),
    ("request_deadline_s", "request_deadline_s: .nan\npools:\n  - {name: w, model: /m}\n"),
    # found by review: the autoscaling section built its dataclass straight from the YAML, past these checks, and
    # failed later as a raw pydantic error of Ray's AutoscalingConfig (or scaled down never)
    ("pools[0].autoscaling: upscale_delay_s",
     "pools:\n  - {name: w, model: /m, autoscaling: {min_replicas: 1, max_replicas: 2, upscale_delay_s: .nan}}\n"),
    ("pools[0].autoscaling: downscale_delay_s",
     "pools:\n  - {name: w, model: /m, autoscaling: {min_replicas: 1, max_replicas: 2, downscale_delay_s: .inf}}\n"),
    ("pools[0].autoscaling: downscale_below",
     "pools:\n  - {name: w, model: /m, autoscaling: {downscale_below: .nan}}\n"),
])
def test_a_non_finite_number_is_refused_naming_the_field(tmp_path: Path, where: str, yaml_text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{where}: "), exc.value


def test_finite_numbers_still_load_and_travel_to_replicas() -> None:
    cfg = parse_config({"pools": [{**POOL, "num_cpus": 1.5}], "request_deadline_s": 1e6,
                        "router": {"stats_period_s": 0.5}})
    assert config_from_dict(cfg.to_dict()) == cfg and cfg.pools[0].num_cpus == 1.5


@pytest.mark.parametrize(("env", "named"), [
    ({"KVSCHED_DEFAULT_TTL_S": "soon"}, "KVSCHED_DEFAULT_TTL_S"),
    ({"KVSCHED_INFER_SESSIONS": "maybe"}, "KVSCHED_INFER_SESSIONS"),
    ({"KVSCHED_COMPACTION": "shrink"}, "KVSCHED_COMPACTION"),
    ({"KVSCHED_ADMIN_KEYS": " , "}, "KVSCHED_ADMIN_KEYS"),
])
def test_the_replicas_policy_settings_are_checked_at_parse(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"pools": [POOL, {"name": "v", "model": "/m", "env": env}]})
    assert str(exc.value).startswith(f"pools[1].env: {named}"), exc.value


def test_well_formed_replica_settings_pass_without_importing_vllm() -> None:
    env = {"KVSCHED_DEFAULT_TTL_S": "60", "KVSCHED_COMPACTION": "summarize", "KVSCHED_TIER_FAULT_EVERY": "x"}
    cfg = parse_config({"pools": [{**POOL, "env": env}]})  # the engine side's settings are vllm serve's to check
    assert dict(cfg.pools[0].engine.env) == env
    code = ("import sys; from kvsched.adapters.ray.config import parse_config; "
            f"parse_config({{'pools': [{{**{POOL!r}, 'env': {env!r}}}]}}); assert 'vllm' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("prefix", "problem"), [("api/", "start with '/'"), ("api", "start with '/'"),
                                                 ("", "start with '/'"), ("/api/", "end with '/'"),
                                                 ("/a/{id}", "'{' or '}'")])
def test_a_route_prefix_ray_would_refuse_is_refused_at_load(tmp_path: Path, prefix: str, problem: str) -> None:
    """Found by review: `route_prefix: api/` passed the config check (and `--dry-run`) and failed in `serve.run`."""
    path = tmp_path / "c.yaml"
    path.write_text(f"route_prefix: {prefix!r}\npools:\n  - {{name: w, model: /m}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith("route_prefix: ") and problem in str(exc.value), exc.value


@pytest.mark.parametrize(("prefix", "url"), [("/", "http://127.0.0.1:8000/v1"), ("/api", "http://127.0.0.1:8000/api/v1")])
def test_the_ready_url_joins_the_route_prefix_and_v1(tmp_path: Path, prefix: str, url: str) -> None:
    from kvsched.commands.ray_serve import api_url

    path = tmp_path / "c.yaml"
    path.write_text(f"route_prefix: {prefix}\nhttp: {{host: 127.0.0.1, port: 8000}}\npools:\n  - {{name: w, model: /m}}\n")
    assert api_url(load_config(path)) == url
