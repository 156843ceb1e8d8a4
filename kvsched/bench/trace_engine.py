"""`kvsched bench replay`: an imported production trace served by real vLLM servers, stock against kvsched.

`kvsched bench traces` says what kvsched's policy would save on Mooncake's traces in the simulator; this sends a window
of such a trace to `vllm serve` itself (the tiny model, one engine block per trace block: kvsched.bench.trace_prompts),
open loop at the trace's own arrival times, to each side in turn on the same pool:
- `stock`: vLLM as shipped (its LRU prefix cache);
- `kvsched-no-tier`: `--scheduler kvsched --kvsched-fp8-tier-gb 0` (pins and release order alone);
- `kvsched`: `--scheduler kvsched` as shipped, its FP8 host tier at the default size (2x the pool's bytes: ~4x its
  blocks in FP8);
- `stock-same-memory`: stock vLLM whose pool has the bytes of kvsched's pool and tier together, in its own bf16 blocks
  (3x the blocks): the baseline of the same KV memory (BENCH_PROTOCOL rule 1; found by review: the tier side was
  compared only with stock on the pool alone, a third of its memory).
Every request carries its trace session as `X-Session-Id` (stock ignores it). The pool is `--pressure` times smaller
than the window's peak live block set (the simulator's live basis), and the simulator replays the same window at the
same pool (LRU, kvsched, OPT; and LRU on the same-memory pool) in the same invocation: its prediction beside each
measured side. Counts are vLLM's own
(/metrics): prefill computed = prompt tokens less prefix-cache hits less tokens a KV connector loaded.

The sides run one after another in the order given (each server started beforehand, stopped after its side), each
after a few warm-up requests that compute less than a block each, so they leave nothing in the prefix cache. A side
is valid only if every request was answered and its prompt tokens are the plan's: otherwise its ratio is not given
and the command exits 1. The JSON is written after every side, so a server that dies keeps the sides before it.
Prefill counts are the result; the sides' TTFTs are comparable only on a quiet machine (they run minutes apart).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsched.bench.args import check_args, check_out_path, count, number
from kvsched.bench.common import percentile, provenance, table, write_json
from kvsched.bench.plots import grouped_bars, save_beside
from kvsched.bench.trace_prompts import ReplayPlan, ReplayRequest, plan, window
from kvsched.core.tier_config import AUTO_POOL_MULTIPLE
from kvsched.sim.trace_fields import MAX_COUNT  # a pool past it (a --pressure near 0) is refused

SAME_MEMORY = 1 + AUTO_POOL_MULTIPLE  # the pool's bytes and the default tier's (2x the pool's), as bf16 pool blocks
# side -> (scheduler, extra `vllm serve` args, pool: the window's pool or the same-memory one)
SIDES = {"stock": (None, [], False), "kvsched-no-tier": ("kvsched", ["--kvsched-fp8-tier-gb", "0"], False),
         "kvsched": ("kvsched", [], False), "stock-same-memory": (None, [], True)}
BLOCK_TOKENS = 32  # the CPU backend's preferred block size
MODEL = "replay"
MAX_WORKERS = 256  # requests in flight at once (open loop: a slow side queues in the engine, not here)
WARMUP_REQUESTS = 4
# A request computes its prompt and every output token but the last (each is fed back to decode the next): a warm-up
# computes WARMUP_TOKENS + WARMUP_MAX_TOKENS - 1 = 31 tokens, less than a block, so it leaves no full block in the
# prefix cache. (Found by review: 31 prompt tokens and 2 output tokens computed 32, a full block that was cached.)
WARMUP_TOKENS = BLOCK_TOKENS - 2
WARMUP_MAX_TOKENS = 2  # one decode step too: the warm-up goes through the whole path


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay", help="an imported trace (e.g. Mooncake's) served by real vLLM servers: stock vs kvsched")
    p.add_argument("trace", type=Path, nargs="?", default=None,
                   help="a trace file (default: Mooncake's conversation trace, `kvsched trace fetch mooncake`)")
    p.add_argument("--start-s", type=float, default=0.0, help="window start, seconds after the first arrival")
    p.add_argument("--seconds", type=float, default=300.0, help="window length (trace seconds)")
    p.add_argument("--time-scale", type=float, default=1.0, help="send at this multiple of the trace's gaps")
    p.add_argument("--pressure", type=float, default=1.5, help="the window's peak live blocks / the pool")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--model-size", choices=("test", "bench"), default="test")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)


def send(client: Any, req: ReplayRequest, openai: Any) -> dict[str, Any]:
    """One request, streamed: its TTFT (s) and its time from sending to the stream's end (`done_s`: how long the
    engine held its blocks, as the simulator's `duration_s` replays it), or its error."""
    t = time.perf_counter()
    try:
        stream = client.completions.create(model=MODEL, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True},
                                           extra_headers={"X-Session-Id": req.session})
        first = None
        for _ in stream:
            first = first or time.perf_counter()
    except openai.APIError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ttft_s": (first - t) if first is not None else None, "done_s": time.perf_counter() - t}


