"""`kvsched bench replay` writes the settings its kvsched sides' engines read (the KVSCHED_* variables and flags: TTL,
pin budget, role weights, tier size) into its JSON, so that a result can be run again from its JSON alone. Found by
review: none was written, and two runs that differed in them looked alike. The servers here are test doubles (no
`vllm serve`): what is checked is the JSON, built from the environment the servers would be started with."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from kvsched.bench import trace_engine
from kvsched.bench.engine_settings import REDACTED, engine_settings, side_settings
from kvsched.core.config import RetentionConfig
from kvsched.serving import ServerSpec
from kvsched.sim.trace import TraceRequest, write_jsonl

SETTINGS = {"KVSCHED_DEFAULT_TTL_S": "90", "KVSCHED_MAX_TTL_S": "900", "KVSCHED_PIN_BUDGET_FRACTION": "0.5",
            "KVSCHED_ROLE_WEIGHTS": "planner:3,critic:0.5", "KVSCHED_FP8_TIER_GB": "0.25",
            "KVSCHED_INFER_SESSIONS": "0", "KVSCHED_PAYBACK_SAMPLING": "16"}
SECRETS = {"KVSCHED_ADMIN_KEYS": "admin-sekrit", "KVSCHED_STORE_URL": "redis://:pa55word@store.example:6379/0"}


class Server:
    """A started side's server as run_benchmark uses it: its spec, URL, /metrics counters and stop."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec, self.url, self.served = spec, "http://127.0.0.1:1/v1", 0

    def metrics(self) -> dict[str, float]:
        self.served += 1
        return {"vllm:prompt_tokens_total": 0.0 if self.served == 1 else 96.0, "vllm:prefix_cache_hits_total": 0.0}

    def stop(self) -> None:
        return None


