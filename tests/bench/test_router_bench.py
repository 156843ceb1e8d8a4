"""`kvsched bench router`: arguments, JSON shape and the behaviour its gates read, on a small fleet."""

from __future__ import annotations

import json

import pytest

from kvsched.bench.router import POLICIES, SimConfig, Workload, make_policy, simulate
from kvsched.cli import build_parser, main

METRICS = ("affinity", "max_over_mean_load", "moved_on_kill", "moved_on_scale_up", "route_us_p50")


def small(policy: str, seed: int = 0) -> dict:
    cfg = SimConfig(replicas=6, sessions=600, turns=6000, in_flight_per_replica=24, seed=seed)
    return simulate(make_policy(policy, cfg), cfg, Workload.build(cfg))


def test_cli_writes_every_policy_with_every_metric(tmp_path) -> None:
    out = tmp_path / "router.json"
    main(["bench", "router", "--quick", "--replicas", "4", "--sessions", "300", "--turns", "3000",
          "--out", str(out)])
    data = json.loads(out.read_text())
    for p in POLICIES:
        assert all(isinstance(data[p][m], float) for m in METRICS), data[p]
    assert data["headline_replicas"] == 4 and set(data["by_replicas"]) == {"4"}
    assert data["provenance"]["command"].startswith("kvsched")
    assert all(isinstance(v, bool) for v in data["gates"].values())


def test_quick_defaults() -> None:
    args = build_parser().parse_args(["bench", "router", "--quick"])
    assert args.quick and args.replicas is None and args.load_factor == 1.25


def test_kvsched_kill_moves_only_the_dead_replicas_sessions_and_they_come_back() -> None:
    kr = small("kvsched")["kill_return"]
    assert kr["dead_replica_sessions"] > 0 and kr["others_moved_on_kill"] == 0
    assert kr["dead_replica_sessions_back_home"] == 1.0 and kr["others_moved_on_return"] == 0


def test_consistent_hash_on_unique_ids_does_not_bring_sessions_back() -> None:
    kr = small("consistent_hash")["kill_return"]
    assert kr["others_moved_on_kill"] == 0 and kr["dead_replica_sessions_back_home"] < 0.5


def test_kvsched_bounds_the_load_that_consistent_hashing_lets_skew() -> None:
    k, ch, p2 = small("kvsched"), small("consistent_hash"), small("pow2")
    assert k["max_over_mean_load"] < ch["max_over_mean_load"]
    assert k["affinity"] > p2["affinity"]


def test_simulation_is_deterministic_for_a_seed() -> None:
    a, b = small("kvsched", seed=3), small("kvsched", seed=3)
    a.pop("route_us_p50"), b.pop("route_us_p50"), a.pop("route_us_p99"), b.pop("route_us_p99")
    assert a == b


def test_bad_sim_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        SimConfig(replicas=1)