def drive(url: str, requests: list[ReplayRequest]) -> tuple[list[dict[str, Any]], float, float]:
    """Send every request at its time (open loop). Returns (per-request outcomes, wall seconds, mean lateness)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    results: list[dict[str, Any]] = [{} for _ in requests]
    late = 0.0
    lock = threading.Lock()

    def one(i: int) -> None:
        out = send(client, requests[i], openai)
        with lock:
            results[i] = out

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=MAX_WORKERS)
    try:
        for i, req in enumerate(requests):
            wait = t0 + req.at_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                late -= wait
            pool.submit(one, i)
    except BaseException:  # interrupted: nothing more is sent; requests in flight end when the servers stop
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results, time.perf_counter() - t0, late / max(len(requests), 1)


def warmup_prompts(vocab_size: int) -> list[list[int]]:
    return [[(7919 * (k * WARMUP_TOKENS + j)) % (vocab_size - 20) + 10 for j in range(WARMUP_TOKENS)]
            for k in range(WARMUP_REQUESTS)]


def warm_up(url: str, vocab_size: int) -> None:
    """A few requests through the server's whole path (tokens, scheduler, model, a decode step, stream) before its side
    is timed; they compute less than a block each (WARMUP_TOKENS), so they leave nothing a later request could hit."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    for prompt in warmup_prompts(vocab_size):
        for _ in client.completions.create(model=MODEL, prompt=prompt, max_tokens=WARMUP_MAX_TOKENS, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
            pass


def measured(outcomes: list[dict[str, Any]], before: dict[str, float], after: dict[str, float],
             wall_s: float, late_s: float, planned_prompt_tokens: int | None = None) -> dict[str, Any]:
    """One side's counts from its /metrics before and after; `invalid` says why its ratio would not compare (a
    request unanswered, or prompt tokens other than the plan's)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    prompt = d.get("vllm:prompt_tokens_total", 0.0)
    local, external = d.get("vllm:prefix_cache_hits_total", 0.0), d.get("vllm:external_prefix_cache_hits_total", 0.0)
    ttfts = [o["ttft_s"] for o in outcomes if o.get("ttft_s") is not None]
    errors = [o["error"] for o in outcomes if "error" in o]
    out: dict[str, Any] = {
        "prefill_tokens_computed": int(prompt - local - external), "prompt_tokens_total": int(prompt),
        "prefix_hit_tokens": int(local), "connector_loaded_tokens": int(external),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "requests": len(outcomes), "errors": len(errors), "first_errors": errors[:3],
        "preemptions": int(d.get("vllm:num_preemptions_total", 0.0)), "wall_s": round(wall_s, 2),
        "mean_send_lateness_s": round(late_s, 4),
    }
    if errors:
        out["invalid"] = f"{len(errors)} of {len(outcomes)} requests failed"
    elif planned_prompt_tokens is not None and int(prompt) != planned_prompt_tokens:
        out["invalid"] = f"{int(prompt)} prompt tokens served, {planned_prompt_tokens} planned"
    if "kvsched_retained_hit_tokens_total" in after:
        out["retained_hit_tokens"] = int(d.get("kvsched_retained_hit_tokens_total", 0.0))
        out["branches"] = int(d.get("kvsched_branches_total", 0.0))  # later turns the lineage read as new branches
        out["tier_prefetch_hit_tokens"] = int(d.get("kvsched_tier_prefetch_hit_tokens_total", 0.0))
        out["payback_fed"] = after.get("kvsched_payback_fed")
        out["payback_balance_blocks"] = after.get("kvsched_payback_balance_blocks")
    if after.get("kvsched_tier_enabled"):
        out["tier_capacity_bytes"] = int(after.get("kvsched_tier_capacity_bytes", 0.0))
        used, slots = after.get("kvsched_tier_bytes", 0.0), after.get("kvsched_tier_blocks", 0.0)
        out["tier_block_bytes"] = int(used // slots) if slots else 0  # bytes per slot, from the slots in use
        out["tier_restored_blocks"] = int(d.get("kvsched_tier_restored_blocks_total", 0.0)
                                          + d.get("kvsched_tier_prefetched_blocks_total", 0.0))
    return out


def same_memory_blocks(num_blocks: int, tier_multiple: float = AUTO_POOL_MULTIPLE) -> int:
    """The stock-same-memory side's pool: the usable blocks times (1 + the tier's bytes over the pool's: SAME_MEMORY
    for the default tier), plus vLLM's null block. `kvsched bench agents` sizes its side by it too."""
    return round((num_blocks - 1) * (1 + tier_multiple)) + 1


