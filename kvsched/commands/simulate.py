"""`kvsched simulate`: replay an agent trace against a model of the paged KV pool under stock vLLM's LRU prefix
caching, kvsched's retention policy (the same `kvsched.core` code the vLLM scheduler runs; with `--fp8-tier-gib` its
FP8 demotion tier too, `kvsched.core.tier`), and a clairvoyant Belady eviction, a near-bound on what a policy could hit
at that capacity (on the GPU pool alone: the tier's loads can take kvsched past it; not a proven bound, as evictions
change timings and waits: `kvsched.sim.policies.OptPolicy`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvsched.bench.args import MAX_COUNT, MAX_GIB, check_args, count, number, only_apply
from kvsched.bench.common import provenance, table, write_json
from kvsched.commands.simulate_pool import DEFAULT_KV_DTYPE, DEFAULT_PRESET, engine_bytes, replica_capacity
from kvsched.commands.simulate_tier import (
    FLEET_HOST_GIB_PER_GPU,
    MAX_TIER_BLOCKS,
    sized_tier,
    tier_from_env,
    tier_source,
)

POLICIES = ("lru", "kvsched", "opt", "lru+offload")  # lru+offload: stock vLLM CPU offloading on the tier's bytes
# The fleet's default GPUs and link (its hosts: simulate_tier): ~60 GiB of KV per 80 GB GPU after an 8B model's weights
# and activations, and PCIe Gen5 x16 at half its 64 GB/s peak for host copies.
FLEET_GPU_KV_GIB = 60.0
FLEET_H2D_GBPS = 32.0
MAX_REPLICAS = 4096  # engines in one replay: each replays its share alone (the Ray router's rings are far smaller)
COMPACTION_DEFAULTS = {"compaction_trigger_tokens": 5000, "compaction_summary_tokens": 500, "compaction_keep_recent": 4}
SUMMARY_ONLY = ("compaction_summary_tokens",)  # what only `--compaction summarize` reads (the summary call's size)
MAX_PROMPT_TOKENS = 2**24  # compaction's token counts: far past any context (a summary's ids are built one by one)
# --kv-gib and --fp8-tier-gib are checked where they are used
LIMITS = {"workflows": count(1, 10**6), "capacity_blocks": count(1, MAX_COUNT),
          "pressure": number(0, 1e9, low_open=True), "replicas": count(1, MAX_REPLICAS),
          "compaction_trigger_tokens": count(1, MAX_PROMPT_TOKENS), "compaction_summary_tokens": count(1, MAX_PROMPT_TOKENS),
          "compaction_keep_recent": count(0, 10**6), "system_tokens": count(0, MAX_PROMPT_TOKENS),
          "fp8_tier_blocks": count(0, MAX_TIER_BLOCKS), "host_gib_per_gpu": number(0, MAX_GIB),
          "gpu_kv_gib": number(1e-3, MAX_GIB), "h2d_gbps": number(1e-9, 1e9), "prefill_tok_s": number(1e-6, 1e15)}


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("simulate", help="trace simulator: LRU vs kvsched vs optimal",
                                                       description=__doc__)
    p.add_argument("trace", nargs="?", type=Path, help="a JSONL trace (schema: docs/trace_schema.md)")
    p.add_argument("--generate", action="store_true", help="generate a seeded multi-agent trace instead")
    p.add_argument("--quick", action="store_true", help="with --generate: a small workload (seconds)")
    p.add_argument("--fleet", action="store_true", help="with --generate: 1,000 sessions x 50 turns")
    p.add_argument("--topology", choices=["flat", "hierarchical", "pipeline"], default=None)
    p.add_argument("--workflows", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-trace", type=Path, default=None, help="also write the generated trace as JSONL")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--capacity-blocks", type=int, help="KV pool size in blocks")
    cap.add_argument("--pressure", type=float, default=None,
                     help="working set / pool (default 2.0; an engine's recording, whose header names its pool: "
                          "that pool)")
    p.add_argument("--pressure-basis", choices=["distinct", "live"], default="distinct",
                   help="what --pressure divides: the trace's distinct blocks (default), or its peak live blocks "
                        "(used before and again later; 3-20x fewer on production traces); the JSON reports both")
    cap.add_argument("--kv-gib", type=float, help="KV memory in GiB; blocks follow from --preset and --kv-dtype "
                     "(a recording: its engine's bytes per token)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replay across N session-affine replicas (sessions placed by the router's hash ring), each "
                        "with 1/N of the pool and of a tier flag's size (KVSCHED_FP8_TIER_GB is each engine's: "
                        "each replica's whole); every side sums its replicas (OPT: Belady per replica)")
    p.add_argument("--preset", default=None,
                   help=f"model shape for --kv-gib, byte figures and the tier's block size (default {DEFAULT_PRESET}; "
                        "an engine's recording: that engine's own bytes per token and per tier block)")
    p.add_argument("--kv-dtype", default=None,
                   help=f"with --preset (or a trace that is not an engine's recording): the KV cache's dtype, as "
                        f"vLLM's --kv-cache-dtype (auto: the presets' bf16) (default {DEFAULT_KV_DTYPE})")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--fp8-tier-gib", type=float, default=None,
                      help="kvsched side: FP8 demotion tier of this many GiB of host memory, the fleet's (0: "
                           "off). No tier flag: KVSCHED_FP8_TIER_GB when it holds a size (each replica's, as it is "
                           "each engine's; a malformed one refused as the engine refuses it; not held to this "
                           "machine's memory), else off "
                           "(--fleet: --host-gib-per-gpu's rule at 256). Unlike the engine, whose default is on (auto: "
                           "from its host's memory): a replay has no host memory to size auto from; "
                           "--host-gib-per-gpu models that rule")
    tier.add_argument("--fp8-tier-blocks", type=int, default=None, help="kvsched side: FP8 tier of this many blocks")
    tier.add_argument("--host-gib-per-gpu", type=float, default=None,
                      help="kvsched side: the FP8 tier as `vllm serve --scheduler kvsched` sizes it by default on GPUs "
                           "with this much host memory each (min(2x the GPU's KV pool, 1/4 of its host memory)); "
                           f"--fleet defaults to {FLEET_HOST_GIB_PER_GPU:g} (an 8-GPU node with 2 TiB)")
    p.add_argument("--gpu-kv-gib", type=float, default=FLEET_GPU_KV_GIB,
                   help="KV pool per GPU, to count the fleet's GPUs for --host-gib-per-gpu (default: an 80 GB GPU "
                        "serving an 8B model)")
    p.add_argument("--h2d-gbps", type=float, default=FLEET_H2D_GBPS,
                   help="host-to-device GB/s: each tier restore adds its bytes / this to the request's TTFT")
    comp = p.add_argument_group("compaction (an extra side, kvsched on the trace as compaction serves it)")
    comp.add_argument("--compaction", choices=["summarize", "sliding_window"], default=None)
    comp.add_argument("--compaction-trigger-tokens", type=int, default=None, help="default 5000")
    comp.add_argument("--compaction-summary-tokens", type=int, default=None, help="default 500")
    comp.add_argument("--compaction-keep-recent", type=int, default=None, help="newest turns kept verbatim (default 4)")
    comp.add_argument("--system-tokens", type=int, default=None,
                      help="shared prefix kept by compaction (default: a generated trace's system + role prompt)")
    p.add_argument("--prefill-tok-s", type=float, default=10_000.0, help="prefill throughput for the TTFT estimate")
    p.add_argument("--policies", default="lru,kvsched,opt", help="comma list of " + ", ".join(POLICIES))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="directory for PNGs: hit rate and prefill vs capacity")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def check_outputs(args: argparse.Namespace) -> None:
    """--out and --write-trace name files to write that are not the TRACE read, nor each other, nor a directory; --out is
    the JSON (its chart goes beside it as .png: an --out ending in .png was overwritten by its own chart)."""
    from kvsched.sim.out_file import check_out

    inputs = (args.trace,) if args.trace is not None else ()
    for flag, path in (("--out", args.out), ("--write-trace", args.write_trace)):
        if path is None:
            continue
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a directory; give a file path")
        check_out(path, inputs)
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():  # found by review: after the replays
        raise ValueError(f"--plot {args.plot} is not a directory; give one (made if missing) for the PNGs")
    if args.out is not None and args.out.suffix.lower() == ".png":
        raise ValueError(f"--out {args.out} names the JSON result; its chart is written beside it as .png")
    if args.out is not None and args.write_trace is not None and args.out.resolve() == args.write_trace.resolve():
        raise ValueError("--out and --write-trace name the same file")


def load_trace(args: argparse.Namespace) -> Any:
    from kvsched.sim.generator import FLEET, QUICK, TraceConfig, generate, generate_requests
    from kvsched.sim.trace import Trace, write_jsonl
    from kvsched.sim.workload import Topology

    if args.trace is not None and args.generate:
        raise ValueError("give a TRACE file or --generate, not both")
    if args.trace is not None:
        # the generator's options do nothing to a TRACE file (found by review: --write-trace's file never appeared)
        given = [f for f, v in (("--quick", args.quick), ("--fleet", args.fleet), ("--topology", args.topology),
                                ("--workflows", args.workflows), ("--seed", args.seed != 0),
                                ("--write-trace", args.write_trace)) if v]
        if given:
            raise ValueError(only_apply(given, "with --generate, not to a TRACE file"))
        trace = Trace.load(args.trace)
        if not len(trace):  # a header alone (a recording that served nothing yet): a table of zeros said nothing
            raise ValueError(f"{args.trace}: no requests to replay (a header only)")
        return trace
    if not args.generate:
        raise ValueError("give a TRACE file or --generate")
    if args.quick and args.fleet:
        raise ValueError("give --quick or --fleet, not both")
    cfg = QUICK if args.quick else FLEET if args.fleet else TraceConfig()
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.topology:
        overrides["topology"] = Topology(args.topology)
    if args.workflows is not None:
        overrides["workflows"] = args.workflows
    cfg = replace(cfg, **overrides)
    if args.write_trace:
        write_jsonl(args.write_trace, cfg.block_size, generate_requests(cfg), meta={"generator": cfg.as_dict()})
    return generate(cfg)


def compaction_config(args: argparse.Namespace) -> Any:
    """The `--compaction*` options as the server's CompactionConfig (None without `--compaction`)."""
    if not getattr(args, "compaction", None):  # found by review: these were accepted, and nothing compacted
        if given := [f"--{d.replace('_', '-')}" for d in (*COMPACTION_DEFAULTS, "system_tokens") if getattr(args, d)
                     is not None]:
            raise ValueError(only_apply(given, "with --compaction"))
        return None
    # found by review: sliding_window took a summary's size silently, and refused a trigger at or below the default
    # summary size it never makes
    if args.compaction != "summarize" and (given := [f"--{d.replace('_', '-')}" for d in SUMMARY_ONLY
                                                     if getattr(args, d) is not None]):
        raise ValueError(only_apply(given, f"with --compaction summarize: {args.compaction} makes no summary"))
    for dest, default in COMPACTION_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput, Strategy

    # as `kvsched plan` refuses it
    if args.compaction == "summarize" and args.compaction_summary_tokens >= args.compaction_trigger_tokens:
        raise ValueError(f"--compaction-summary-tokens ({args.compaction_summary_tokens}) must be smaller than "
                         f"--compaction-trigger-tokens ({args.compaction_trigger_tokens}): a summary that large "
                         "makes prompts longer, not shorter")
    try:
        return CompactionConfig(strategy=Strategy(args.compaction), trigger_tokens=args.compaction_trigger_tokens,
                                summary_target_tokens=args.compaction_summary_tokens,
                                keep_recent_messages=args.compaction_keep_recent)
    except InvalidCompactionInput as exc:
        raise ValueError(f"--compaction: {exc}") from None


