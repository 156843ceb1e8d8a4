"""`kvsched bench agents`: the same seeded multi-agent workload through stock vLLM and through kvsched.

Both sides get the same model files, the same KV pool (`--num-gpu-blocks-override`), block size, max_model_len and
requests; only `--scheduler kvsched` differs. The pool is sized so the sessions' working set (every agent's final
context) is `--pressure` times the pool. Counts come from vLLM's own /metrics; TTFT is measured client-side.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from kvsched.bench.agents_driver import TTL_HINT_S, RunRecord, run_with_progress
from kvsched.bench.agents_naming import add_naming_gates, naming_of, parse_namings, with_naming_sides
from kvsched.bench.agents_recorded import (
    RECORDER_SIDE,
    prediction_check,
    recorded_lines,
    recorder_env,
    replay_recording,
    replay_with_tier,
)
from kvsched.bench.agents_report import (
    NO_TIER_SIDE,
    SAME_MEMORY_SIDE,
    TIER_SIDE,
    attainable,
    clairvoyant_bound,
    compare,
    gates,
    gates_not_applicable,
    print_report,
    unbounded_reach,
    verdict,
)
from kvsched.bench.agents_sizing import count_tokens, refuse_past_host
from kvsched.bench.args import MAX_GIB, check_args, check_out_dir, check_out_path, count, number, refuse, seed
from kvsched.bench.common import percentile, provenance, write_json
from kvsched.bench.engine_settings import side_settings
from kvsched.bench.plots import grouped_bars, save_beside, side_ratios, ttft_chart
from kvsched.bench.replay_memory import HostMemoryError
from kvsched.bench.trace_engine import same_memory_blocks
from kvsched.core.tier_config import AUTO_HOST_FRACTION, AUTO_POOL_MULTIPLE
from kvsched.serving import ServerSpec, VllmServer, start_all
from kvsched.sim.workload import Topology, WorkloadConfig, generate
from kvsched.tiny_model import SIZES, ensure_tiny_model, tiny_model_dtype

QUICK = WorkloadConfig(workflows=3, topology=Topology.HIERARCHICAL, workers=3, rounds=3, worker_turns=3, tool_words=60)
FULL = WorkloadConfig(workflows=6, topology=Topology.HIERARCHICAL, workers=4, rounds=4, worker_turns=3, tool_words=60)
# side -> --scheduler value. "kvsched" is `vllm serve --scheduler kvsched` as shipped: its FP8 tier on (host memory by
# the default rule, or --fp8-tier-gb), so pins released under pressure are quantized into host memory and restored
# (prefetched when the session's request is queued) instead of recomputed. "kvsched-no-tier" is kvsched with
# `--kvsched-fp8-tier-gb 0`: retention and release order alone, at the same pool. "unbounded" is stock vLLM with a pool
# that holds the whole working set: the prefill no eviction policy can go below at any pressure (new tokens, what the
# chat template forces to recompute, and the partial last block of every turn, since vLLM's prefix cache shares full
# blocks only), measured in the same run. Only the tier (KV beyond the pool) and its partial-block restores go below it.
# "stock-same-memory" is stock vLLM whose pool has the bytes of the kvsched side's pool and tier together (3x the
# blocks with the default tier; trace_engine.same_memory_blocks): the tier side's gates are judged against it, as the
# same KV memory (BENCH_PROTOCOL rule 1; found by review: they were judged against stock with a third of the memory).
# It runs by default, --quick too: the headline is the fair comparison (~30 s more on the quick workload).
# "recorder" (not in the default sides) is kvsched's scheduler holding no pin while the engine records the run; the
# recording's replay predicts the other sides' prefill (agents_recorded).
SIDES = {"stock": None, "kvsched-no-tier": "kvsched", "kvsched": "kvsched", SAME_MEMORY_SIDE: None, "unbounded": None,
         RECORDER_SIDE: "kvsched"}
DEFAULT_SIDES = ("stock", "kvsched-no-tier", "kvsched", SAME_MEMORY_SIDE, "unbounded")
REPLAY_SIDES = ("stock", NO_TIER_SIDE)  # replayed at their pool under LRU / kvsched / Belady (agents_replay)
UNBOUNDED_HEADROOM = 1.25
BLOCK_SIZE = 32
METRIC_KEYS = ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
               "vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:external_prefix_cache_hits_total")
TIER_COUNTERS = ("demotions", "demoted_blocks", "evicted_blocks", "restores", "restored_blocks", "restore_misses",
                 "load_failures", "tails_stored", "restored_tail_tokens", "prefetched_restores", "prefetches_queued",
                 "prefetches_due", "prefetched_blocks", "prefetch_useful_blocks", "prefetch_wasted_blocks",
                 "wasted_prefetches", "prefetch_hit_tokens", "tail_restores")
SWEEP_PRESSURES = (1.5, 3.0, 6.0)
RATIO_METRICS = ("prefill_tokens_computed", "followup_ttft_p95_s", "ttft_p50_s", "throughput_tok_s")
MAX_AGENTS = 1000  # workflows, workers, rounds or turns: a thousand already takes hours on a CPU (as `kvsched demo`)
LIMITS = {"workflows": count(1, MAX_AGENTS), "workers": count(1, MAX_AGENTS), "rounds": count(1, MAX_AGENTS),
          "worker_turns": count(1, MAX_AGENTS), "tool_words": count(0, 10**5), "brief_words": count(0, 10**5),
          "pressure": number(0, 1e6, low_open=True), "fp8_tier_gb": number(0, MAX_GIB),
          "fidelity_probes": count(0, 10**4), "seed": seed()}


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("agents", help="multi-agent workload: stock vLLM vs kvsched")
    p.add_argument("--quick", action="store_true", help="small workload for CI-speed trend checks (< 5 min)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--topology", choices=[t.value for t in Topology], default=None)
    p.add_argument("--workflows", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--worker-turns", type=int, default=None, help="turns (tool calls) per worker per round")
    p.add_argument("--tool-words", type=int, default=None, help="words per tool result")
    p.add_argument("--brief-words", type=int, default=None, help="words of each agent's first-turn brief/documents")
    p.add_argument("--pressure", type=float, default=1.5, help="working set / KV pool (default 1.5)")
    p.add_argument("--sweep", action="store_true",
                   help=f"run every side at pressures {', '.join(map(str, SWEEP_PRESSURES))} in one invocation and plot "
                        "prefill and follow-up P95 TTFT against stock (JSON and PNG)")
    p.add_argument("--model-size", choices=sorted(SIZES), default="bench")
    p.add_argument("--fp8-tier-gb", type=float, default=None,
                   help=f"host memory (GiB) of the kvsched side's tier (default: none passed, so the server's own "
                        f"rule: min({AUTO_POOL_MULTIPLE:g}x the KV pool's bytes, {AUTO_HOST_FRACTION:g} x the host "
                        f"memory available at start-up / GPUs on the host); the stock-same-memory side is sized for "
                        f"{AUTO_POOL_MULTIPLE:g}x the pool, so give a size where the host cap would bind")
    p.add_argument("--fidelity-probes", type=int, default=4,
                   help="restored-vs-recomputed greedy probes on the kvsched server after its run (0: none)")
    p.add_argument("--sides", type=parse_sides, default=",".join(DEFAULT_SIDES),
                   help="comma list of: " + ",".join(SIDES) + " (default: all but recorder)")
    p.add_argument("--session-header", type=parse_namings, default="header", metavar="none|header|prompt_cache_key",
                   help="how the kvsched sides name sessions (comma list): header (the kvsched side), "
                        "prompt_cache_key or none (session inference); each adds a side kvsched:<naming>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-dir", type=trace_dir_arg, default=None,
                   help="write each replayed side's requests as a trace (docs/trace_schema.md) for kvsched simulate")
    p.add_argument("--no-replay", action="store_true",
                   help="skip the simulator's replay of each side's arrivals (LRU, kvsched, clairvoyant Belady)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def parse_sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(f"unknown side(s) {unknown or text!r}; choose from {', '.join(SIDES)}")
    return list(dict.fromkeys(sides))


def trace_dir_arg(text: str) -> Path:
    """`--trace-dir`: checked before any server starts, not after a side's run."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    cfg = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.topology:
        overrides["topology"] = Topology(args.topology)
    for name in ("workflows", "workers", "rounds", "worker_turns", "tool_words", "brief_words"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return replace(cfg, **overrides)


def prefill_throughput(server: VllmServer, model: str, max_model_len: int) -> float:
    """Tokens/s of an uncached prefill of up to 1k tokens (a non-session request), best of 3 (the first warms up)."""
    n = min(1024, max_model_len - 16)
    best = 0.0
    for i in range(3):
        ids = [10 + i] + [(j * 37 + i) % 2000 + 10 for j in range(n - 1)]
        body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1}).encode()
        req = urllib.request.Request(server.url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            usage = json.loads(r.read())["usage"]
        best = max(best, usage["prompt_tokens"] / (time.perf_counter() - t0))
    return best


def summarize(record: RunRecord, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in METRIC_KEYS}
    # Tokens restored by a KV connector (the FP8 tier) are not computed either: vLLM counts them as external hits.
    prompt, hits, queries = d["vllm:prompt_tokens_total"], \
        d["vllm:prefix_cache_hits_total"] + d["vllm:external_prefix_cache_hits_total"], \
        d["vllm:prefix_cache_queries_total"]
    ok = [t for t in record.turns if not t.error]
    ttfts = [t.ttft_s for t in ok if t.ttft_s is not None]
    follow = [t.ttft_s for t in ok if t.ttft_s is not None and t.turn_index > 0]
    tokens = sum(t.prompt_tokens + t.completion_tokens for t in ok)
    out: dict[str, Any] = {
        "prefill_tokens_computed": int(prompt - hits),
        "prompt_tokens_total": int(prompt),
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "followup_ttft_p50_s": percentile(follow, 0.5),
        "followup_ttft_p95_s": percentile(follow, 0.95),
        "followup_ttft_n": len(follow),  # the follow-up percentiles' sample count
        "throughput_tok_s": tokens / record.wall_s if record.wall_s else 0.0,
        "wall_s": record.wall_s,
        "turns": len(record.turns),
        "errors": record.errors,
        "preemptions": int(d["vllm:num_preemptions_total"]),
        # every turn: [session, index within the session, sent (s after the start), TTFT (s) or None on error]
        "turn_ttfts": [[t.session_id, t.turn_index, round(t.sent_s, 4),
                        None if t.error or t.ttft_s is None else round(t.ttft_s, 5)] for t in record.turns],
    }
    if "kvsched_retained_hit_tokens_total" in after:
        for field in ("retained_hit_tokens", "retained_hits", "sessions_seen"):
            out[field] = int(after.get(f"kvsched_{field}_total", 0.0) - before.get(f"kvsched_{field}_total", 0.0))
        out["released_queued_blocks"] = int(after.get("kvsched_released_queued_blocks_total", 0.0)
                                            - before.get("kvsched_released_queued_blocks_total", 0.0))
        for field, metric in (("pin_releases", "kvsched_pin_releases_total"),
                              ("pin_partial_releases", "kvsched_pin_partial_releases_total"),
                              ("pin_released_blocks", "kvsched_pin_released_blocks_total")):
            out[field] = {
                reason: int(after.get(f'{metric}{{reason="{reason}"}}', 0.0)
                            - before.get(f'{metric}{{reason="{reason}"}}', 0.0))
                for reason in ("turn", "ttl", "end", "pressure", "budget")}
    if after.get("kvsched_tier_enabled"):
        out["tier"] = {name: int(after.get(f"kvsched_tier_{name}_total", 0.0)
                                 - before.get(f"kvsched_tier_{name}_total", 0.0)) for name in TIER_COUNTERS}
        # restored instead of recomputed: at admission (external hits) and ahead of it (prefetched blocks hit)
        out["tier"]["restored_tokens"] = int(d["vllm:external_prefix_cache_hits_total"]) + out["tier"][
            "prefetch_hit_tokens"]
        out["tier"]["worker_seconds"] = round(after.get("kvsched_tier_worker_seconds_total", 0.0)
                                              - before.get("kvsched_tier_worker_seconds_total", 0.0), 3)
        out["tier"]["capacity_bytes"] = int(after["kvsched_tier_capacity_bytes"])
        out["tier"]["peak_bytes_at_end"] = int(after.get("kvsched_tier_bytes", 0.0))
        rms = after.get("kvsched_tier_kv_rel_rms_error", -1.0)
        out["tier"]["kv_rel_rms_error"] = rms if rms >= 0 else None
    errors = [t.error for t in record.turns if t.error]
    if errors:
        out["first_errors"] = errors[:3]
    return out


def run_side(name: str, server: VllmServer, cfg: WorkloadConfig, progress: bool,
             fidelity_probes: int = 0, replay_bytes_per_token: float | None = None,
             trace_dir: Path | None = None, recording: tuple[Path, float] | None = None) -> tuple[dict[str, Any], float]:
    """One side's run on its started `server`, which is stopped after it; with `replay_bytes_per_token`, also its
    clairvoyant replay (`agents_replay`); with `recording` (the engine's trace file, KV bytes per token), the replay
    of what the engine recorded during the run (`agents_recorded`)."""
    workflows = generate(cfg)
    spec = server.spec
    with server:
        prefill_tok_s = prefill_throughput(server, spec.served_model_name, spec.max_model_len)
        before = server.metrics()
        skip = recorded_lines(recording[0]) if recording else 0  # the throughput probes above are not the run's
        record = run_with_progress(server.url, spec.served_model_name, cfg.max_tokens, workflows, name, progress,
                                   naming_of(name))
        after = server.metrics()
        summary = summarize(record, before, after)
        if recording is not None:
            from kvsched.bench.agents_replay import decode_s_per_token

            summary["recorded_replay"] = replay_recording(recording[0], skip, prefill_tok_s,
                                                          decode_s_per_token(record), recording[1])
        if replay_bytes_per_token is not None:  # this run's arrivals at this pool: LRU, kvsched's policy, Belady
            from kvsched.bench.agents_replay import clairvoyant_replay

            summary["replay"] = clairvoyant_replay(
                spec.model, workflows, record, spec.block_size, (spec.num_blocks or 1) - 1,  # vLLM's null block
                prefill_tok_s, replay_bytes_per_token, TTL_HINT_S,
                trace_out=trace_dir / f"{name}.jsonl" if trace_dir else None)
        if fidelity_probes > 0:  # after the measured run: the probes' own traffic is not in the figures above
            from kvsched.bench.tier_fidelity import ProbeConfig, probe

            pool = (spec.num_blocks or 0) * spec.block_size
            summary["fidelity"] = probe(server, spec.served_model_name, pool, spec.max_model_len,
                                        ProbeConfig(probes=fidelity_probes))
    return summary, prefill_tok_s


def check(args: argparse.Namespace) -> None:
    """The options, before the model is built or any server starts (found by review: --pressure nan was a traceback,
    --workflows 0 or -1, --rounds 0 and --pressure -1 started the servers)."""
    check_args(args, **LIMITS)
    check_out_path("--out", args.out)
    check_out_dir("--trace-dir", args.trace_dir)


def run(args: argparse.Namespace) -> int:
    try:
        check(args)
    except ValueError as exc:
        return refuse("kvsched bench agents", exc)
    try:
        if args.sweep:  # (its first pressure, the lowest, needs the most memory: refused there, before any server)
            from kvsched.bench.agents_sweep import run_sweep

            return run_sweep(args)
        result = run_benchmark(args)
    except HostMemoryError as exc:  # the sides' KV memory past this host's, found before any server starts
        return refuse("kvsched bench agents", exc)
    print_report(result)
    write_json(args.out, result)
    save_beside(args.out, lambda path: plot_run(result, path))
    code, line = verdict(result)  # the last line: a failed gate is the exit code, not a line among the table's
    print(line)
    return code


def plot_run(result: dict[str, Any], path: Path) -> Path:
    """Every turn's TTFT by its index in the session, for every side (the demo's chart), and the ratios to stock."""
    sides = [s for s in SIDES if s in result]
    ttft_chart({s: result[s]["turn_ttfts"] for s in sides}, path, "kvsched bench agents: time to first token by turn")
    grouped_bars(side_ratios(result, [s for s in sides if s != "stock"], list(RATIO_METRICS)),
                 path.with_name(path.stem + "_ratios.png"), "kvsched bench agents: each side over stock (kvsched: "
                 f"pool + FP8 tier; {SAME_MEMORY_SIDE}: the same bytes)", "x stock")
    return path


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    cfg = workload_config(args)
    model_dir = ensure_tiny_model(args.model_size)
    working_set, longest = count_tokens(model_dir, generate(cfg))
    pool_tokens = working_set / args.pressure
    num_blocks = max(math.ceil(pool_tokens / BLOCK_SIZE), math.ceil((longest + 64) / BLOCK_SIZE) + 4)
    max_model_len = int(math.ceil((longest + cfg.max_tokens + 64) / 256) * 256)
    sides = parse_sides(args.sides) if isinstance(args.sides, str) else list(args.sides)
    namings = getattr(args, "session_header", "header")
    sides = with_naming_sides(sides, parse_namings(namings) if isinstance(namings, str) else list(namings))
    unbounded_blocks = max(num_blocks, math.ceil(working_set * UNBOUNDED_HEADROOM / BLOCK_SIZE))
    result: dict[str, Any] = {}
    prefill_rates = {}
    shape = SIZES[args.model_size]
    dtype = tiny_model_dtype(model_dir) or "bfloat16"
    bytes_per_token = shape.kv_bytes_per_token(dtype)
    pool_bytes = num_blocks * BLOCK_SIZE * bytes_per_token
    tier_gb = args.fp8_tier_gb
    tier_multiple = AUTO_POOL_MULTIPLE if tier_gb is None else tier_gb * 2**30 / pool_bytes  # tier bytes / pool bytes
    same_blocks = same_memory_blocks(num_blocks, tier_multiple)
    blocks = {"unbounded": unbounded_blocks, SAME_MEMORY_SIDE: same_blocks}
    specs = {}
    recording = None
    if RECORDER_SIDE in sides:  # kept with the other traces under --trace-dir, else in a temporary directory
        trace_dir = getattr(args, "trace_dir", None)
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
        recording = (trace_dir or Path(tempfile.mkdtemp(prefix="kvsched-recorder-"))) / "recorder.recorded.jsonl"
        recording.unlink(missing_ok=True)  # a previous run's: the engine would record beside it, not over it
    for name in sides:
        extra = {TIER_SIDE: ["--kvsched-fp8-tier-gb", f"{tier_gb:.6f}"] if tier_gb is not None else [],
                 NO_TIER_SIDE: ["--kvsched-fp8-tier-gb", "0"], RECORDER_SIDE: ["--kvsched-fp8-tier-gb", "0"],
                 }.get(name if naming_of(name) == "header" else TIER_SIDE, [])  # kvsched:<naming>: kvsched's tier
        specs[name] = ServerSpec(model=model_dir, scheduler=SIDES.get(name, "kvsched"), max_model_len=max_model_len,
                                 block_size=BLOCK_SIZE,
                                 num_blocks=blocks.get(name, num_blocks),
                                 served_model_name="agents", extra_args=extra,
                                 env=recorder_env(recording) if recording and name == RECORDER_SIDE else {})
    # what each side's engine reads (its flags and KVSCHED_* settings): read now, so a malformed one stops the run
    # before any server starts, as `kvsched bench replay` records them (engine_settings.side_settings)
    side_config = {name: side_settings(spec) for name, spec in specs.items()}
    refuse_past_host(args.pressure, sides, specs, side_config, shape, dtype)  # every pool and tier: the host holds them
    # Every side's server starts at once (their start-ups overlap); the sides then run one after another, each on
    # its own server while the others wait idle (no CPU), and each server stops after its side.
    servers = start_all([VllmServer(specs[name]) for name in sides])
    try:
        for name, server in zip(sides, servers, strict=True):
            result[name], prefill_rates[name] = run_side(
                name, server, cfg, progress=not args.no_progress,
                fidelity_probes=args.fidelity_probes if name == TIER_SIDE else 0,
                replay_bytes_per_token=bytes_per_token if name in REPLAY_SIDES and not args.no_replay else None,
                trace_dir=getattr(args, "trace_dir", None),
                recording=(recording, bytes_per_token) if recording and name == RECORDER_SIDE else None)
    finally:
        for server in servers:
            server.stop()
    compare(result, list(result))
    if RECORDER_SIDE in result:
        recorded, capacity = result[RECORDER_SIDE].get("recorded_replay"), result.get(TIER_SIDE, {}).get("tier", {})
        if recorded and capacity.get("capacity_bytes"):  # the recording's prediction of the tier side, at its tier
            replay_with_tier(recorded, capacity["capacity_bytes"])
        result["recorded_prediction"] = prediction_check(result)
    if {"stock", "unbounded"} <= result.keys():
        result["bound"] = attainable(result)
    if {"stock", NO_TIER_SIDE} <= result.keys():
        result.setdefault("bound", {}).update(clairvoyant_bound(result))
    result["config"] = {
        "workload": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()},
        "model": {"size": args.model_size, "dtype": dtype, "parameters": shape.num_parameters(), **asdict(shape)},
        "measured_prefill_tok_s": prefill_rates,
        "working_set_tokens": working_set, "kv_pool_tokens": num_blocks * BLOCK_SIZE,
        "unbounded_pool_tokens": unbounded_blocks * BLOCK_SIZE,
        "pressure": working_set / (num_blocks * BLOCK_SIZE), "num_blocks": num_blocks, "block_size": BLOCK_SIZE,
        "max_model_len": max_model_len, "sessions": sum(len(w.agents()) for w in generate(cfg)),
        "kv_pool_bytes": int(pool_bytes), "fp8_tier_gb": tier_gb if TIER_SIDE in sides else None,
        "fp8_tier_capacity_bytes": (tier_bytes := result.get(TIER_SIDE, {}).get("tier", {}).get("capacity_bytes")),
        "same_memory_num_blocks": same_blocks if (same := SAME_MEMORY_SIDE in sides) else None,
        "same_memory_pool_bytes": int(same_blocks * BLOCK_SIZE * bytes_per_token) if same else None,
        "kvsched_pool_plus_tier_bytes": int(pool_bytes + tier_bytes) if tier_bytes is not None else None,
        "sides": side_config, "provenance": provenance(),
    }
    result["gates"] = gates(result)
    result["gates_not_applicable"] = gates_not_applicable(result)
    result["unbounded_reach"] = unbounded_reach(result)
    add_naming_gates(result)
    return result
