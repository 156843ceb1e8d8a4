"""`kvsched bench agents` argument handling (no server started)."""

import argparse

import pytest

from kvsched.bench.agents import attainable, parse_sides
from kvsched.cli import build_parser


def test_sides_are_validated_and_deduplicated():
    assert parse_sides("stock, kvsched,stock") == ["stock", "kvsched"]
    assert parse_sides("kvsched-no-tier,unbounded") == ["kvsched-no-tier", "unbounded"]
    with pytest.raises(argparse.ArgumentTypeError, match="bogus"):
        parse_sides("stock,bogus")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sides(" , ")


def test_unknown_side_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "agents", "--sides", "stock,nonsense"])
    assert exc.value.code == 2
    assert "nonsense" in capsys.readouterr().err


def test_workload_shape_options_reach_the_workload():
    from kvsched.bench.agents import workload_config

    args = build_parser().parse_args(["bench", "agents", "--quick", "--worker-turns", "5", "--tool-words", "40",
                                      "--brief-words", "90"])
    cfg = workload_config(args)
    assert (cfg.worker_turns, cfg.tool_words, cfg.brief_words) == (5, 40, 90)


def test_attainable_share_of_the_floor_for_each_kvsched_side():
    side = lambda n: {"prefill_tokens_computed": n}  # noqa: E731
    b = attainable({"stock": side(1000), "kvsched-no-tier": side(700), "kvsched": side(350), "unbounded": side(400)})
    assert b["floor_over_stock"] == pytest.approx(0.4)
    assert b["kvsched_no_tier_share_of_attainable_saving"] == pytest.approx(0.5)
    assert b["kvsched_over_stock"] == pytest.approx(0.35)  # the tier holds KV beyond the pool: below the floor
    assert b["kvsched_share_of_attainable_saving"] == pytest.approx(650 / 600)
    assert "kvsched_over_stock" not in attainable({"stock": side(1000), "unbounded": side(400)})


def test_gates_read_the_tier_side_against_stock_and_the_prefetched_share():
    from kvsched.bench.agents_report import gates

    def side(prefill, ttft, tput, errors=0, restores=0, prefetched=0):
        return {"prefill_tokens_computed": prefill, "followup_ttft_p95_s": ttft, "throughput_tok_s": tput,
                "errors": errors, "tier": {"restores": restores, "prefetched_restores": prefetched}}

    good = {"stock": side(1000, 1.0, 100), "kvsched": side(400, 0.25, 130, restores=10, prefetched=6),
            "kvsched-no-tier": side(900, 0.9, 100)}
    assert all(gates(good).values()) and len(gates(good)) == 7
    bad = dict(good, kvsched=side(460, 0.35, 110, restores=10, prefetched=4), unbounded=side(300, 0.1, 200, errors=1))
    g = gates(bad)
    assert not any(g[k] for k in ("prefill_le_0.45x_stock_unequal_memory",
                                  "followup_ttft_p95_le_0.3x_stock_unequal_memory",
                                  "throughput_ge_1.2x_stock_unequal_memory", "half_of_restores_prefetched",
                                  "zero_errors"))
    assert g["no_tier_prefill_le_stock"]
    assert not gates(dict(good, **{"kvsched-no-tier": side(1001, 1, 1)}))["no_tier_prefill_le_stock"]


def test_trace_dir_that_is_a_file_is_a_usage_error_before_any_server_starts(tmp_path, capsys):
    not_a_dir = tmp_path / "traces"
    not_a_dir.write_text("x")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "agents", "--quick", "--trace-dir", str(not_a_dir)])
    assert exc.value.code == 2
    assert "not a directory" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "agents", "--trace-dir", str(tmp_path / "new")])
    assert args.trace_dir == tmp_path / "new"


def test_a_sweep_summary_and_plot_from_per_pressure_ratios(tmp_path):
    from kvsched.bench.agents_sweep import plot, summary, sweep_gates

    def run(tier_prefill, tier_ttft):
        stock = {"prefill_tokens_computed": 1000, "followup_ttft_p95_s": 1.0, "throughput_tok_s": 10.0, "errors": 0}
        tier = dict(stock, prefill_tokens_computed=1000 * tier_prefill, followup_ttft_p95_s=tier_ttft,
                    tier={"restores": 4, "prefetched_restores": 4})
        return {"stock": stock, "kvsched": tier,
                "ratio": {"kvsched": {"prefill_tokens_computed": tier_prefill, "followup_ttft_p95_s": tier_ttft,
                                      "throughput_tok_s": 1.0}}}

    runs = {"1.5": run(0.3, 0.2), "3.0": run(0.45, 0.3), "6.0": run(0.7, 0.6)}
    s = summary(runs)
    assert s["3.0"]["kvsched"] == {"prefill": 0.45, "followup_ttft_p95": 0.3, "throughput": 1.0}
    g = sweep_gates(runs)
    assert g["3.0x_prefill_le_0.5x_stock_unequal_memory"]  # (no stock-same-memory side in these runs)
    assert g["3.0x_followup_ttft_p95_le_0.35x_stock_unequal_memory"]
    assert not sweep_gates({"3.0": run(0.55, 0.3)})["3.0x_prefill_le_0.5x_stock_unequal_memory"]
    png = plot(s, tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_session_naming_adds_a_kvsched_side_per_naming_and_names_fields():
    from kvsched.bench.agents_naming import parse_namings, session_fields, with_naming_sides

    args = build_parser().parse_args(["bench", "agents", "--quick", "--sides", "stock,kvsched",
                                      "--session-header", "none,prompt_cache_key"])
    assert args.session_header == ["none", "prompt_cache_key"]
    assert with_naming_sides(["stock", "kvsched"], args.session_header) == \
        ["stock", "kvsched", "kvsched:none", "kvsched:prompt_cache_key"]
    assert with_naming_sides(["stock", "kvsched"], parse_namings("header")) == ["stock", "kvsched"]
    assert session_fields("none", "wf/1", "worker", 60.0, True) == ({}, {})
    assert session_fields("prompt_cache_key", "wf/1", "worker", 60.0, True) == ({}, {"prompt_cache_key": "wf/1"})
    headers, body = session_fields("header", "wf/1", "worker", 60.0, True)
    assert headers["X-Session-Id"] == "wf/1" and headers["X-Session-End"] == "1" and body == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "agents", "--session-header", "cookie"])