def run_side(trace: Any, policy: str, cfg: Any, replicas: int, progress: Any = None) -> dict[str, Any]:
    """One side's summary: one replay, or with `replicas` > 1 the replicas' sums and the requests each served (every
    side alike, compaction's too: found by review, it ran on one replica's pool)."""
    from kvsched.sim.replay import replay
    from kvsched.sim.replicas import replay_replicas

    if replicas == 1:
        return replay(trace, policy, cfg, progress).summary(cfg, trace.block_size)
    res, served = replay_replicas(trace, policy, cfg, replicas, progress)
    return res.summary(cfg, trace.block_size) | {"replica_requests": served}


def simulate(trace: Any, capacity: int, policies: list[str], prefill_tok_s: float, bytes_per_token: int,
             tier: tuple[int, int] = (0, 0), compaction: Any = None, system_tokens: int | None = None,
             restore_bytes_per_s: float = 0.0, progress: bool = False, retention: Any = None,
             replicas: int = 1) -> dict[str, Any]:
    """`retention`: the kvsched side's RetentionConfig (default: its defaults; `kvsched simulate` reads the engine's
    `KVSCHED_*` variables, and KVSCHED_FP8_TIER_GB without a tier flag: simulate_tier). `replicas` > 1:
    session-affine replay, `capacity` blocks per replica. `tier`: (bytes, bytes per block) of kvsched's FP8 tier;
    (0, 0) = off. `compaction` (a CompactionConfig): also replay kvsched on the trace as compaction serves it, as the
    side `kvsched+compaction` (its prompts differ, so it is compared on prefill computed and prompt size, not on a
    share of OPT's saving)."""
    from kvsched.core.config import RetentionConfig
    from kvsched.sim.replay import ReplayConfig

    cfg = ReplayConfig(capacity_blocks=capacity, prefill_tps=prefill_tok_s, bytes_per_token=float(bytes_per_token),
                       retention=retention or RetentionConfig(), tier_bytes=tier[0], tier_block_bytes=tier[1],
                       restore_bytes_per_s=restore_bytes_per_s)
    from kvsched.bench.common import progress_bar

    out: dict[str, Any] = {}
    for p in policies:
        bar = progress_bar(len(trace), f"{p:>8}", progress, unit="req")
        out[p] = run_side(trace, p, cfg, replicas, bar.update)
        bar.close()
    if "lru" in out and out["lru"]["prefill_tokens_computed"]:
        base = out["lru"]["prefill_tokens_computed"]
        out["prefill_over_lru"] = {p: out[p]["prefill_tokens_computed"] / base for p in policies}
    if "opt" in out:
        best = out["opt"]["tokens_saved"]
        out["bound"] = {f"{p}_share_of_opt_saving": (out[p]["tokens_saved"] / best if best else None)
                        for p in policies if p != "opt"}
    if compaction is not None:
        from kvsched.sim.compaction import compact_trace

        compacted, stats = compact_trace(trace, compaction, system_tokens)
        out["kvsched+compaction"] = run_side(compacted, "kvsched", cfg, replicas) | {"compaction": stats.as_dict()}
    return out