@pytest.fixture
def replayed(monkeypatch, tmp_path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result, checkpoints) of `kvsched bench replay` on a 3-request trace, with SETTINGS and SECRETS set."""
    import kvsched.serving
    import kvsched.tiny_model

    for name, value in {**SETTINGS, **SECRETS}.items():
        monkeypatch.setenv(name, value)
    trace = tmp_path / "t.jsonl"
    write_jsonl(trace, 512, [TraceRequest(t=float(i), session=f"s{i}", prompt_tokens=512, output_tokens=4,
                                          blocks=[f"b{i}"]) for i in range(3)])
    monkeypatch.setattr(kvsched.serving, "VllmServer", Server)
    monkeypatch.setattr(kvsched.serving, "start_all", lambda servers: servers)
    monkeypatch.setattr(kvsched.tiny_model, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(trace_engine, "warm_up", lambda url, vocab: None)
    monkeypatch.setattr(trace_engine, "drive", lambda url, reqs: ([{"ttft_s": 0.1, "done_s": 0.2}] * len(reqs), 1.0,
                                                                  0.0))
    args = argparse.Namespace(trace=trace, start_s=0.0, seconds=60.0, time_scale=1.0, pressure=1.0,
                              sides="stock,kvsched-no-tier,kvsched", max_output_tokens=4, model_size="test", out=None)
    checkpoints: list[dict[str, Any]] = []
    result = trace_engine.run_benchmark(trace_engine.prepare(args), checkpoints.append)
    return json.loads(json.dumps(result)), checkpoints


def test_the_json_records_each_kvsched_sides_settings_and_tier(replayed):
    result, checkpoints = replayed
    sides = result["config"]["sides"]
    for name in ("kvsched-no-tier", "kvsched"):
        side = sides[name]
        assert side["scheduler"] == "kvsched" and side["serve_args"] == trace_engine.SIDES[name][1]
        retention = side["retention"]
        assert (retention["default_ttl_s"], retention["max_ttl_s"], retention["pin_budget_fraction"]) == (90, 900, 0.5)
        assert retention["role_weights"] == {"orchestrator": 2.0, "planner": 3.0, "worker": 1.0, "critic": 0.5}
        assert retention["payback_sampling"] == 16 and side["infer_sessions"] is False
        assert side["environment"]["KVSCHED_DEFAULT_TTL_S"] == "90"
    assert sides["kvsched-no-tier"]["fp8_tier_gib"] == 0  # its flag
    assert sides["kvsched"]["fp8_tier_gib"] == 0.25  # no flag: KVSCHED_FP8_TIER_GB, as its engine reads it
    assert sides["stock"] == {"scheduler": None, "serve_args": [], "num_blocks": result["config"]["num_blocks"]}
    assert result["config"]["simulator_retention"] == sides["kvsched"]["retention"]
    assert checkpoints and all(c["config"]["sides"] == sides for c in checkpoints)  # a side that dies keeps them


def test_the_json_alone_gives_the_settings_back_and_no_secret(replayed):
    result, _ = replayed
    side = result["config"]["sides"]["kvsched"]
    env = side["environment"]
    assert {k: env[k] for k in SETTINGS} == SETTINGS
    again = engine_settings({k: v for k, v in env.items() if v != REDACTED})  # what an engine given these reads
    assert again["retention"] == side["retention"] and again["infer_sessions"] == side["infer_sessions"]
    text = json.dumps(result)
    assert "admin-sekrit" not in text and "pa55word" not in text
    assert env["KVSCHED_ADMIN_KEYS"] == REDACTED and env["KVSCHED_STORE_URL"] == "redis://:***@store.example:6379/0"


def test_a_sides_own_environment_and_flag_win_as_in_its_process(tmp_path):
    """`ServerSpec.env` is laid over the caller's environment, and a flag's size over KVSCHED_FP8_TIER_GB."""
    base = {"KVSCHED_DEFAULT_TTL_S": "30", "KVSCHED_FP8_TIER_GB": "0.5", "PATH": "/bin"}
    spec = ServerSpec(model=Path(tmp_path), env={"KVSCHED_DEFAULT_TTL_S": "7"},
                      extra_args=["--kvsched-fp8-tier-gb=0.125"])
    got = side_settings(spec, base)
    assert got["retention"]["default_ttl_s"] == 7 and got["fp8_tier_gib"] == 0.125
    assert got["environment"] == {"KVSCHED_DEFAULT_TTL_S": "7", "KVSCHED_FP8_TIER_GB": "0.5"}
    assert spec.environment(base)["KVSCHED_DEFAULT_TTL_S"] == "7"  # what VllmServer.launch starts it with
    assert side_settings(ServerSpec(model=Path(tmp_path)), {})["fp8_tier_gib"] == "auto"
    assert RetentionConfig.from_env({}).as_dict() == side_settings(ServerSpec(model=Path(tmp_path)), {})["retention"]


def test_a_malformed_setting_is_refused_before_any_server_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "lots")
    args = argparse.Namespace(trace=tmp_path / "missing.jsonl", start_s=0.0, seconds=60.0, time_scale=1.0,
                              pressure=1.0, sides="kvsched", max_output_tokens=4, model_size="test", out=None)
    assert trace_engine.run(args) == 2
    assert "must be a number of GiB" in capsys.readouterr().err


# Found by review: only KVSCHED_ADMIN_KEYS and the user part of KVSCHED_STORE_URL were hidden; another variable of
# the prefix (kvsched reads nothing from it; the prefix is not kvsched's alone) went out in full, and so did a store
# URL whose user part urlsplit does not see (no `//`).
LEAKS = {"KVSCHED_REDIS_PASSWORD": "hunter2", "KVSCHED_API_TOKEN": "tok-123", "KVSCHED_ADMIN_KEY": "adm-456",
         "KVSCHED_MIRROR_URL": "redis://u:pw-789@mirror:6379"}
BARE_URLS = ["default:pw-0ab@store:6379", "redis:default:pw-0ab@store:6379"]


def test_no_other_variable_of_the_prefix_is_written_but_by_name(tmp_path):
    got = side_settings(ServerSpec(model=Path(tmp_path)), {**LEAKS, **SETTINGS, "KVSCHED_TIER_STAGE_MB": "8"})
    env = got["environment"]
    assert {k: env[k] for k in LEAKS} == dict.fromkeys(LEAKS, REDACTED)
    assert {k: env[k] for k in SETTINGS} == SETTINGS and env["KVSCHED_TIER_STAGE_MB"] == "8"  # kvsched's, as set
    assert not any(secret in json.dumps(got) for secret in LEAKS.values())


@pytest.mark.parametrize("url", BARE_URLS)
def test_a_store_url_whose_user_part_cannot_be_told_is_hidden_whole(tmp_path, url: str):
    env = side_settings(ServerSpec(model=Path(tmp_path)), {"KVSCHED_STORE_URL": url})["environment"]
    assert "pw-0ab" not in json.dumps(env) and "hidden" in env["KVSCHED_STORE_URL"]  # the store's own redaction
    plain = side_settings(ServerSpec(model=Path(tmp_path)), {"KVSCHED_STORE_URL": "redis://cache@store:6379/1"})
    assert plain["environment"]["KVSCHED_STORE_URL"] == "redis://cache@store:6379/1"  # a user name alone stays