def test_naming_gate_is_the_share_of_the_header_sides_saving():
    from kvsched.bench.agents_naming import add_naming_gates

    side = lambda n, errors=0: {"prefill_tokens_computed": n, "errors": errors}  # noqa: E731
    result = {"stock": side(1000), "kvsched": side(600), "kvsched:none": side(630),
              "kvsched:prompt_cache_key": side(700, errors=1)}
    add_naming_gates(result)
    assert result["naming_saving_share"] == {"kvsched:none": pytest.approx(0.925),
                                             "kvsched:prompt_cache_key": pytest.approx(0.75)}
    assert result["gates"] == {"kvsched:none_saving_ge_0.9x_header": True,
                               "kvsched:prompt_cache_key_saving_ge_0.9x_header": False}


def test_the_unbounded_sides_reach_says_which_latency_gates_any_policy_could_pass():
    from kvsched.bench.agents_report import unbounded_reach

    side = lambda ttft, thr: {"followup_ttft_p95_s": ttft, "throughput_tok_s": thr}  # noqa: E731
    r = unbounded_reach({"stock": side(0.5, 2400), "unbounded": side(0.19, 2650)})
    assert r["followup_ttft_p95_over_base"] == pytest.approx(0.38)
    assert r["throughput_over_base"] == pytest.approx(2650 / 2400)
    assert r["base"] == "stock"
    assert not r["followup_ttft_p95_le_0.3x_reachable"] and not r["throughput_ge_1.2x_reachable"]
    r = unbounded_reach({"stock": side(2.0, 1000), "unbounded": side(0.2, 1500)})
    assert r["followup_ttft_p95_le_0.3x_reachable"] and r["throughput_ge_1.2x_reachable"]
    assert unbounded_reach({"stock": side(1, 1)}) == {}


def test_a_side_with_failed_turns_or_other_prompts_gets_no_ratio_and_fails_its_gates():
    """Found by review: a kvsched side whose every follow-up failed (TTFT None) passed the TTFT gate ((None or 0) <=
    ...), and a side that failed turns was credited with the prefill it never computed."""
    from kvsched.bench.agents_report import compare, gates, unbounded_reach

    def side(prefill, ttft, errors=0, prompt=75_000):
        return {"prefill_tokens_computed": prefill, "prompt_tokens_total": prompt, "followup_ttft_p95_s": ttft,
                "throughput_tok_s": 3000, "errors": errors, "turns": 90,
                "tier": {"restores": 10, "prefetched_restores": 10}}

    stock = side(28_000, 0.5) | {"throughput_tok_s": 2400}
    result = {"stock": stock, "kvsched": side(11_000, None, errors=40, prompt=60_000),
              "kvsched-no-tier": side(15_000, 0.4, prompt=74_000), "unbounded": side(12_000, 0.2, errors=1)}
    compare(result, list(result))
    assert result["kvsched"]["invalid"] == "40 of 90 turns failed"
    assert result["kvsched-no-tier"]["invalid"] == "74000 prompt tokens served, stock 75000"
    assert "invalid" not in result["stock"] and set(result["ratio"]) == set()  # no ratio for an invalid side
    assert "ratio_tier_over_no_tier" not in result
    g = gates(result)
    assert not any(g.values()), g
    assert unbounded_reach(result) == {}
    # a valid side with no follow-up TTFT measured fails the TTFT gate, it does not pass it
    no_ttft = {"stock": stock, "kvsched": side(11_000, None)}
    g = gates(no_ttft)
    assert not g["followup_ttft_p95_le_0.3x_stock_unequal_memory"] and g["prefill_le_0.45x_stock_unequal_memory"]


def test_the_tier_size_help_states_the_servers_default_rule_with_its_host_memory_cap():
    """Found by review: the help said the default was "2x the KV pool", leaving out the server's host-memory cap
    (kvsched.core.tier_config.auto_budget_bytes), which the same-memory side's sizing does not follow."""
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    agents = bench._subparsers._group_actions[0].choices["agents"]
    text = " ".join(next(a.help for a in agents._actions if "--fp8-tier-gb" in a.option_strings).split())
    assert "min(2x the KV pool's bytes, 0.25 x the host memory available at start-up / GPUs on the host)" in text
    assert "stock-same-memory" in text
