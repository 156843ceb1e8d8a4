"""`kvsched bench agents` writes each side's engine settings into its JSON's config (its flags and, for kvsched's
sides, the KVSCHED_* settings its engine reads: TTL, pin budget, role weights, tier size), as `kvsched bench replay`
does (kvsched.bench.engine_settings). Found by review: the agents bench recorded none, so two results that differed in
them looked alike. No server starts: the sides are faked (test_agents_same_memory.fake_run)."""

from __future__ import annotations

import json

import pytest

from tests.bench.test_agents_same_memory import fake_run

SETTINGS = {"KVSCHED_DEFAULT_TTL_S": "90", "KVSCHED_PIN_BUDGET_FRACTION": "0.5",
            "KVSCHED_ROLE_WEIGHTS": "planner:3,critic:0.5", "KVSCHED_FP8_TIER_GB": "0.25"}


def test_the_json_records_each_sides_flags_and_its_engines_settings(monkeypatch, tmp_path):
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    result, specs = fake_run(monkeypatch, tmp_path, ["--fp8-tier-gb", "0.05"])
    sides = json.loads(json.dumps(result))["config"]["sides"]
    assert set(sides) == set(specs)
    for name, spec in specs.items():
        assert sides[name]["scheduler"] == spec.scheduler and sides[name]["serve_args"] == spec.extra_args
        assert sides[name]["num_blocks"] == spec.num_blocks
    for name in ("kvsched", "kvsched-no-tier"):
        retention = sides[name]["retention"]
        assert (retention["default_ttl_s"], retention["pin_budget_fraction"]) == (90, 0.5)
        assert retention["role_weights"]["planner"] == 3.0
        assert sides[name]["environment"]["KVSCHED_DEFAULT_TTL_S"] == "90"
    assert sides["kvsched"]["fp8_tier_gib"] == pytest.approx(0.05)  # the side's flag wins over KVSCHED_FP8_TIER_GB
    assert sides["kvsched-no-tier"]["fp8_tier_gib"] == 0
    assert "retention" not in sides["stock"] and sides["stock"]["scheduler"] is None


def test_a_malformed_setting_stops_the_run_before_any_server_starts(monkeypatch, tmp_path):
    import kvsched.bench.agents as agents

    monkeypatch.setenv("KVSCHED_DEFAULT_TTL_S", "soon")
    made = []
    monkeypatch.setattr(agents, "VllmServer", made.append)
    with pytest.raises(ValueError, match="KVSCHED_DEFAULT_TTL_S"):
        fake_run(monkeypatch, tmp_path, [])
    assert not made
