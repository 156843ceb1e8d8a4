"""`kvsched demo` hands `kvsched bench agents` a complete set of options (every one the benchmark's parser defines)."""

from __future__ import annotations

import argparse

from kvsched.bench import agents
from kvsched.commands.demo import bench_args


def agents_dests() -> set[str]:
    parser = argparse.ArgumentParser()
    agents.register(parser.add_subparsers(dest="bench"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["agents"]
    return {a.dest for a in sub._actions if a.dest != "help"}


def test_demo_passes_every_option_the_agents_benchmark_reads() -> None:
    got = bench_args(argparse.Namespace(workflows=2, no_progress=True))
    missing = agents_dests() - set(vars(got))
    assert not missing, f"demo leaves out {missing}"
    assert got.sides == ["stock", "kvsched"] and got.quick and got.workflows == 2 and got.no_progress
    assert got.fidelity_probes == 0 and got.fp8_tier_gb is None and got.no_replay
    assert agents.workload_config(got).workflows == 2  # the workload the benchmark will build reads them
    assert agents.workload_config(got).rounds == agents.QUICK.rounds
    shorter = bench_args(argparse.Namespace(workflows=1, rounds=1, no_progress=True))
    assert agents.workload_config(shorter).rounds == 1


def test_plain_words_say_what_changed_without_gates() -> None:
    from kvsched.commands.demo import plain_words

    side = {"prefill_tokens_computed": 1000, "followup_ttft_p95_s": 0.4, "followup_ttft_p50_s": 0.2,
            "throughput_tok_s": 100.0, "turns": 30, "errors": 0}
    kv = side | {"prefill_tokens_computed": 400, "followup_ttft_p95_s": 0.1, "retained_hits": 12,
                 "retained_hit_tokens": 600, "sessions_seen": 9,
                 "tier": {"demoted_blocks": 5, "restores": 3, "restored_tokens": 96}}
    cfg = {"sessions": 9, "kv_pool_tokens": 4096, "model": {"size": "bench", "dtype": "float32"}}
    text = plain_words({"stock": side, "kvsched": kv, "config": cfg})
    assert "1,000 with stock vLLM, 400 with kvsched (60% less)" in text
    assert "0.400 s -> 0.100 s (4.0x faster)" in text
    assert "12 turns started on KV" in text and "3 turns restored 96 prompt tokens" in text
    assert "Errors: none" in text and "FAIL" not in text
    worse = plain_words({"stock": side, "kvsched": side | {"prefill_tokens_computed": 1100, "errors": 2}, "config": cfg})
    assert "(10% more)" in worse and "kvsched 2" in worse  # said as it is when kvsched does worse


def test_a_plot_without_matplotlib_is_one_clear_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import builtins

    from kvsched.cli import main

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = main(["plan", "--preset", "llama-3.1-8b", "--sessions", "10", "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 2 and "matplotlib is not installed" in err and "Traceback" not in err
    from kvsched.bench.plots import save_beside

    assert save_beside(tmp_path / "r.json", lambda path: __import__("kvsched.bench.plots").bench.plots.pyplot()) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