def run(args: argparse.Namespace) -> int:
    from kvsched.bench.plots import PlotUnavailable
    from kvsched.core.config import RetentionConfig
    from kvsched.core.planner import PlanError
    from kvsched.core.settings_check import near_miss_warnings, setting_names

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        check_args(args, **LIMITS)
        if args.kv_dtype is not None:  # found by review: fp4, int4 or int8 sized the pool at 0.5 or 1 byte an element
            from kvsched.core.planner import kv_cache_dtype

            args.kv_dtype = kv_cache_dtype(args.kv_dtype)  # as `kvsched plan` reads it: vLLM's cache dtypes only
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
        if len(set(policies)) < len(policies):
            raise ValueError(f"--policies names a policy twice: {args.policies}")
        check_outputs(args)  # before the replay, not after it
        retention = RetentionConfig.from_env()  # the engine's parser: the same KVSCHED_* variables, same checks
        def say(line: str) -> None:
            print(f"kvsched simulate: {line}", file=sys.stderr)

        tier_from_env(args, say)
        for warning in near_miss_warnings(setting_names()):  # a misspelt setting would otherwise change nothing
            print(f"kvsched simulate: warning: {warning}", file=sys.stderr)
        trace = load_trace(args)
        bpt, block_bytes = engine_bytes(args, trace)
        capacity = replica_capacity(args, trace, bpt)
        tier = sized_tier(args, block_bytes, capacity * trace.block_size * bpt, args.replicas, say)
        if "lru+offload" in policies and tier[0] < bpt * trace.block_size:  # found by review: it ran on 0 host slots
            raise ValueError("--policies lru+offload replays vLLM's CPU offloading on the host memory of kvsched's "
                             "tier, and none is given (or less than one page): give --fp8-tier-gib, --fp8-tier-blocks "
                             "or --host-gib-per-gpu")
        if tier[1] and tier[0] // tier[1] > MAX_TIER_BLOCKS:
            raise ValueError(f"an FP8 tier of {tier[0] // tier[1]} blocks is past the replay's limit of "
                             f"{MAX_TIER_BLOCKS} (this trace has {trace.working_set_blocks()} distinct blocks)")
        result = simulate(trace, capacity, policies, args.prefill_tok_s, bpt, tier, compaction_config(args),
                          args.system_tokens, restore_bytes_per_s=args.h2d_gbps * 1e9,
                          progress=not args.no_progress, retention=retention, replicas=args.replicas)
        sides = [*policies, *(["kvsched+compaction"] if "kvsched+compaction" in result else [])]
        if all(result[p]["requests"] == 0 for p in sides):  # a table of zeros said nothing (found by review)
            raise ValueError(f"every request is larger than the pool of {capacity} blocks and was rejected, as vLLM "
                             "would answer 400; nothing was replayed: give a lower --pressure or a larger pool")
        if args.plot:
            from kvsched.commands.simulate_plot import plot

            result["plots"] = plot(trace, policies, args.prefill_tok_s, bpt, args.plot, tier, retention, args.replicas,
                                   args.h2d_gbps * 1e9)
        report(args, result, trace, policies, capacity, bpt, tier, retention)
    except (ValueError, PlanError, OSError, PlotUnavailable) as exc:
        print(f"kvsched simulate: error: {exc}", file=sys.stderr)
        return 2
    return 0


