"""`kvsched simulate`'s FP8 tier and the engine's KVSCHED_FP8_TIER_GB. Found by review: the simulator read the engine's
other KVSCHED_* settings but ignored this one (a bad value included), and its help did not say that its default (off)
differs from the engine's (auto, sized from a host's memory, which a replay does not have)."""

from __future__ import annotations

import argparse
import json

import pytest

from kvsched.cli import main
from kvsched.commands.simulate_tier import FLEET_HOST_GIB_PER_GPU, tier_bytes
from kvsched.core.tier_config import auto_budget_bytes
from tests.sim.test_simulate_pressure_env import SMALL, run_sim

GIB = 2**30


@pytest.fixture(autouse=True)
def _no_tier_env(monkeypatch):
    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)


def test_without_a_flag_the_variables_size_is_the_tier(tmp_path, monkeypatch, capsys):
    assert run_sim(tmp_path, "--policies", "kvsched")["config"]["fp8_tier_bytes"] == 0  # unset: off, as before
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "0.01")
    assert run_sim(tmp_path, "--policies", "kvsched")["config"]["fp8_tier_bytes"] == int(0.01 * GIB)
    assert "the FP8 tier: 0.01 GiB from KVSCHED_FP8_TIER_GB" in capsys.readouterr().err
    for flag in (["--fp8-tier-gib", "0"], ["--fp8-tier-blocks", "3"]):  # a flag wins, silently
        config = run_sim(tmp_path, "--policies", "kvsched", *flag)["config"]
        assert config["fp8_tier_blocks"] == int(flag[1]) and "KVSCHED_FP8_TIER_GB" not in capsys.readouterr().err


def test_auto_cannot_be_sized_by_a_replay_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "auto")
    assert run_sim(tmp_path, "--policies", "kvsched")["config"]["fp8_tier_bytes"] == 0
    err = capsys.readouterr().err
    assert "KVSCHED_FP8_TIER_GB='auto'" in err and "--host-gib-per-gpu" in err and "stays off" in err


@pytest.mark.parametrize("raw", ["-1", "nan", "2GB", "1e-12"])
def test_a_value_the_engine_refuses_is_refused_naming_the_variable(monkeypatch, capsys, raw):
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", raw)
    assert main(["simulate", "--generate", "--quick", "--no-progress", "--policies", "lru,kvsched"]) == 2
    assert capsys.readouterr().err.startswith(f"kvsched simulate: error: KVSCHED_FP8_TIER_GB={raw!r}: ")


def test_the_fleets_tier_follows_its_hosts_unless_a_size_is_given():
    args = argparse.Namespace(fleet=True, host_gib_per_gpu=None, fp8_tier_blocks=None, fp8_tier_gib=None,
                              gpu_kv_gib=60.0)
    pool = 120 * GIB  # two GPUs of 60 GiB
    assert tier_bytes(args, 4096, pool) == 2 * auto_budget_bytes(60 * GIB, int(FLEET_HOST_GIB_PER_GPU * GIB))
    args.fp8_tier_gib = 0.0  # `--fleet --fp8-tier-gib 0` (or KVSCHED_FP8_TIER_GB=0): off, not the fleet's default
    assert tier_bytes(args, 4096, pool) == 0


def test_the_fleets_rule_on_a_model_the_tier_does_not_serve_runs_without_it(tmp_path, monkeypatch, capsys):
    """Found by review: `--fleet --preset deepseek-v2-lite` (MLA: no FP8 tier) was refused "an FP8 tier was asked for
    ... give no tier flag" though none was given: --fleet's host rule sized it. Now a note, and no tier; a size given
    (a flag, KVSCHED_FP8_TIER_GB) is still refused."""
    monkeypatch.setattr("kvsched.sim.generator.FLEET", SMALL)  # --fleet's shape, in seconds
    out = tmp_path / "r.json"
    args = ["simulate", "--generate", "--fleet", "--preset", "deepseek-v2-lite", "--policies", "lru,kvsched",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["config"]["fp8_tier_bytes"] == 0
    err = capsys.readouterr().err
    assert err.count("the FP8 tier does not serve") == 1 and "without the tier" in err
    for given in (["--host-gib-per-gpu", "256"], ["--fp8-tier-gib", "1"]):
        assert main([*args, *given]) == 2 and "tier block size is not known" in capsys.readouterr().err
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "1")
    assert main(args) == 2 and "tier block size is not known" in capsys.readouterr().err


def test_the_variables_size_is_each_replicas_and_a_flags_the_fleets(tmp_path, monkeypatch, capsys):
    """Found by review: KVSCHED_FP8_TIER_GB, each engine's own tier, was divided among `--replicas N` as a flag's size
    (the fleet's) is: 64 GiB gave each replica 16. Now the variable sizes each replica's, and the lines say which."""
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "0.01")
    config = run_sim(tmp_path, "--policies", "kvsched", "--replicas", "3")["config"]
    assert config["fp8_tier_bytes_per_replica"] == int(0.01 * GIB) and config["fp8_tier_bytes"] == 3 * int(0.01 * GIB)
    err, printed = (lambda c: (c.err, c.out))(capsys.readouterr())
    assert "each replica's" in err and "KVSCHED_FP8_TIER_GB: each replica's" in printed
    monkeypatch.delenv("KVSCHED_FP8_TIER_GB")
    config = run_sim(tmp_path, "--policies", "kvsched", "--replicas", "3", "--fp8-tier-gib", "0.03")["config"]
    assert config["fp8_tier_bytes_per_replica"] == int(0.03 * GIB) // 3
    assert "--fp8-tier-gib: the fleet's, 1/3 on each replica" in capsys.readouterr().out
