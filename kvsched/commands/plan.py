"""`kvsched plan`: size an agent fleet's KV cache, the GPUs it needs, and its cost against a managed API."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvsched.bench.args import check_args, count, number, only_with
from kvsched.core.gpu_catalog import load_catalog
from kvsched.core.planner import GIB, PRESETS, ModelShape, PlanError, kv_cache_dtype
from kvsched.core.planner_cost import REFERENCE_PARAMS, cost, fleet_cost, replica_interactions_per_hour
from kvsched.core.planner_fleet import Levers, Plan, Topology, Workload, plan, summary_calls, with_levers

DEFAULT_PRESET = "llama-3.1-8b"
DEFAULT_COST_GPU = "H100-SXM5-80GB"
LEVERS = {"compaction_trigger": 5000, "summary_tokens": 500, "recent_tokens": 2000, "pin_budget": 1.0}  # --with-kvsched
LIMITS = {"context": count(1, 2**30), "context_p50": count(1, 2**30), "sessions": count(1, 10**9),
          "agents": count(1, 10**6), "tool_calls": count(0, 10**6), "tool_tokens": count(0, 2**30),
          "overhead": number(0, 1), "ceiling": number(0, 1, low_open=True),
          # an interaction of a fraction of a token, or a price of 1e-300 $/M, made the cost arithmetic divide by a
          # zero it underflowed to (found by review)
          "tokens_per_interaction": number(1, 1e12), "interactions_per_hour": number(0, 1e12),
          "api_price": number(1e-6, 1e9), "compaction_trigger": count(0, 2**30),
          "summary_tokens": count(0, 2**30), "recent_tokens": count(0, 2**30), "pin_budget": number(0, 1)}


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="capacity planner: KV bytes, sessions per GPU, cost vs a managed API", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a built-in model shape: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    src.add_argument("--model", type=Path, help="a local HF model directory or its config.json")
    orch = p.add_mutually_exclusive_group()
    orch.add_argument("--orchestrator-preset", help="hierarchical: the orchestrator runs this model in its own pool")
    orch.add_argument("--orchestrator-model", type=Path, help="hierarchical: the orchestrator's HF model dir/config")
    p.add_argument("--kv-dtype", default="fp16",
                   help="KV cache dtype: fp16 | bf16 | fp8 | auto (the model's, as vLLM's default) (default fp16)")
    p.add_argument("--weight-dtype", default=None,
                   help="bf16 | fp16 | fp8 | int8 | int4 (default: the checkpoint's; a preset's is bf16); fp8 on a "
                        "16-bit checkpoint is served with --quantization fp8")
    p.add_argument("--context", type=int, default=8192, help="tokens per session at p95 (sizes memory)")
    p.add_argument("--context-p50", type=int, default=None, help="typical tokens per session (reported beside p95)")
    p.add_argument("--sessions", type=int, default=100, help="concurrent workflows")
    p.add_argument("--topology", choices=[t.value for t in Topology], default="flat")
    p.add_argument("--agents", type=int, default=1,
                   help="flat: agents per workflow; hierarchical: workers per orchestrator; pipeline: stages")
    p.add_argument("--tool-calls", type=int, default=0, help="tool calls per session (each result stays in KV)")
    p.add_argument("--tool-tokens", type=int, default=500, help="tokens per tool result")
    p.add_argument("--overhead", type=float, default=0.15, help="runtime, CUDA context, OS share (default 0.15)")
    p.add_argument("--ceiling", type=float, default=0.90, help="largest share of VRAM to plan on (default 0.90)")
    p.add_argument("--gpu-catalog", type=Path, default=None, help="TOML catalogue (default kvsched/assets/gpus.toml)")
    c = p.add_argument_group("cost")
    c.add_argument("--tokens-per-interaction", type=float, default=950.0)
    c.add_argument("--interactions-per-hour", type=float, default=500.0)
    c.add_argument("--api-price", type=float, default=0.40, help="managed API $ per million tokens")
    c.add_argument("--cost-gpu", default=None,
                   help=f"catalogue GPU to price against the API (default {DEFAULT_COST_GPU}; when the default cannot "
                        "hold a replica, the cost is left out with a note naming the GPUs that can)")
    k = p.add_argument_group("kvsched levers")
    k.add_argument("--with-kvsched", action="store_true", help="also plan with FP8 KV, compaction, retention budget")
    k.add_argument("--compaction-trigger", type=int, help="older tokens that trigger a summary (0 off; default 5000)")
    k.add_argument("--summary-tokens", type=int, help="default 500")
    k.add_argument("--recent-tokens", type=int, help="recent turns kept verbatim beside the summary (default 2000)")
    k.add_argument("--pin-budget", type=float,
                   help="retention budget: largest share of the KV pool idle sessions may keep pinned (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", type=Path, default=None, help="sessions/GPU by context, a PNG (or .svg/.pdf by suffix)")
    p.set_defaults(func=run)


def model_of(args: argparse.Namespace) -> ModelShape:
    if args.model:
        return ModelShape.from_hf_config(args.model)
    return ModelShape.from_preset(args.preset or DEFAULT_PRESET)


def orchestrator_of(args: argparse.Namespace) -> ModelShape | None:
    if args.orchestrator_model:
        return ModelShape.from_hf_config(args.orchestrator_model)
    return ModelShape.from_preset(args.orchestrator_preset) if args.orchestrator_preset else None


def build(args: argparse.Namespace) -> dict[str, Any]:
    shape, orchestrator = model_of(args), orchestrator_of(args)
    args.kv_dtype = kv_cache_dtype(args.kv_dtype, shape.weight_dtype)
    workload = Workload(workflows=args.sessions, topology=Topology(args.topology), agents=args.agents,
                        context=args.context, context_p50=args.context_p50, tool_calls=args.tool_calls,
                        tool_tokens=args.tool_tokens)
    gpus = load_catalog(args.gpu_catalog)
    by_name = {g.name: g for g in gpus}
    cost_gpu = args.cost_gpu or DEFAULT_COST_GPU
    if cost_gpu not in by_name:
        raise PlanError(f"--cost-gpu {cost_gpu!r} is not in the catalogue ({', '.join(by_name)})")
    pool = workload
    out: dict[str, Any] = {"model": asdict(shape)}
    if orchestrator is not None:  # two pools: the orchestrators' model and the workers' (this plan)
        orchestrators, pool = workload.tiers()
        o = fitting(plan(orchestrator, orchestrators, args.kv_dtype, args.weight_dtype, args.overhead, args.ceiling,
                         gpus), "the orchestrator pool")
        out["orchestrator"] = {"model": asdict(orchestrator), "plan": o.as_dict()}
    base = fitting(plan(shape, pool, args.kv_dtype, args.weight_dtype, args.overhead, args.ceiling, gpus),
                   "the worker pool" if orchestrator is not None else "this workload")
    g = by_name[cost_gpu]
    out.update({
        "workload": {**asdict(workload), "topology": workload.topology.value, "kv_slots": workload.kv_slots,
                     "session_tokens": workload.session_tokens},
        "plan": base.as_dict(),
        "cost_gpu": g.name,
        "cost": cost_block(args, g, shape, base),
    })
    if out["cost"] is None:  # the default cost GPU cannot hold a replica: no price, as for an unfit orchestrator pool
        out["cost_note"] = (f"no cost or fleet figures: the default --cost-gpu {g.name} cannot hold a replica of "
                            f"{base.model} at any tensor-parallel degree; pass --cost-gpu with one that can: "
                            f"{', '.join(f.gpu for f in base.fits)}")
    out["fleet_cost"] = out["cost"] and fleet_vs_api(args, g, base, out.get("orchestrator"), out["cost"])
    out["vllm_args"] = vllm_args(base, g.name, shape.weight_dtype)
    out["vllm_notes"] = serve_dtype(base.weight_dtype, shape.weight_dtype)[1]
    if orchestrator is not None:
        out["fleet_total_bytes"] = base.total_bytes + out["orchestrator"]["plan"]["total_bytes"]
    if args.with_kvsched:
        out["with_kvsched"] = levers_effect(args, shape, pool, gpus, base.weight_dtype)
    return out


def cost_block(args: argparse.Namespace, g: Any, shape: ModelShape, base: Plan) -> dict[str, Any] | None:
    """The API against the cost GPU, whose unit is one replica of the plan on it (its TP degree's GPUs, paid together)
    serving the catalogue's 8B-class rate scaled to this model (planner_cost.replica_interactions_per_hour; found by
    review: the 8B figure priced every model, a 70B as cheap per interaction as an 8B). None when the GPU cannot hold
    a replica and the user did not name it (found by review: the default H100 refused every plan of a model only an
    H200/B200 holds, Llama 3.1 405B bf16 among them); a --cost-gpu the user named that cannot is an error."""
    fit = next((f for f in base.fits if f.gpu == g.name), None)
    if fit is None:
        if args.cost_gpu is None:
            return None
        raise PlanError(f"--cost-gpu {g.name} cannot hold a replica of {base.model} at any tensor-parallel degree; "
                        f"choose one that can: {', '.join(f.gpu for f in base.fits)}")
    batch = math.ceil(base.kv_slots / fit.replicas)  # the sequences a replica decodes together at peak
    tp, per_step = fit.tensor_parallel, shape.params_per_step(batch)
    rate = replica_interactions_per_hour(g.interactions_per_hour, tp, per_step)
    moe = (f" (MoE: {shape.experts_per_token} of {shape.experts} experts per token; a step of {batch} sequences "
           f"reads ~{1 - (1 - shape.experts_per_token / shape.experts) ** batch:.0%} of them)"
           if per_step != shape.params_per_token else "")
    basis = (f"the catalogue's {g.interactions_per_hour:,.0f}/h per GPU for an 8B-class model x {tp} GPU(s) x "
             f"{REFERENCE_PARAMS / 1e9:.2f}B / {per_step / 1e9:.2f}B weights read per decode step{moe} (decode bound "
             "by weight reads; an estimate, check it against a measured rate)" if per_step else
             f"the catalogue's {g.interactions_per_hour:,.0f}/h per GPU for an 8B-class model x {tp} GPU(s) (parameter "
             "count unknown: not scaled to the model)")
    return {"gpu": g.name, "tokens_per_interaction": args.tokens_per_interaction,
            "interactions_per_hour": args.interactions_per_hour, "api_price_per_m": args.api_price,
            "gpu_price_per_hour": g.price_per_hour, "gpu_interactions_per_hour": g.interactions_per_hour,
            "tensor_parallel": tp, "params_per_token": shape.params_per_token, "decode_batch": batch,
            "params_per_step": per_step, "replica_price_per_hour": tp * g.price_per_hour,
            "replica_interactions_per_hour": rate, "throughput_basis": basis,
            **asdict(cost(args.tokens_per_interaction, args.interactions_per_hour, args.api_price,
                          tp * g.price_per_hour, rate))}


def fitting(p: Plan, pool: str) -> Plan:
    """`p`, if some catalogue GPU holds it (found by review: an empty table, then "GPU wins per interaction" for a GPU
    that cannot serve it; a later review: the same for an orchestrator pool no GPU holds)."""
    if not p.fits:
        raise PlanError(f"no catalogue GPU fits {pool} ({p.model}) at any tensor-parallel degree: one session's KV is "
                        f"{p.kv_per_session_bytes / GIB:,.2f} GiB at p95 (with the weights, {p.total_bytes / GIB:,.2f} "
                        "GiB in all); shorten --context, lower --sessions or raise --ceiling")
    return p


VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def serve_dtype(weights: str, checkpoint: str) -> tuple[list[str], list[str]]:
    """The `vllm serve` flags (and notes) that serve the planned weight dtype from a checkpoint holding `checkpoint`
    (found by review: FP8 weights were sized but the flags served the checkpoint's BF16)."""
    if weights == checkpoint:
        return [], []
    if checkpoint in VLLM_DTYPES and weights == "fp8":
        return ["--quantization fp8"], ["--quantization fp8 quantizes the checkpoint's weights to FP8 as it loads "
                                        "them; a pre-quantized FP8 checkpoint needs none (vLLM reads its "
                                        "quantization_config)"]
    if checkpoint in VLLM_DTYPES and weights in VLLM_DTYPES:
        return [f"--dtype {VLLM_DTYPES[weights]}"], []
    return [], [f"weights planned in {weights}, the checkpoint's are {checkpoint or 'quantized'}: no flag converts "
                f"them; serve a checkpoint quantized to {weights} (vLLM reads its quantization_config)"]


def vllm_args(base: Plan, gpu: str, checkpoint: str = "bf16") -> str | None:
    """`vllm serve` flags for one replica of the plan on `gpu`, per the sizing guide: --max-model-len at the p95
    session, --max-num-seqs at 1.5x the replica's peak sessions, the planned memory ceiling and TP degree, and the
    flags that serve the planned weight dtype from a `checkpoint` checkpoint."""
    fit = next((f for f in base.fits if f.gpu == gpu), None)
    if fit is None:
        return None
    peak = math.ceil(base.kv_slots / fit.replicas)
    args = [f"--max-model-len {base.session_tokens}", f"--max-num-seqs {math.ceil(1.5 * peak)}",
            f"--gpu-memory-utilization {base.ceiling:.2f}", f"--tensor-parallel-size {fit.tensor_parallel}"]
    if base.kv_dtype.startswith("fp8"):
        args.append(f"--kv-cache-dtype {base.kv_dtype}")
    args += serve_dtype(base.weight_dtype, checkpoint)[0]
    return " ".join([*args, "--enable-prefix-caching"])


def fleet_vs_api(args: argparse.Namespace, gpu: Any, base: Plan, orchestrator: dict[str, Any] | None,
                 c: dict[str, Any]) -> dict[str, Any] | None:
    """The fleet the plan sized on the cost GPU (memory-bound; at least the throughput-bound count of whole replicas
    at the cost block's replica rate `c`), paid every hour, against the API serving the same interactions."""
    fits = [next((f.gpus for f in base.fits if f.gpu == gpu.name), None)]
    if orchestrator is not None:
        fits.append(next((f["gpus"] for f in orchestrator["plan"]["fits"] if f["gpu"] == gpu.name), None))
    if None in fits:
        return None  # the model does not fit this GPU at any TP degree
    replicas = math.ceil(args.interactions_per_hour / c["replica_interactions_per_hour"])
    gpus = max(sum(int(n) for n in fits if n), replicas * c["tensor_parallel"])
    return {"gpu": gpu.name, **asdict(fleet_cost(gpus, gpu.price_per_hour, args.interactions_per_hour,
                                                 args.tokens_per_interaction, args.api_price))}


def levers_effect(args: argparse.Namespace, shape: ModelShape, workload: Workload, gpus: list[Any],
                  weight_dtype: str) -> dict[str, Any]:
    """The same fleet under kvsched's levers: FP8 KV, compaction, both; the retention budget bounds idle pins. The
    weights stay in the baseline's dtype (found by review: the FP8 KV lever also switched them to FP8)."""
    levers = Levers(fp8=True, compaction_trigger=args.compaction_trigger, summary_tokens=args.summary_tokens,
                    recent_tokens=args.recent_tokens, pin_budget=args.pin_budget)
    compacted = with_levers(workload, levers)
    plans = {"fp8_kv": plan(shape, workload, "fp8", weight_dtype, args.overhead, args.ceiling, gpus),
             "compaction": plan(shape, compacted, args.kv_dtype, weight_dtype, args.overhead, args.ceiling, gpus),
             "fp8_kv+compaction": plan(shape, compacted, "fp8", weight_dtype, args.overhead, args.ceiling, gpus)}
    out: dict[str, Any] = {name: _with_retention(q, levers.pin_budget) for name, q in plans.items()}
    out.update(levers=asdict(levers), compacted_session_tokens=compacted.session_tokens,
               summary_calls_per_session=summary_calls(workload.session_tokens, levers), pin_budget=levers.pin_budget)
    return out


def _with_retention(q: Plan, pin_budget: float) -> dict[str, Any]:
    d = q.as_dict()
    for f in d["fits"]:  # idle sessions a replica keeps resident between turns within the budget
        f["retained_idle_sessions_per_replica"] = int(f["sessions_per_replica"] * pin_budget)
    return d


def _gib(b: float) -> str:
    return f"{b / GIB:,.2f} GiB"


def render_plan(p: dict[str, Any], w: dict[str, Any]) -> list[str]:
    from kvsched.bench.common import table

    return [
        f"model {p['model']} ({p['attention']}): KV {p['kv_dtype']}, weights {p['weight_dtype']}",
        f"  KV bytes per token      {p['bytes_per_token']:,} B",
        f"  KV per session          {_gib(p['kv_per_session_bytes'])} at p95 ({p['session_tokens']:,} tokens incl. "
        f"{w['tool_calls']} tool results); p50 {_gib(p['kv_per_session_p50_bytes'])}",
        f"  concurrent KV slots     {p['kv_slots']:,}",
        f"  KV total                {_gib(p['kv_total_bytes'])} (all slots at p50: {_gib(p['kv_total_p50_bytes'])})",
        f"  weights                 {_gib(p['weights_bytes'])}",
        f"  total                   {_gib(p['total_before_overhead_bytes'])}; +{p['overhead']:.0%} runtime "
        f"{_gib(p['total_bytes'])}",
        *[f"  note: {n}" for n in p["notes"]],
        "",
        f"GPUs (planned at {p['ceiling']:.0%} of VRAM; TP degree for the fewest GPUs):",
        table([[f["gpu"], f["tensor_parallel"], f["sessions_per_replica"], round(f["sessions_per_gpu"], 1),
                f["replicas"], f["gpus"], f"${f['cost_per_hour']:,.2f}", f["note"] or "-"] for f in p["fits"]],
              ["GPU", "TP", "sessions/replica", "sessions/GPU", "replicas", "GPUs", "fleet $/h", "note"]),
    ]


def render(result: dict[str, Any]) -> str:
    p, w, c, gpu = result["plan"], result["workload"], result["cost"], result["cost_gpu"]
    lines = [f"{w['workflows']:,} {w['topology']} workflows (agents/stages {w['agents']}): {w['kv_slots']:,} "
             "concurrent KV slots", ""]
    if "orchestrator" in result:
        lines += ["orchestrator pool:", *render_plan(result["orchestrator"]["plan"], w), "", "worker pool:"]
    lines += render_plan(p, w)
    if "fleet_total_bytes" in result:
        lines.append(f"both pools: {_gib(result['fleet_total_bytes'])} with runtime overhead")
    lines += ["", f"note: {result['cost_note']}"] if c is None else render_cost(c)
    f = result.get("fleet_cost")
    if f:
        lines.append(f"  sized fleet             {f['gpus']}x {f['gpu']} ${f['fleet_per_hour']:,.2f}/h vs API "
                     f"${f['api_per_hour']:,.2f}/h for the same interactions -> "
                     f"{'fleet' if f['fleet_wins'] else 'API'} wins (API/fleet cost {f['api_over_fleet']:.2f}x)")
    if result.get("vllm_args"):
        lines += ["", f"vllm serve flags per replica on {gpu}: {result['vllm_args']}",
                  *[f"  note: {n}" for n in result.get("vllm_notes", [])]]
    if "with_kvsched" in result:
        lines += ["", render_levers(result["plan"], result["with_kvsched"], gpu)]
    return "\n".join(lines)


def render_cost(c: dict[str, Any]) -> list[str]:
    unit = "GPU" if c["tensor_parallel"] == 1 else f"replica ({c['tensor_parallel']} GPUs)"
    return [
        "",
        f"cost on {c['gpu']} ({c['interactions_per_hour']:,.0f} interactions/h x {c['tokens_per_interaction']:,.0f} "
        f"tokens, API ${c['api_price_per_m']}/M):",
        f"  throughput              {c['replica_interactions_per_hour']:,.0f} interactions/h per {unit}: "
        f"{c['throughput_basis']}",
        f"  per hour                API ${c['api_per_hour']:.3f} vs GPU prorated ${c['gpu_prorated_per_hour']:.3f} "
        f"(dedicated ${c['gpu_dedicated_per_hour']:.2f})",
        f"  per 1,000 interactions  API ${c['api_per_1k_interactions']:.3f} vs GPU ${c['gpu_per_1k_interactions']:.3f}"
        f" -> {'GPU' if c['gpu_wins'] else 'API'} wins per interaction",
        f"  crossover               a dedicated {unit} beats the API above "
        f"{c['breakeven_interactions_per_hour']:,.0f} interactions/h; " + (
            f"below {c['breakeven_utilisation']:.0%} utilisation the API is cheaper" if c["breakeven_utilisation"] <= 1
            else f"that is {c['breakeven_utilisation']:.0%} of its capacity: the API is always cheaper"),
    ]


def render_levers(base: dict[str, Any], k: dict[str, Any], gpu: str) -> str:
    from kvsched.bench.common import table

    rows = []
    for label, q in (("baseline", base), ("fp8 KV", k["fp8_kv"]), ("compaction", k["compaction"]),
                     ("fp8 KV + compaction", k["fp8_kv+compaction"])):
        on = next((f for f in q["fits"] if f["gpu"] == gpu), None)
        native = [f for f in q["fits"] if not f["note"]]  # e.g. no FP8 KV fleet on Ampere
        cheapest = min(native, key=lambda f: f["cost_per_hour"], default=None)
        rows.append([label, _gib(q["kv_per_session_bytes"]), _gib(q["kv_total_bytes"]),
                     round(on["sessions_per_gpu"], 1) if on else "-", on["gpus"] if on else "-",
                     f"${on['cost_per_hour']:,.2f}" if on else "-",
                     f"{cheapest['gpus']}x {cheapest['gpu']} ${cheapest['cost_per_hour']:,.2f}" if cheapest else "-",
                     on.get("retained_idle_sessions_per_replica", "-") if on else "-"])
    lv = k["levers"]
    head = (f"with kvsched: compaction at {lv['compaction_trigger']:,} older tokens -> {lv['summary_tokens']:,}-token "
            f"summary keeps <= {k['compacted_session_tokens']:,} tokens per session "
            f"({k['summary_calls_per_session']} summary call(s) per p95 session); retention budget "
            f"{k['pin_budget']:.0%} of the KV pool for idle sessions")
    return head + "\n" + table(rows, ["plan", "KV/session", "KV total", f"sessions/GPU {gpu}", "GPUs", "$/h",
                                      "cheapest fleet", "idle sessions kept/replica"])


PLOT_CONTEXTS = tuple(2048 * 2**i for i in range(7))  # 2K .. 128K


def plot(args: argparse.Namespace, path: Path) -> None:
    """Sessions per GPU (at the smallest TP degree that fits) against context length, one line per catalogue GPU."""
    from kvsched.bench.plots import pyplot

    plt = pyplot()  # PlotUnavailable (one line, the install hint) without matplotlib

    shape = model_of(args)
    gpus = load_catalog(args.gpu_catalog)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("P", "--")]
    for i, gpu in enumerate(gpus):
        ys = []
        for ctx in PLOT_CONTEXTS:
            w = Workload(workflows=args.sessions, topology=Topology(args.topology), agents=args.agents, context=ctx,
                         tool_calls=args.tool_calls, tool_tokens=args.tool_tokens)
            fits = plan(shape, w, args.kv_dtype, args.weight_dtype, args.overhead, args.ceiling, [gpu]).fits
            ys.append(fits[0].sessions_per_gpu if fits else float("nan"))
        marker, line = styles[i % len(styles)]  # GPUs of equal VRAM overlap: tell them apart
        ax.plot(PLOT_CONTEXTS, ys, marker=marker, linestyle=line, label=gpu.name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(PLOT_CONTEXTS, [f"{c // 1024}K" for c in PLOT_CONTEXTS])
    ax.set_yscale("log")
    ax.set_xlabel("context per session (tokens)")
    ax.set_ylabel("sessions per GPU")
    ax.set_title(f"{shape.name}, KV {args.kv_dtype}, {args.overhead:.0%} overhead, {args.ceiling:.0%} ceiling")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fmt = path.suffix[1:].lower()  # at exactly `path` (review67: `chart` became chart.png), as its suffix names
    fig.savefig(path, dpi=120, format=fmt if fmt in fig.canvas.get_supported_filetypes() else "png")  # (review68)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from kvsched.bench.plots import PlotUnavailable

    try:
        check_args(args, **LIMITS)
        only_with(args, "with_kvsched", LEVERS)
        result = build(args)
        if args.plot:
            plot(args, args.plot)
            result["plot"] = str(args.plot)
    except (PlanError, ValueError, OSError, PlotUnavailable) as exc:  # OSError: an unwritable --plot path
        print(f"kvsched plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


__all__ = ["register", "run", "build", "render"]