# side -> the simulator's policy for it, replayed at that side's own timing (`predicted`'s `durations`)
TIMED = {"stock": "lru", "kvsched-no-tier": "kvsched", "kvsched": "kvsched + FP8 tier",
         "stock-same-memory": "lru, same memory"}
ENGINE_TIMING = ", engine timing"


def predicted(trace: Any, capacity_blocks: int, tier: tuple[int, int] | None = None,
              durations: dict[str, list[float | None]] | None = None, block_tokens: int | None = None
              ) -> dict[str, Any]:
    """The simulator on the same window at the same pool: prefill (trace tokens) per policy, and over LRU's; LRU on
    the same-memory pool; with `tier` (the kvsched side's measured tier bytes and bytes per slot), kvsched with a tier
    of as many slots. These run the simulator's time model (a GPU's speeds, in trace tokens), under which a request
    holds its blocks several times longer than the replay's engine holds them, so more pins go for pressure before
    their sessions return (the retained credit differs by that, the prefill little: BENCHMARKS.md, stop 55).
    `durations`: a measured side's seconds from sending each request to its stream's end (None: failed), in the
    trace's order: that side's policy (`TIMED`) again at that timing, "<policy>, engine timing", over LRU at stock's
    timing when stock was measured (else None). `block_tokens`: the engine's tokens per trace block, to give the
    retained credit in the engine's tokens too (`retained_hit_engine_tokens`, what its counter reads)."""
    from dataclasses import replace

    import numpy as np

    from kvsched.core.config import RetentionConfig
    from kvsched.sim.replay import ReplayConfig, replay

    cfg = ReplayConfig(capacity_blocks=capacity_blocks, retention=RetentionConfig.from_env())
    same = replace(cfg, capacity_blocks=same_memory_blocks(capacity_blocks + 1) - 1)
    tiered = None if tier is None else replace(cfg, tier_bytes=tier[0], tier_block_bytes=tier[1])
    configs = {"lru": ("lru", cfg), "kvsched": ("kvsched", cfg), "opt": ("opt", cfg), "lru, same memory": ("lru", same)}
    if tiered is not None:
        configs["kvsched + FP8 tier"] = ("kvsched", tiered)
    runs = {p: replay(trace, *configs[p]) for p in configs}
    for side, times in (durations or {}).items():
        if TIMED.get(side) in configs:
            timed = replace(trace, duration_s=np.array([math.nan if d is None else d for d in times], np.float64))
            policy, conf = configs[TIMED[side]]  # (the measured time includes the prefill: none on top)
            runs[TIMED[side] + ENGINE_TIMING] = replay(timed, policy, replace(conf, prefill_tps=math.inf))
    out: dict[str, Any] = {}
    for p, r in runs.items():
        base = runs.get("lru" + ENGINE_TIMING) if p.endswith(ENGINE_TIMING) else runs["lru"]
        row = out[p] = {"prefill_tokens_computed": r.prefill_tokens_computed,
                        "over_lru": r.prefill_tokens_computed / (base.prefill_tokens_computed or 1) if base else None,
                        "rejected": r.rejected,  # larger than the pool with the trace's whole output (engine caps it)
                        "hit_tokens": r.hit_tokens,  # trace tokens (the engine counts block_tokens per trace block)
                        **{k: r.policy_stats[k] for k in ("retained_hit_tokens", "branches") if k in r.policy_stats}}
        if block_tokens is not None and "retained_hit_tokens" in row:
            row["retained_hit_engine_tokens"] = row["retained_hit_tokens"] * block_tokens // trace.block_size
    return out


