"""`kvsched bench traces` on the committed Mooncake slices: every side reported as a share of OPT's saving on a pool
sized from the peak live blocks, the headroom sides' flags on each session's first and last turn, and the hindsight
class sides' inputs (TTLs and weights from class return rates) and theta choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvsched.bench.traces import first_turns, last_turns
from kvsched.bench.traces_classes import (
    best_theta,
    cross_fitted_pins,
    cross_fitted_ttls,
    fit,
    with_class_ttls,
    with_class_weights,
    with_ttls_per_class,
)
from kvsched.cli import main
from kvsched.sim.mooncake import convert_file
from kvsched.sim.replay import ReplayConfig, ReplayResult
from kvsched.sim.trace import Trace, TraceRequest

DATA = Path(__file__).parents[1] / "sim" / "data"


def test_bench_traces_on_a_slice(tmp_path, capsys):
    trace = tmp_path / "conv.jsonl"
    convert_file(DATA / "mooncake_conversation_slice.jsonl", trace)
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--pressure", "1.5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["traces"]["conv.jsonl"]["pressures"]["1.5"]
    s = r["share_of_opt_saving"]
    assert set(s) == {"lru", "kvsched", "opt", "kvsched, long TTL", "first turns unpinned", "end oracle",
                      "class oracle", "class weights", "class TTLs", "class oracle, cross-fitted",
                      "class TTLs, cross-fitted", "kvsched + FP8 tier", "LRU + CPU offload"}
    # the host sides: the engine's default tier size (2x the pool's bytes; an FP8 pool, so 2x its blocks)
    assert r["tier"]["slots"] == 2 * r["capacity_blocks"] and r["tier"]["h2d_gbps"] == 32.0
    assert s["opt"] == 1.0 and 0 < s["lru"] <= 1.0
    assert r["gate_share"] == s["lru"] + 0.3 * (1 - s["lru"])
    assert r["capacity_blocks"] == -(-r["peak_live_blocks"] * 2 // 3) and r["peak_live_blocks"] < r["distinct_blocks"]
    c = r["class_oracle"]
    assert c["theta_curve"]["0"] == s["kvsched, long TTL"]  # theta 0 pins every turn for the long TTL
    assert s["class oracle"] == max(c["theta_curve"].values()) == c["theta_curve"][f"{c['best_theta']:g}"]
    assert s["class TTLs"] == max(c["price_curve"].values()) == c["price_curve"][f"{c['best_price']:g}"]
    assert 0.0 <= c["class_ttl_pinned_turn_fraction"] <= 1.0 and 0.0 <= c["class_ttl_mean_s"] <= 600.0
    assert r["class_oracle_gate_met"] == (max(s["class oracle"], s["class weights"], s["class TTLs"]) >= r["gate_share"])
    x = c["cross_fitted"]
    assert s["class oracle, cross-fitted"] == max(x["oracle_curve"].values()) == x["oracle_curve"][
        "{:g}/{:g}".format(*x["oracle_best"])]
    assert s["class TTLs, cross-fitted"] == max(x["ttls_curve"].values())
    assert r["cross_fitted_gate_met"] == (max(s["class oracle, cross-fitted"], s["class TTLs, cross-fitted"])
                                          >= r["gate_share"])
    rc = json.loads(out.read_text())["traces"]["conv.jsonl"]["return_classes"]
    assert sum(row["turns"] for row in rc["table"]) == rc["turns"] and 0.5 <= rc["auc"] <= 1.0
    assert "gate" in capsys.readouterr().out


def test_no_tier_leaves_the_host_sides_out(tmp_path):
    trace = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", trace)
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--pressure", "3", "--no-headroom", "--no-tier", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["traces"]["syn.jsonl"]["pressures"]["3"]
    assert set(r["share_of_opt_saving"]) == {"lru", "kvsched", "opt"} and "tier" not in r
    assert main(["bench", "traces", str(trace), "--h2d-gbps", "0", "--out", str(out)]) == 2
    assert main(["bench", "traces", str(trace), "--timing", "-1", "--out", str(out)]) == 2


def test_timing_reports_both_sides_cpu_time_per_rep(tmp_path):
    trace = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", trace)
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--pressure", "3", "--no-headroom", "--no-tier", "--timing", "2",
                 "--out", str(out)]) == 0
    cost = json.loads(out.read_text())["traces"]["syn.jsonl"]["pressures"]["3"]["replay_cost"]
    assert cost["reps"] == 2 and all(len(v) == 2 for v in cost["cpu_s"].values())
    assert cost["kvsched_over_lru_min"] == cost["min_s"]["kvsched"] / cost["min_s"]["lru"] > 0


def test_headroom_flags_mark_each_sessions_first_and_last_turn(tmp_path):
    path = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", path)
    t = Trace.load(path)
    first, last = first_turns(t), last_turns(t)
    assert first.sum() == last.sum() == len(t.sessions)
    for s in range(len(t.sessions)):
        idx = np.flatnonzero(t.session == s)
        assert first[idx].tolist() == [True] + [False] * (len(idx) - 1)
        assert last[idx].tolist() == [False] * (len(idx) - 1) + [True]


def test_missing_default_traces_are_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    assert main(["bench", "traces"]) == 2
    assert "kvsched trace fetch mooncake" in capsys.readouterr().err


def tiny_trace() -> Trace:
    """a: 2 blocks, back 100 s later with 3; b: 8 blocks, never back (block size 4, no output)."""
    reqs = [TraceRequest(0.0, "a", 8, 0, ["a1", "a2"]), TraceRequest(1.0, "b", 32, 0, [f"b{k}" for k in range(8)]),
            TraceRequest(100.0, "a", 12, 0, ["a1", "a2", "a3"])]
    return Trace.from_requests(4, reqs)


def test_class_ttls_and_weights_come_from_hindsight_rates():
    trace = tiny_trace()
    model = fit(trace, 600.0, ReplayConfig(capacity_blocks=1))
    assert model.returned.tolist() == [True, False, False] and model.turn_rate.tolist() == [1.0, 0.0, 0.0]
    assert with_class_ttls(trace, model, 0.5, 600.0).ttl_s.tolist() == [600.0, 0.0, 0.0]
    assert with_class_ttls(trace, model, 0.0, 600.0).ttl_s.tolist() == [600.0] * 3
    weighted, cfg = with_class_weights(trace, model, ReplayConfig(capacity_blocks=8))
    assert weighted.role == ["return 1.00", "return 0.00", "return 0.00"]
    assert [cfg.retention.role_weight(r) for r in weighted.role] == [1.0, 0.0, 0.0]
    assert cfg.retention.role_weight("orchestrator") == 2.0  # the configured roles keep their weights
    assert fit(trace, 50.0, ReplayConfig(capacity_blocks=1)).returned.tolist() == [False] * 3  # 100 s > 50 s
    # a's first turn (2 blocks) comes back ~100 s after its end: worth 120 s at a price of 0.001 per block-second
    # (2 - 0.001 x 2 x 100 > 0), not at 0.02 (2 - 0.02 x 2 x 100 < 0); b's and a's last turns never return
    assert model.blocks.tolist() == [2, 8, 3] and np.isinf(model.gap[1:]).all()
    assert with_ttls_per_class(trace, model, 0.001).ttl_s.tolist() == [120.0, 0.0, 0.0]
    assert with_ttls_per_class(trace, model, 0.02).ttl_s.tolist() == [0.0, 0.0, 0.0]


def test_cross_fitted_sides_act_on_the_other_sessions_outcomes_never_a_turns_own():
    """a's and b's first turns share a class; a (fold 0) comes back, b (fold 1) does not. In-sample, the class rate
    0.5 pins both; cross-fitted, a's turn acts on b's outcome (no pin) and b's on a's (pinned)."""
    trace = tiny_trace()
    model = fit(trace, 600.0, ReplayConfig(capacity_blocks=1))
    assert model.folds.tolist() == [False, True, False] and model.cls[0] != model.cls[1]  # 2 vs 8 blocks: two classes
    same = Trace.from_requests(4, [TraceRequest(0.0, "a", 8, 0, ["a1", "a2"]), TraceRequest(1.0, "b", 8, 0, ["b1", "b2"]),
                                   TraceRequest(100.0, "a", 12, 0, ["a1", "a2", "a3"])])
    model = fit(same, 600.0, ReplayConfig(capacity_blocks=1))
    assert model.cls[0] == model.cls[1] and model.returned.tolist() == [True, False, False]
    assert with_class_ttls(same, model, 0.5, 600.0).ttl_s.tolist() == [600.0, 600.0, 0.0]
    for strength in (0.0, 10.0):  # a's second turn: no turn-2 outcome in fold 1, at any strength
        assert cross_fitted_pins(same, model, 0.5, strength).ttl_s.tolist() == [0.0, 600.0, 0.0]
    assert cross_fitted_ttls(same, model, 0.001, 0.0).ttl_s.tolist() == [0.0, 120.0, 0.0]


def test_the_best_theta_is_the_run_that_saved_most_and_the_smallest_of_equals():
    def run(saved: int) -> ReplayResult:
        return ReplayResult(policy="kvsched", hit_tokens=saved)

    assert best_theta({0.0: run(5), 0.5: run(9), 0.9: run(7)}) == 0.5
    assert best_theta({0.9: run(9), 0.2: run(9), 0.0: run(1)}) == 0.2


def test_replay_cost_alternates_which_policy_runs_first(monkeypatch):
    """Found by review: its docstring said it alternates, but LRU always ran before kvsched."""
    import kvsched.sim.replay as sim_replay
    from kvsched.bench.traces import replay_cost
    from kvsched.core.config import RetentionConfig

    order = []
    monkeypatch.setattr(sim_replay, "replay", lambda trace, policy, cfg: order.append(policy) or sum(range(10**5)))
    out = replay_cost(type("Trace", (), {"peak_live_blocks": lambda self: 100})(), 2.0, RetentionConfig(), reps=4)
    assert order == ["lru", "kvsched", "kvsched", "lru", "lru", "kvsched", "kvsched", "lru"]
    assert out["reps"] == 4 and len(out["cpu_s"]["lru"]) == len(out["cpu_s"]["kvsched"]) == 4