def report(args: argparse.Namespace, result: dict[str, Any], trace: Any, policies: list[str], capacity: int,
           bpt: int, tier: tuple[int, int], retention: Any) -> None:
    """Print the table and write `--out`: inside `run`'s error handling, so an unwritable path is a one-line error."""
    sessions = len(trace.sessions)
    live = trace.peak_live_blocks()
    result["config"] = {"requests": len(trace), "sessions": sessions, "block_size": trace.block_size,
                        "working_set_blocks": trace.working_set_blocks(), "peak_live_blocks": live,
                        "capacity_blocks": capacity * args.replicas, "replicas": args.replicas,
                        "capacity_blocks_per_replica": capacity, "pressure_basis": args.pressure_basis,
                        "pressure": (live if args.pressure_basis == "live" else trace.working_set_blocks())
                        / (capacity * args.replicas),
                        "pressure_distinct": trace.working_set_blocks() / (capacity * args.replicas),
                        "pressure_live": live / (capacity * args.replicas),
                        "retention": retention.as_dict(), "kv_bytes_per_token": bpt,
                        "prefill_tok_s": args.prefill_tok_s, "fp8_tier_bytes": tier[0] * args.replicas,
                        "fp8_tier_bytes_per_replica": tier[0],
                        "host_gib_per_gpu": args.host_gib_per_gpu, "gpu_kv_gib": args.gpu_kv_gib,
                        "h2d_gbps": args.h2d_gbps,
                        "fp8_tier_blocks": tier[0] // tier[1] * args.replicas if tier[1] else 0,
                        "trace_meta": trace.meta, "provenance": provenance()}
    rows = [[p, result[p]["prompt_tokens_total"], result[p]["prefill_tokens_computed"], result[p]["hit_rate"],
             result[p]["restored_tokens"], result[p]["ttft_s"]["p50"], result[p]["ttft_s"]["p99"],
             result[p]["peak_held_bytes"] / 2**30, result[p]["wall_s"]]
            for p in [*policies, *(["kvsched+compaction"] if "kvsched+compaction" in result else [])]]
    print(table(rows, ["policy", "prompt tokens", "prefill computed", "hit rate", "tier loaded", "TTFT p50 s",
                       "TTFT p99 s", "peak KV GiB", "sim s"]))
    c = result["config"]
    print(f"{c['requests']} requests, {sessions} sessions, working set {c['working_set_blocks']} blocks "
          f"(peak live {live}), pool {capacity} blocks{f' x {args.replicas} replicas' if args.replicas > 1 else ''} (pressure {c['pressure_distinct']:.2f}x distinct, "
          f"{c['pressure_live']:.2f}x live)")
    if rejected := max(result[p]["rejected"] for p in policies):
        print(f"{rejected} of {len(trace)} requests are larger than the pool and were rejected (as vLLM answers 400), "
              "not replayed")
    if "kvsched+compaction" in result:
        k, c = result["kvsched+compaction"], result["kvsched+compaction"]["compaction"]
        print(f"compaction ({args.compaction}, trigger {args.compaction_trigger_tokens}): {c['summaries']} summary "
              f"calls, {c['rewritten_requests']} requests rewritten, largest prompt per session "
              f"{c['peak_prompt_tokens_per_session_max']} tokens; prefill computed {k['prefill_tokens_computed']} "
              f"(the summary calls' included)")
    if tier[0]:
        n = args.replicas
        print(f"kvsched's FP8 tier: {tier[0] * n / 2**30:.0f} GiB of host memory ({tier[0] // tier[1] * n} blocks"
              f"{f', {tier[0] // tier[1]} on each of {n} replicas' if n > 1 else ''}; {tier_source(args, n)}), "
              f"restores at "
              f"{args.h2d_gbps:g} GB/s in TTFT")
    for name, ratio in result.get("prefill_over_lru", {}).items():
        print(f"  {name} prefill / lru: {ratio:.3f}")
    for name, share in result.get("bound", {}).items():
        print(f"  {name}: {share:.3f}" if share is not None else f"  {name}: -")
    if args.out:
        from kvsched.bench.plots import grouped_bars, save_beside

        write_json(args.out, result)
        save_beside(args.out, lambda path: grouped_bars(
            {"prefill computed / lru": result.get("prefill_over_lru", {}),
             "hit rate": {p: result[p]["hit_rate"] for p in policies}}, path,
            f"kvsched simulate: {len(trace)} requests, pressure {result['config']['pressure']:.2f}x", "", None))
    else:
        json.dumps(result, default=str)  # fail here, not later, if the result is not serialisable
