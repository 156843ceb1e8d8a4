"""`kvsched plan`: size an agent fleet's KV cache, the GPUs it needs, and its cost against a managed API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvsched.core.gpu_catalog import load_catalog
from kvsched.core.planner import (
    GIB,
    PRESETS,
    Levers,
    ModelShape,
    PlanError,
    Topology,
    Workload,
    cost,
    plan,
    with_levers,
)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="capacity planner: KV bytes, sessions per GPU, cost vs a managed API",
        description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in model shape (default llama-3.1-8b)")
    src.add_argument("--model", type=Path, help="a local HF model directory or config.json")
    p.add_argument("--kv-dtype", default="fp16", help="fp16 | bf16 | fp8 (default fp16)")
    p.add_argument("--weight-dtype", default=None, help="default: fp8 with an fp8 KV cache, else bf16")
    p.add_argument("--context", type=int, default=8192, help="tokens per session, p95 (sizes memory)")
    p.add_argument("--context-p50", type=int, default=None, help="typical session length (reported beside p95)")
    p.add_argument("--sessions", type=int, default=100, help="concurrent workflows")
    p.add_argument("--topology", choices=[t.value for t in Topology], default="flat")
    p.add_argument("--agents", type=int, default=1,
                   help="flat: agents per workflow; hierarchical: workers per orchestrator; pipeline: stages")
    p.add_argument("--tool-calls", type=int, default=0, help="tool calls per session (each stays in the KV cache)")
    p.add_argument("--tool-tokens", type=int, default=500, help="tokens per tool result")
    p.add_argument("--overhead", type=float, default=0.15, help="runtime, CUDA context, OS (default 0.15)")
    p.add_argument("--ceiling", type=float, default=0.90, help="largest share of VRAM to plan on (default 0.90)")
    p.add_argument("--gpu-catalog", type=Path, default=None, help="TOML catalogue (default: kvsched/assets/gpus.toml)")
    cost_g = p.add_argument_group("cost")
    cost_g.add_argument("--tokens-per-interaction", type=float, default=950.0)
    cost_g.add_argument("--interactions-per-hour", type=float, default=500.0)
    cost_g.add_argument("--api-price", type=float, default=0.40, help="managed API $ per million tokens")
    cost_g.add_argument("--cost-gpu", default="H100-SXM5-80GB", help="catalogue GPU to price against the API")
    p.add_argument("--with-kvsched", action="store_true", help="also plan with kvsched's levers (FP8 KV, compaction)")
    p.add_argument("--compaction-trigger", type=int, default=5000)
    p.add_argument("--summary-tokens", type=int, default=500)
    p.add_argument("--recent-tokens", type=int, default=2000)
    p.add_argument("--pin-budget", type=float, default=1.0,
                   help="kvsched's retention budget: largest share of the KV pool idle sessions may keep pinned")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", type=Path, default=None, help="PNG: sessions per GPU against context length")
    p.set_defaults(func=run)


def build(args: argparse.Namespace) -> dict[str, Any]:
    shape = ModelShape.from_hf_config(args.model) if args.model else ModelShape.from_preset(args.preset or
                                                                                            "llama-3.1-8b")
    workload = Workload(workflows=args.sessions, topology=Topology(args.topology), agents=args.agents,
                        context=args.context, context_p50=args.context_p50, tool_calls=args.tool_calls,
                        tool_tokens=args.tool_tokens)
    gpus = load_catalog(args.gpu_catalog)
    base = plan(shape, workload, args.kv_dtype, args.weight_dtype, args.overhead, args.ceiling, gpus)
    by_name = {g.name: g for g in gpus}
    if args.cost_gpu not in by_name:
        raise PlanError(f"--cost-gpu {args.cost_gpu!r} is not in the catalogue ({', '.join(by_name)})")
    g = by_name[args.cost_gpu]
    out: dict[str, Any] = {
        "model": asdict(shape), "workload": {**asdict(workload), "topology": workload.topology.value,
                                             "kv_slots": workload.kv_slots, "session_tokens": workload.session_tokens},
        "plan": base.as_dict(),
        "cost": {"gpu": g.name, **asdict(cost(args.tokens_per_interaction, args.interactions_per_hour, args.api_price,
                                              g.price_per_hour, g.interactions_per_hour))},
    }
    if args.with_kvsched:
        out["with_kvsched"] = {}
        levers = Levers(fp8=True, compaction_trigger=args.compaction_trigger, summary_tokens=args.summary_tokens,
                        recent_tokens=args.recent_tokens)
        fp8 = plan(shape, workload, "fp8", args.weight_dtype, args.overhead, args.ceiling, gpus)
        compacted = with_levers(workload, levers)
        comp = plan(shape, compacted, args.kv_dtype, args.weight_dtype, args.overhead, args.ceiling, gpus)
        both = plan(shape, compacted, "fp8", args.weight_dtype, args.overhead, args.ceiling, gpus)
        if not 0.0 <= args.pin_budget <= 1.0:
            raise PlanError("--pin-budget must be within [0, 1]")
        out["with_kvsched"] = {"fp8_kv": fp8.as_dict(), "compaction": comp.as_dict(), "fp8_kv+compaction": both.as_dict(),
                               "levers": asdict(levers), "compacted_session_tokens": compacted.session_tokens,
                               "pin_budget": args.pin_budget}
        for q in out["with_kvsched"].values():
            if isinstance(q, dict) and "fits" in q:
                for f in q["fits"]:  # idle sessions a replica keeps resident between turns within the budget
                    f["retained_idle_sessions_per_replica"] = int(f["sessions_per_replica"] * args.pin_budget)
    return out


def _gib(b: float) -> str:
    return f"{b / GIB:,.2f} GiB"


def render(result: dict[str, Any]) -> str:
    from kvsched.bench.common import table

    p, w, c = result["plan"], result["workload"], result["cost"]
    lines = [
        f"model {p['model']}: KV {p['kv_dtype']}, weights {p['weight_dtype']}",
        f"  KV bytes per token      {p['bytes_per_token']:,} B",
        f"  KV per session          {_gib(p['kv_per_session_bytes'])} ({w['session_tokens']:,} tokens p95; "
        f"p50 {_gib(p['kv_per_session_p50_bytes'])})",
        f"  concurrent KV slots     {p['kv_slots']:,} ({w['topology']}, {w['workflows']} workflows)",
        f"  KV total                {_gib(p['kv_total_bytes'])}",
        f"  weights                 {_gib(p['weights_bytes'])}",
        f"  total (+{p['overhead']:.0%} runtime)    {_gib(p['total_bytes'])}",
        "",
        table([[f["gpu"], f["tensor_parallel"], f["sessions_per_replica"], f["replicas"], f["gpus"],
                f"${f['cost_per_hour']:,.2f}"] for f in p["fits"]],
              ["GPU", "TP", "sessions/replica", "replicas", "GPUs", "$/h"]),
        "",
        (f"cost on {c['gpu']}: API ${c['api_per_hour']:.3f}/h vs GPU prorated ${c['gpu_prorated_per_hour']:.3f}/h; "
                 f"per 1,000 interactions API ${c['api_per_1k_interactions']:.3f} vs GPU "
                 f"${c['gpu_per_1k_interactions']:.3f} -> {'GPU' if c['gpu_wins'] else 'API'} wins per interaction; "
                 f"a dedicated GPU beats the API above {c['breakeven_interactions_per_hour']:,.0f} interactions/h "
                 f"({c['breakeven_utilisation']:.0%} of its capacity)"),
    ]
    if "with_kvsched" in result:
        k = result["with_kvsched"]
        rows = []
        for label, q in (("baseline", p), ("fp8 KV", k["fp8_kv"]), ("compaction", k["compaction"]),
                         ("fp8 KV + compaction", k["fp8_kv+compaction"])):
            best = max(q["fits"], key=lambda f: f["sessions_per_replica"] / f["tensor_parallel"], default=None)
            rows.append([label, _gib(q["kv_per_session_bytes"]), _gib(q["kv_total_bytes"]),
                         min((f["gpus"] for f in q["fits"]), default="-"),
                         f"{best['sessions_per_replica']} on {best['tensor_parallel']}x {best['gpu']}" if best else "-",
                         best.get("retained_idle_sessions_per_replica", "-") if best else "-"])
        lines += ["", f"with kvsched (compaction leaves <= {k['compacted_session_tokens']:,} tokens per session; "
                      f"pin budget {k['pin_budget']:.0%} of the KV pool):",
                  table(rows, ["plan", "KV/session", "KV total", "fewest GPUs", "densest replica",
                               "idle sessions kept/replica"])]
    return "\n".join(lines)


def plot(args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [2048 * 2**i for i in range(7)]  # 2k .. 128k
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gpu in load_catalog(args.gpu_catalog):
        ys = []
        for ctx in contexts:
            q = build(replace_ns(args, context=ctx, context_p50=None, with_kvsched=False))
            fit = next((f for f in q["plan"]["fits"] if f["gpu"] == gpu.name), None)
            ys.append(fit["sessions_per_replica"] / fit["tensor_parallel"] if fit else float("nan"))
        ax.plot(contexts, ys, marker="o", label=gpu.name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_xlabel("context per session (tokens)")
    ax.set_ylabel("sessions per GPU")
    ax.set_title(f"{args.preset or args.model or 'llama-3.1-8b'}, KV {args.kv_dtype}")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replace_ns(ns: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(ns), **changes})


def run(args: argparse.Namespace) -> int:
    try:
        result = build(args)
        if args.plot:
            plot(args, args.plot)
            result["plot"] = str(args.plot)
    except PlanError as exc:
        print(f"kvsched plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


__all__ = ["register", "run", "build", "render"]
