"""`kvsched demo` (what `make demo` runs): a short multi-agent workload through stock vLLM and through kvsched.

Builds the local random-weight model (in the dtype this CPU computes fastest), serves it twice on loopback with the
same KV memory (once stock, once with `--scheduler kvsched`), drives the same seeded orchestrator/worker sessions
through the real `openai` client, and says in plain words what kvsched changed, with a chart of every turn's time to
first token. It is a demonstration, not a benchmark run: no pass/fail lines (those are `kvsched bench agents`').
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kvsched.bench.agents import print_report, run_benchmark
from kvsched.bench.args import check_args, check_out_path, count, refuse
from kvsched.bench.common import RESULTS_DIR, write_json
from kvsched.bench.plots import PlotUnavailable, ttft_chart
from kvsched.bench.replay_memory import HostMemoryError

MAX_WORKFLOWS = 1000  # a demonstration on a CPU: a thousand workflows already take hours


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("demo", help="stock vLLM vs kvsched on a short agent workload")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "demo.json",
                   help="result JSON; the TTFT chart is written beside it (same name, .png)")
    p.add_argument("--workflows", type=int, default=3, help=f"agent workflows (1 to {MAX_WORKFLOWS:,})")
    p.add_argument("--rounds", type=int, default=None,
                   help="orchestrator rounds per workflow (default: the quick workload's 3); fewer: a shorter demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The demo's `kvsched bench agents` options, parsed by that benchmark's own parser so that every option it has
    gets its default (a hand-built namespace broke when the benchmark gained one)."""
    from kvsched.bench import agents

    parser = argparse.ArgumentParser(prog="kvsched bench")
    agents.register(parser.add_subparsers(dest="bench"))
    argv = ["agents", "--quick", "--sides", "stock,kvsched", "--workflows", str(args.workflows), "--seed", "0",
            "--pressure", "1.5", "--fidelity-probes", "0", "--no-replay"]
    rounds = getattr(args, "rounds", None)
    argv += ["--rounds", str(rounds)] if rounds is not None else []
    return parser.parse_args(argv + (["--no-progress"] if args.no_progress else []))


def check(args: argparse.Namespace) -> None:
    """The options, before any server starts (found by review: --workflows 0 was a traceback and --workflows -1,
    --rounds 0 or an --out naming a directory started both servers, the last to fail once the run was over)."""
    check_args(args, workflows=count(1, MAX_WORKFLOWS), rounds=count(1, MAX_WORKFLOWS))
    check_out_path("--out", args.out)  # found by review: one under a file or in a read-only directory, once run
    if args.out.suffix.lower() == ".png":
        raise ValueError(f"--out {args.out} names the result JSON; its chart is written beside it as .png")
    if (chart := args.out.with_suffix(".png")).is_dir():  # found by review: a traceback once the run was over
        raise ValueError(f"--out {args.out}: its chart's path {chart} is a directory")


def run(args: argparse.Namespace) -> int:
    try:
        check(args)
    except ValueError as exc:
        return refuse("kvsched demo", exc)
    print("kvsched demo: the same multi-agent workload (orchestrator + workers, ~2 s tool calls) through stock vLLM "
          "and through `vllm serve --scheduler kvsched`, with the same KV memory (1.5x oversubscribed).\n")
    started = time.monotonic()
    try:
        result = run_benchmark(bench_args(args))
    except HostMemoryError as exc:  # its servers' pools past this host's memory, found before either starts
        # (found by review69: the refusal named --pressure, which the demo sets itself and does not take)
        return refuse("kvsched demo", ValueError(
            f"its workload ({args.workflows} workflow(s), the KV pool oversubscribed {exc.pressure:g}x) makes "
            f"{exc.detail}; fewer --workflows or --rounds need less"))
    write_json(args.out, result)
    chart = args.out.with_suffix(".png")
    try:
        ttft_chart({side: result[side]["turn_ttfts"] for side in ("stock", "kvsched")}, chart,
                   "Time to first token of every turn: stock vLLM vs kvsched")
        chart_line = f"Chart: {chart} (every turn's time to first token; lines are medians per turn)"
    except PlotUnavailable as exc:
        chart_line = str(exc)
    print()
    print(plain_words(result))
    print(chart_line)
    print(f"\nThe figures behind it ({args.out}; `kvsched bench agents` runs the full comparison):")
    print_report(result, show_gates=False)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0 if result["kvsched"]["errors"] == 0 and result["stock"]["errors"] == 0 else 1


def _pct_less(before: float, after: float) -> str:
    if not before:
        return "n/a"
    change = (before - after) / before
    return f"{change:.0%} less" if change >= 0 else f"{-change:.0%} more"


def _faster(before: float | None, after: float | None) -> str:
    if not before or not after:
        return "n/a"
    return f"{before / after:.1f}x faster" if after <= before else f"{after / before:.1f}x slower"


def plain_words(result: dict[str, Any]) -> str:
    """What kvsched changed, one sentence a line, for someone who has not read the benchmark's table."""
    s, k, cfg = result["stock"], result["kvsched"], result["config"]
    sp, kp = s["prefill_tokens_computed"], k["prefill_tokens_computed"]
    lines = [
        f"What kvsched changed ({cfg['sessions']} agent sessions, {s['turns']} turns each side, "
        f"model {cfg['model']['size']} in {cfg['model']['dtype']}, KV memory for {cfg['kv_pool_tokens']:,} tokens):",
        f"  - Prompt tokens the engine had to compute: {sp:,} with stock vLLM, {kp:,} with kvsched "
        f"({_pct_less(sp, kp)}); the rest came from KV kept in memory.",
        f"  - Time to first token of follow-up turns (95th percentile): {_fmt_s(s['followup_ttft_p95_s'])} -> "
        f"{_fmt_s(k['followup_ttft_p95_s'])} ({_faster(s['followup_ttft_p95_s'], k['followup_ttft_p95_s'])}); "
        f"median {_fmt_s(s['followup_ttft_p50_s'])} -> {_fmt_s(k['followup_ttft_p50_s'])}.",
        f"  - Throughput: {s['throughput_tok_s']:.0f} -> {k['throughput_tok_s']:.0f} tokens/s.",
    ]
    if "retained_hits" in k:
        lines.append(f"  - Sessions: kvsched saw {k['sessions_seen']}; {k['retained_hits']} turns started on KV it had "
                     f"kept for their session between turns ({k['retained_hit_tokens']:,} prompt tokens not "
                     f"recomputed).")
    tier = k.get("tier")
    if tier:
        lines.append(f"  - FP8 tier (host memory): {tier['demoted_blocks']} KV blocks moved there when memory pressure or a "
                     f"TTL released them, instead of being dropped; {tier['restores']} turns restored {tier['restored_tokens']:,} "
                     f"prompt tokens from it instead of recomputing them.")
    errors = s["errors"] + k["errors"]
    lines.append("  - Errors: none." if not errors else f"  - Errors: stock {s['errors']}, kvsched {k['errors']}.")
    return "\n".join(lines)


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"
