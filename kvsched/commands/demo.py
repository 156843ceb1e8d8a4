"""`kvsched demo` (what `make demo` runs): a short multi-agent workload through stock vLLM and through kvsched.

Builds the local random-weight model, serves it twice on loopback with the same KV memory (once stock, once with
`--scheduler kvsched`), drives the same seeded orchestrator/worker sessions through the real `openai` client, and
prints what kvsched changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvsched.bench.agents import print_report, run_benchmark
from kvsched.bench.common import RESULTS_DIR, write_json


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("demo", help="stock vLLM vs kvsched on a short agent workload")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "demo.json")
    p.add_argument("--workflows", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The demo's `kvsched bench agents` options, parsed by that benchmark's own parser so that every option it has
    gets its default (a hand-built namespace broke when the benchmark gained one)."""
    from kvsched.bench import agents

    parser = argparse.ArgumentParser(prog="kvsched bench")
    agents.register(parser.add_subparsers(dest="bench"))
    argv = ["agents", "--quick", "--sides", "stock,kvsched", "--workflows", str(args.workflows), "--seed", "0",
            "--pressure", "1.5", "--fidelity-probes", "0"]
    return parser.parse_args(argv + (["--no-progress"] if args.no_progress else []))


def run(args: argparse.Namespace) -> int:
    print("kvsched demo: the same multi-agent workload (orchestrator + workers, ~2 s tool calls) through stock vLLM "
          "and through `vllm serve --scheduler kvsched`, with the same KV memory (1.5x oversubscribed).\n")
    result = run_benchmark(bench_args(args))
    print()
    print(headline(result))
    print()
    print_report(result)
    write_json(args.out, result)
    return 0 if result["kvsched"]["errors"] == 0 else 1


def headline(result: dict[str, Any]) -> str:
    s, k = result["stock"], result["kvsched"]

    def change(key: str) -> str:
        a, b = s.get(key), k.get(key)
        if not a or b is None:
            return "n/a"
        return f"{a:.3g} -> {b:.3g} ({(b / a - 1) * 100:+.0f}%)"

    lines = [
        "What kvsched changed:",
        f"  prefill tokens computed : {change('prefill_tokens_computed')}",
        f"  prefix-cache hit rate   : {s['prefix_hit_rate']:.0%} -> {k['prefix_hit_rate']:.0%}",
        f"  follow-up TTFT p95 (s)  : {change('followup_ttft_p95_s')}",
        f"  TTFT p50 (s)            : {change('ttft_p50_s')}",
        f"  throughput (tok/s)      : {change('throughput_tok_s')}",
        f"  errors                  : stock {s['errors']}, kvsched {k['errors']}",
    ]
    if "retained_hit_tokens" in k:
        lines.append(f"  prompt tokens served from KV that kvsched kept between turns: {k['retained_hit_tokens']}")
    return "\n".join(lines)
