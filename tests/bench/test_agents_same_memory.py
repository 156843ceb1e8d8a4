"""`kvsched bench agents`' stock-same-memory side: sized to the bytes of the kvsched side's pool and tier together
(the sizing `kvsched bench replay` uses), and the side the tier gates are judged against (no server started)."""

from __future__ import annotations

import pytest

from kvsched.bench.trace_engine import same_memory_blocks
from kvsched.cli import build_parser

TIER_FIELDS = ("demoted_blocks", "wasted_prefetches", "restored_tokens", "evicted_blocks", "restore_misses",
               "load_failures", "kv_rel_rms_error")


def side(prefill, ttft, tput=100.0, **extra):
    return {"prefill_tokens_computed": prefill, "prompt_tokens_total": 5000, "followup_ttft_p95_s": ttft,
            "throughput_tok_s": tput, "errors": 0, "turns": 30, **extra}


def fake_run(monkeypatch, tmp_path, argv):
    """run_benchmark with every server and side faked: (result, spec of each side)."""
    import kvsched.bench.agents as agents

    specs = {}
    monkeypatch.setattr(agents, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(agents, "tiny_model_dtype", lambda path: "bfloat16")
    monkeypatch.setattr(agents, "count_tokens", lambda model_dir, workflows: (11_231, 600))
    monkeypatch.setattr(agents, "start_all", lambda servers: servers)
    per_side = {"stock": side(1000, 0.5), "kvsched-no-tier": side(700, 0.6), "unbounded": side(420, 0.19),
                "stock-same-memory": side(430, 0.2),
                "kvsched": side(400, 0.23, tier=dict.fromkeys(TIER_FIELDS, 0)
                                | {"capacity_bytes": 123_000_000, "restores": 4, "prefetched_restores": 4})}

    def run_side(name, server, cfg, **kw):
        specs[name] = server.spec
        return dict(per_side[name]), 6000.0

    monkeypatch.setattr(agents, "run_side", run_side)
    return agents.run_benchmark(build_parser().parse_args(["bench", "agents", "--quick", *argv])), specs


def test_the_same_memory_side_runs_by_default_with_the_pool_and_default_tier_bytes(monkeypatch, tmp_path, capsys):
    """Found by review: the tier side (pool + FP8 tier of 2x the pool's bytes by default) was gated only against stock
    on the pool alone."""
    result, specs = fake_run(monkeypatch, tmp_path, [])
    n = specs["stock"].num_blocks
    assert specs["kvsched"].num_blocks == n and specs["stock-same-memory"].scheduler is None
    assert specs["stock-same-memory"].num_blocks == same_memory_blocks(n) == 3 * (n - 1) + 1
    cfg = result["config"]
    assert cfg["same_memory_num_blocks"] == 3 * (n - 1) + 1
    assert cfg["same_memory_pool_bytes"] == pytest.approx(3 * cfg["kv_pool_bytes"], rel=0.01)
    g, na = result["gates"], result["gates_not_applicable"]  # judged against stock-same-memory, whose pool holds
    assert "prefill_le_0.45x_stock_same_memory" in na and "prefill_le_0.45x_stock_same_memory" not in g  # it all
    assert na["followup_ttft_p95_le_0.3x_stock_same_memory"].startswith("not applicable (stock-same-memory's pool")
    assert not any(k.endswith("x_stock") or "unequal" in k for k in [*g, *na])
    assert result["ratio"]["kvsched"]["prefill_tokens_computed"] == 0.4  # kept: over stock, unequal memory
    assert result["ratio_same_memory"]["prefill_tokens_computed"] == pytest.approx(400 / 430)
    assert result["unbounded_reach"]["base"] == "stock-same-memory"
    from kvsched.bench.agents_report import print_report

    print_report(result)
    out = capsys.readouterr().out
    assert "kvsched/stock (unequal memory)" in out and "kvsched/stock-same-memory" in out
    assert "[N/A]  prefill_le_0.45x_stock_same_memory: not applicable (" in out


def test_where_the_same_memory_pool_falls_short_the_tier_gates_are_judged(monkeypatch, tmp_path, capsys):
    result, _ = fake_run(monkeypatch, tmp_path, ["--pressure", "3"])  # 3 x 117 blocks: short of the working set
    g = result["gates"]  # 400 > 0.45 x 430, 0.23 > 0.3 x 0.2
    assert not g["prefill_le_0.45x_stock_same_memory"] and not g["followup_ttft_p95_le_0.3x_stock_same_memory"]
    assert result["gates_not_applicable"] == {}
    from kvsched.bench.agents_report import print_report

    print_report(result)
    assert "[FAIL] prefill_le_0.45x_stock_same_memory" in capsys.readouterr().out


def test_an_explicit_tier_size_sizes_the_same_memory_pool(monkeypatch, tmp_path):
    result, specs = fake_run(monkeypatch, tmp_path, ["--fp8-tier-gb", "0.05"])
    n, pool = specs["stock"].num_blocks, result["config"]["kv_pool_bytes"]
    assert specs["stock-same-memory"].num_blocks == round((n - 1) * (1 + 0.05 * 2**30 / pool)) + 1


def test_without_the_same_memory_side_the_tier_gates_say_unequal_memory():
    from kvsched.bench.agents_report import gates

    g = gates({"stock": side(1000, 0.5), "kvsched": side(400, 0.1, tier={"restores": 0})})
    assert g["prefill_le_0.45x_stock_unequal_memory"] and g["followup_ttft_p95_le_0.3x_stock_unequal_memory"]