def run(args: argparse.Namespace) -> int:
    try:
        setup = prepare(args)
    except (ValueError, OSError) as exc:  # bad options and trace files: before any server starts
        print(f"kvsched bench replay: error: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(setup, lambda partial: write_json(args.out, partial))  # (cli.main: SIGTERM stops servers)
    rows = [[s, r["prefill_tokens_computed"], r["over_stock"], r["ttft_p50_s"], r["ttft_p95_s"], r["errors"],
             r["mean_send_lateness_s"]] for s, r in result["sides"].items()]
    print(table(rows, ["side", "prefill computed", "over stock", "TTFT p50 s", "TTFT p95 s", "errors", "lateness s"]))
    sim = result["simulator"]
    print("simulator, same window and pool, prefill over LRU: "
          + ", ".join(f"{p} {v['over_lru']:.4f}" for p, v in sim.items() if v["over_lru"] is not None))
    write_json(args.out, result)
    save_beside(args.out, lambda path: grouped_bars(
        {"measured (over stock)": {s: r["over_stock"] for s, r in result["sides"].items()},  # None: invalid
         "simulator (over LRU)": {p: v["over_lru"] for p, v in sim.items()}},
        path, f"{result['config']['trace']}: prefill computed", "ratio", None))
    rejected = max((v["rejected"] for v in sim.values()), default=0)
    if rejected:
        print(f"kvsched bench replay: warning: the simulator rejected {rejected} requests larger than its pool with "
              "their whole output (the engine caps output): its prediction covers fewer requests", file=sys.stderr)
    invalid = {s: r["invalid"] for s, r in result["sides"].items() if "invalid" in r}
    for side, why in invalid.items():
        print(f"kvsched bench replay: side {side} is not comparable: {why}", file=sys.stderr)
    return 1 if invalid else 0


def sides_arg(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise ValueError(f"--sides: unknown {unknown or text!r}; choose from {', '.join(SIDES)}")
    return sides


@dataclass(frozen=True)
class Setup:
    """What the sides run, checked before any server starts."""

    args: argparse.Namespace
    path: Path
    trace: Any  # the window (kvsched.sim.trace.Trace)
    plan: ReplayPlan
    sides: list[str]
    num_blocks: int
    max_model_len: int
    vocab_size: int


def prepare(args: argparse.Namespace) -> Setup:
    from kvsched.bench.engine_settings import engine_settings, tier_gib
    from kvsched.bench.replay_memory import refuse_past_host, side_memory
    from kvsched.sim.mooncake import cached_traces, stale_note
    from kvsched.sim.trace import Trace
    from kvsched.tiny_model import SIZES, resolve_dtype

    sides = sides_arg(args.sides)
    # the simulator's and the engines' settings, read after the sides (found by review: a traceback then)
    engine_settings(os.environ)
    tier_gib((), os.environ)
    finite = sys.float_info.max  # a window past the trace's end is the whole trace (JSON has no infinity)
    check_args(args, pressure=number(0, finite, low_open=True), time_scale=number(0, 1e6, low_open=True),
               start_s=number(0, finite), seconds=number(0, finite, low_open=True), max_output_tokens=count(1, 2**20))
    check_out_path("--out", args.out)  # a directory or unwritable: found out now, not after the sides' runs
    path = args.trace or cached_traces(["conversation_trace.jsonl"])[0]  # converted again if an older one wrote it
    if not path.exists():
        raise ValueError(f"no trace at {path} (run `kvsched trace fetch mooncake`)")
    check_out_path("--out", args.out, (path,))  # found by review: --out naming the trace overwrote it
    loaded = Trace.load(path)
    if (note := stale_note(loaded.meta)) is not None:
        print(f"kvsched bench replay: warning: {path}: {note}", file=sys.stderr)
    trace = window(loaded, args.start_s, args.seconds)
    shape = SIZES[args.model_size]
    p: ReplayPlan = plan(trace, BLOCK_TOKENS, shape.vocab_size, args.max_output_tokens, time_scale=args.time_scale)
    if not p.requests:
        raise ValueError("every request of the window is longer than the replay's limit")
    longest_blocks = -(-p.longest_tokens // BLOCK_TOKENS)
    max_model_len = math.ceil((p.longest_tokens + 1) / 256) * 256
    # vLLM refuses to start unless its usable blocks hold one request of max_model_len (found at stop 52: a short
    # window or a high pressure sized the pool by the longest request alone, below max_model_len's rounding up)
    if not (asked := p.peak_live_blocks / args.pressure) <= MAX_COUNT:  # found by review: 1e-320 was a traceback
        raise ValueError(f"--pressure {args.pressure:g} makes a pool of {asked:.4g} blocks, past {MAX_COUNT}")
    num_blocks = max(math.ceil(asked), longest_blocks + 4,
                     -(-max_model_len // BLOCK_TOKENS)) + 1  # + vLLM's null block
    # every side's pool at once (a server a side named) and a kvsched side's FP8 tier as it runs, in the dtype
    # `ensure_tiny_model` builds the model in
    dtype = resolve_dtype(None)
    refuse_past_host(args.pressure, [
        side_memory(s, same_memory_blocks(num_blocks) if SIDES[s][2] else num_blocks,
                    tier_gib(SIDES[s][1], os.environ) if SIDES[s][0] else None, shape, dtype, BLOCK_TOKENS)
        for s in dict.fromkeys(sides)], BLOCK_TOKENS * shape.kv_bytes_per_token(dtype))
    return Setup(args, path, trace, p, sides, num_blocks, max_model_len, shape.vocab_size)


def run_benchmark(setup: Setup, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every side in turn, then the simulator; `checkpoint` gets the result so far after each side."""
    from kvsched.bench.engine_settings import side_settings
    from kvsched.core.config import RetentionConfig
    from kvsched.serving import ServerSpec, VllmServer, start_all
    from kvsched.tiny_model import ensure_tiny_model

    args, p, num_blocks = setup.args, setup.plan, setup.num_blocks
    model_dir = ensure_tiny_model(args.model_size)
    planned_prompt = sum(len(r.prompt) for r in p.requests)
    prov = provenance()  # now: the checkpoints below may write into the tree (`--out` under benchmarks/results/)
    config = {"trace": setup.path.name, "start_s": args.start_s, "seconds": args.seconds,
              "time_scale": args.time_scale, "requests": len(p.requests), "dropped_long": p.dropped_long,
              "peak_live_blocks": p.peak_live_blocks, "pressure_live": args.pressure,
              # what the pool is (larger than asked when the longest request needs it)
              "pressure_live_actual": round(p.peak_live_blocks / (num_blocks - 1), 4),
              "num_blocks": num_blocks, "block_tokens": BLOCK_TOKENS, "trace_block_size": p.trace_block_size,
              "max_model_len": setup.max_model_len, "model_size": args.model_size,
              "max_output_tokens": args.max_output_tokens, "planned_prompt_tokens": planned_prompt,
              "warmup_requests": WARMUP_REQUESTS, "order": setup.sides,
              "same_memory_num_blocks": same_memory_blocks(num_blocks)}
    servers = {name: VllmServer(ServerSpec(model=model_dir, scheduler=SIDES[name][0],
                                           max_model_len=setup.max_model_len, block_size=BLOCK_TOKENS,
                                           num_blocks=same_memory_blocks(num_blocks) if SIDES[name][2] else num_blocks,
                                           served_model_name=MODEL, extra_args=SIDES[name][1]))
               for name in setup.sides}
    # what each side's engine reads (its KVSCHED_* settings and flags) and the simulator's policy: the JSON alone
    # says how to run it again
    config["sides"] = {name: side_settings(server.spec) for name, server in servers.items()}
    config["simulator_retention"] = RetentionConfig.from_env().as_dict()
    measured_sides: dict[str, Any] = {}
    timings: dict[str, list[float | None]] = {}  # each side's per-request hold times (`predicted`'s durations)
    try:
        start_all(list(servers.values()))
        for name, server in servers.items():
            warm_up(server.url, setup.vocab_size)
            before = server.metrics()
            outcomes, wall, late = drive(server.url, p.requests)
            measured_sides[name] = measured(outcomes, before, server.metrics(), wall, late, planned_prompt)
            timings[name] = [o.get("done_s") for o in outcomes]
            server.stop()
            print(f"{name}: {measured_sides[name]['prefill_tokens_computed']} prefill tokens computed, "
                  f"{wall:.0f} s", flush=True)
            if checkpoint is not None:
                checkpoint({"sides": _with_ratios(measured_sides), "simulator": None,
                            "config": {**config, "complete": False, "provenance": prov}})
    finally:
        for server in servers.values():
            server.stop()
    kept = setup.trace if not p.dropped_long else setup.trace.subset(p.kept)  # the window as the engine saw it
    tiered = measured_sides.get("kvsched", {})
    tier = (tiered["tier_capacity_bytes"], tiered["tier_block_bytes"]) if tiered.get("tier_block_bytes") else None
    return {"sides": _with_ratios(measured_sides), "simulator": predicted(kept, num_blocks - 1, tier, timings,
                                                                          BLOCK_TOKENS),
            "config": {**config, "complete": True, "provenance": prov}}


def _with_ratios(sides: dict[str, Any]) -> dict[str, Any]:
    """Each side's prefill over stock's (over the first side's without stock); None where either is not valid."""
    base = sides.get("stock", next(iter(sides.values()), {}))
    for r in sides.values():
        ok = "invalid" not in r and "invalid" not in base and base.get("prefill_tokens_computed")
        r["over_stock"] = r["prefill_tokens_computed"] / base["prefill_tokens_computed"] if ok else None
    return sides
