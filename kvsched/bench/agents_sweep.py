"""`kvsched bench agents --sweep`: the same workload at several memory pressures (working set / KV pool), every side
at each, in one invocation; the JSON holds each pressure's full result, the PNG plots each side's prefill and
follow-up P95 TTFT over stock's at that pressure. Where retention alone fades (prompts in flight exceed the pool and
every pin must yield), the tier's capacity beyond the pool is what keeps the gain: the plot shows where."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from kvsched.bench.agents_report import NO_TIER_SIDE, TIER_SIDE, gates, gates_not_applicable, print_report, verdict
from kvsched.bench.common import RESULTS_DIR, provenance, write_json
from kvsched.bench.plots import PlotUnavailable, pyplot, save_figure

SWEEP_GATE_PRESSURE = 3.0  # the FP8-tier issue's sweep gate: at 3x, <= 0.5x stock prefill and <= 0.35x TTFT


def run_sweep(args: argparse.Namespace) -> int:
    from kvsched.bench.agents import SWEEP_PRESSURES, run_benchmark

    runs: dict[str, Any] = {}
    for pressure in SWEEP_PRESSURES:
        one = copy.copy(args)
        one.pressure, one.sweep = pressure, False
        print(f"\n=== pressure {pressure}x ===")
        result = run_benchmark(one)
        print_report(result)
        runs[str(pressure)] = result
    out: dict[str, Any] = {"pressures": runs, "summary": summary(runs), "provenance": provenance()}
    out["gates"] = sweep_gates(runs)
    out["gates_not_applicable"] = sweep_not_applicable(runs)
    path = args.out or RESULTS_DIR / ("agents_sweep_quick.json" if args.quick else "agents_sweep.json")
    write_json(path, out)
    try:
        print(f"wrote {plot(out['summary'], path.with_suffix('.png'))}")
    except PlotUnavailable as exc:
        print(exc)
    print_summary(out["summary"])
    for gate, ok in out["gates"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {gate}")
    for gate, why in out["gates_not_applicable"].items():
        print(f"  [N/A]  {gate}: {why}")
    code, line = verdict(out)
    print(line)
    return code


def summary(runs: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """pressure -> side -> {prefill, followup_ttft_p95, throughput} over stock's at that pressure."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for pressure, result in runs.items():
        out[pressure] = {side: {"prefill": r.get("prefill_tokens_computed"), "followup_ttft_p95":
                                r.get("followup_ttft_p95_s"), "throughput": r.get("throughput_tok_s")}
                         for side, r in result.get("ratio", {}).items() if isinstance(r, dict)}
    return out


def sweep_gates(runs: dict[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for pressure, result in runs.items():
        if float(pressure) == SWEEP_GATE_PRESSURE:
            g = gates(result, prefill=0.5, ttft=0.35)
            out.update({f"{pressure}x_{k}": v for k, v in g.items() if "throughput" not in k})
    return out


def sweep_not_applicable(runs: dict[str, Any]) -> dict[str, str]:
    """The sweep gates that do not apply (agents_report.gates_not_applicable at the gate's pressure)."""
    out: dict[str, str] = {}
    for pressure, result in runs.items():
        if float(pressure) == SWEEP_GATE_PRESSURE:
            na = gates_not_applicable(result, prefill=0.5, ttft=0.35)
            out.update({f"{pressure}x_{k}": v for k, v in na.items() if "throughput" not in k})
    return out


def print_summary(s: dict[str, dict[str, dict[str, float | None]]]) -> None:
    print("\nside / stock at each pressure (prefill tokens computed, follow-up P95 TTFT):")
    for pressure, sides in s.items():
        cells = ", ".join(f"{side} {v['prefill']:.3f} / {v['followup_ttft_p95']:.3f}" for side, v in sides.items()
                          if v["prefill"] is not None and v["followup_ttft_p95"] is not None)
        print(f"  {pressure}x: {cells}")


def plot(s: dict[str, dict[str, dict[str, float | None]]], path: Path) -> Path:
    plt = pyplot()
    pressures = sorted(s, key=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "prefill", "prefill tokens computed / stock"),
                              (axes[1], "followup_ttft_p95", "follow-up TTFT p95 / stock")):
        for side in (NO_TIER_SIDE, TIER_SIDE, "unbounded"):
            xs = [float(p) for p in pressures if side in s[p] and s[p][side][metric] is not None]
            ys = [s[p][side][metric] for p in pressures if side in s[p] and s[p][side][metric] is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=side)
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="stock")
        ax.set_xscale("log", base=2)
        ax.set_xticks([float(p) for p in pressures], [f"{p}x" for p in pressures])
        ax.set_xlabel("working set / KV pool")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("kvsched bench agents --sweep: kvsched (FP8 tier on) and without its tier, against stock vLLM")
    return save_figure(fig, path)
