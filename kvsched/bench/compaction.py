"""`kvsched bench compaction`: long-running sessions that grow to `--growth` x the compaction trigger, through stock
vLLM, kvsched with `summarize` and kvsched with `sliding_window` — same model files, same KV pool, same requests.

Each session is an agent appending tool results to its history (the real `openai` client, streaming, as in
`bench agents`). The pool is sized so the sessions' uncompacted working set is `--pressure` x the pool.
Measured per side: peak resident KV tokens per session (the largest context a session's request occupied, from the
server's own `usage`; for kvsched sides also the largest pin polled from /kvsched/sessions), prefill tokens computed
(vLLM's /metrics: prompt tokens minus prefix-cache hits, summary calls included), follow-up TTFT P95 (client side),
preemptions, and how many sessions the pool holds at each side's per-session peak.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvsched.bench.agents import prefill_throughput
from kvsched.bench.agents import summarize as summarize_run
from kvsched.bench.agents_driver import RunRecord, run_with_progress
from kvsched.bench.args import check_args, check_out_path, count, number, refuse, seed
from kvsched.bench.common import percentile, provenance, ratios, table, write_json
from kvsched.bench.plots import grouped_bars, save_beside, side_ratios
from kvsched.serving import ServerSpec, VllmServer
from kvsched.sim.workload import Topology, Workflow, WorkloadConfig, generate
from kvsched.tiny_model import SIZES, ensure_tiny_model

BLOCK_SIZE = 32
SIDES: dict[str, tuple[str | None, str | None]] = {  # side -> (--scheduler, KVSCHED_COMPACTION)
    "stock": (None, None),
    "summarize": ("kvsched", "summarize"),
    "sliding_window": ("kvsched", "sliding_window"),
}
QUICK = dict(sessions=4, trigger_tokens=384, summary_tokens=48, model_size="bench")
FULL = dict(sessions=8, trigger_tokens=512, summary_tokens=64, model_size="bench")
MAX_HISTORY_TOKENS = 2**20  # a session's uncompacted history: size_workload adds a turn at a time to reach it
COMPACTION_METRICS = ("kvsched_compaction_summary_calls_total", "kvsched_compaction_summaries_total",
                      "kvsched_compaction_summary_failures_total", "kvsched_compaction_windows_total",
                      "kvsched_compaction_rewritten_requests_total", "kvsched_compaction_saved_tokens_total")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "compaction", help="sessions growing past the compaction trigger: stock vs kvsched summarize/sliding_window")
    p.add_argument("--quick", action="store_true", help="small run for trend checks (< 5 min)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--sessions", type=int, default=None, help="concurrent growing sessions")
    p.add_argument("--trigger-tokens", type=int, default=None, help="KVSCHED_COMPACTION_TRIGGER_TOKENS")
    p.add_argument("--summary-tokens", type=int, default=None, help="KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS")
    p.add_argument("--growth", type=float, default=8.0, help="each session's history grows to this x the trigger")
    p.add_argument("--pressure", type=float, default=2.0, help="uncompacted working set / KV pool (default 2.0)")
    p.add_argument("--tool-words", type=int, default=100, help="words per tool result (one per turn)")
    p.add_argument("--model-size", choices=sorted(SIZES), default=None)
    p.add_argument("--sides", type=parse_sides, default=list(SIDES), help="comma list of: " + ",".join(SIDES))
    p.add_argument("--wait-for-summary", action="store_true",
                   help="the triggering request waits for its summary (KVSCHED_COMPACTION_WAIT_FOR_SUMMARY=1)")
    p.add_argument("--scheduling-policy", choices=("priority", "fcfs"), default="priority",
                   help="vLLM --scheduling-policy on every side (default priority: the summary calls' lower priority "
                        "is honoured; all user requests have the same priority, so their order is FCFS as in stock)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def parse_sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(f"unknown side(s) {unknown or text!r}; choose from {', '.join(SIDES)}")
    return list(dict.fromkeys(sides))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    out = dict(base)
    for name in ("sessions", "trigger_tokens", "summary_tokens", "model_size"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if out["sessions"] < 1 or out["trigger_tokens"] < 1 or out["summary_tokens"] < 1:  # (run: `check` first)
        raise SystemExit("--sessions, --trigger-tokens and --summary-tokens must be >= 1")
    return out


def compaction_env(s: dict[str, Any], wait_for_summary: bool) -> dict[str, str]:
    """The compaction sides' KVSCHED_* settings (each adds its KVSCHED_COMPACTION strategy)."""
    return {"KVSCHED_COMPACTION_TRIGGER_TOKENS": str(s["trigger_tokens"]),
            "KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS": str(s["summary_tokens"]),
            "KVSCHED_COMPACTION_KEEP_RECENT_MESSAGES": "2",
            "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1" if wait_for_summary else "0"}


def check(args: argparse.Namespace) -> None:
    """The options, before the model is built or any server starts: each in range, and the sides' compaction settings
    as the engine reads them (a --summary-tokens not below --trigger-tokens: the server would refuse to start)."""
    from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput

    check_args(args, sessions=count(1, 10**4), trigger_tokens=count(1, 2**24), summary_tokens=count(1, 2**24),
               growth=number(0, 1000, low_open=True), pressure=number(0, 1e6, low_open=True),
               tool_words=count(0, 10**5), seed=seed())
    try:
        CompactionConfig.from_env({**compaction_env(settings(args), args.wait_for_summary),
                                   "KVSCHED_COMPACTION": "summarize"})
    except InvalidCompactionInput as exc:
        raise ValueError(f"--trigger-tokens, --summary-tokens: {exc}") from None
    if (target := args.growth * settings(args)["trigger_tokens"]) > MAX_HISTORY_TOKENS:  # sized turn by turn
        raise ValueError(f"--growth x --trigger-tokens is a history of {target:.4g} tokens a session, past "
                         f"{MAX_HISTORY_TOKENS:,}")
    check_out_path("--out", args.out)


def workload(sessions: int, rounds: int, tool_words: int, seed: int) -> WorkloadConfig:
    """Independent agents (flat topology): one growing session each; short tool latencies keep the run brief."""
    return WorkloadConfig(workflows=1, topology=Topology.FLAT, workers=sessions, rounds=rounds, tool_words=tool_words,
                          brief_words=40, system_words=30, think_words=12, max_tokens=8, tool_latency_s=(0.2, 0.5),
                          stagger_s=0.0, seed=seed)


def history_tokens(model_dir: Path, workflows: list[Workflow]) -> list[int]:
    """Each session's final request rendered with the chat template, in tokens (its uncompacted peak context)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for wf in workflows:
        for agent in wf.agents():
            msgs = [{"role": "system", "content": agent.system}]
            for t in agent.turns:
                msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
            text = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            out.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def size_workload(model_dir: Path, sessions: int, target_tokens: int, tool_words: int,
                  seed: int) -> tuple[WorkloadConfig, list[int]]:
    """The fewest turns per session that take every session's history to `target_tokens`."""

    def tokens_at(rounds: int) -> list[int]:
        return history_tokens(model_dir, generate(workload(sessions, rounds, tool_words, seed)))

    two, three = min(tokens_at(2)), min(tokens_at(3))
    rounds = max(2, 3 + math.ceil((target_tokens - three) / max(three - two, 1)))
    while rounds > 2 and min(tokens_at(rounds - 1)) >= target_tokens:
        rounds -= 1
    while min(tokens := tokens_at(rounds)) < target_tokens:
        rounds += 1
    return workload(sessions, rounds, tool_words, seed), tokens


class PinSampler:
    """Polls GET /kvsched/sessions while a side runs: the largest pin each session held. It polls every side, stock
    too (which answers 404), so every server carries the same polling load (found by review: only the kvsched sides
    were polled, 5 requests a second their TTFTs paid for and stock's did not)."""

    def __init__(self, base: str, interval_s: float = 0.2) -> None:
        self.base = base
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PinSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.base + "/kvsched/sessions", timeout=5) as r:
                    rows = json.loads(r.read())["sessions"]
            except (OSError, ValueError, KeyError):
                continue
            for row in rows:
                sid = row["session_id"]
                self.peaks[sid] = max(self.peaks.get(sid, 0), int(row.get("pinned_tokens", 0)))


def side_result(record: RunRecord, before: dict[str, float], after: dict[str, float], pool_tokens: int,
                pin_peaks: dict[str, int] | None) -> dict[str, Any]:
    out = summarize_run(record, before, after)  # prefill tokens, TTFTs, errors, preemptions (as bench agents)
    peaks: dict[str, int] = {}
    for t in record.turns:
        if not t.error:
            peaks[t.session_id] = max(peaks.get(t.session_id, 0), t.prompt_tokens + t.completion_tokens)
    per_session = list(peaks.values())
    out["peak_kv_tokens_per_session"] = sum(per_session) / len(per_session) if per_session else 0.0
    out["peak_kv_tokens_max_session"] = max(per_session, default=0)
    out["peak_kv_tokens_p95_session"] = percentile(per_session, 0.95)
    out["sessions_measured"] = len(per_session)  # the p95 above is over this many sessions (4 in --quick)
    ok = [t for t in record.turns if not t.error]
    # throughput_tok_s (bench agents') counts served prompt + completion tokens: compaction shrinks the prompts it
    # serves by design, so it falls on the compacting sides; the answers' rate compares (found by review)
    out["completion_tok_s"] = sum(t.completion_tokens for t in ok) / record.wall_s if record.wall_s else 0.0
    if pin_peaks is not None:
        pins = [pin_peaks.get(s, 0) for s in peaks]
        out["peak_pinned_tokens_per_session"] = sum(pins) / len(pins) if pins else 0.0
    failures = {reason: after.get(f'kvsched_compaction_summary_failures_total{{reason="{reason}"}}', 0.0)
                - before.get(f'kvsched_compaction_summary_failures_total{{reason="{reason}"}}', 0.0)
                for reason in ("timeout", "error", "empty")}
    if any(failures.values()):
        out["summary_failures_by_reason"] = failures
    if out["errors"]:
        out["invalid"] = f"{out['errors']} of {out['turns']} turns failed"  # no ratio, no bar (plots.side_ratios)
    worst = out["peak_kv_tokens_max_session"]
    out["sessions_pool_holds_at_peak"] = pool_tokens // worst if worst else None
    for name in COMPACTION_METRICS:
        if name in after:
            out[name.removeprefix("kvsched_compaction_").removesuffix("_total")] = \
                after.get(name, 0.0) - before.get(name, 0.0)
    return out


def run_side(name: str, spec: ServerSpec, cfg: WorkloadConfig, pool_tokens: int, progress: bool) -> dict[str, Any]:
    workflows = generate(cfg)
    with VllmServer(spec) as server:
        # Warm-up (and the engine's uncached prefill rate): first long prompts of a fresh engine are slow on CPU.
        prefill_tok_s = prefill_throughput(server, spec.served_model_name, spec.max_model_len)
        before = server.metrics()
        with PinSampler(server.base) as sampler:  # on every side: the same polling load
            record = run_with_progress(server.url, spec.served_model_name, cfg.max_tokens, workflows, name, progress)
        pins = sampler.peaks if spec.scheduler else None
        after = server.metrics()
    out = side_result(record, before, after, pool_tokens, pins)
    out["measured_prefill_tok_s"] = prefill_tok_s
    return out


def run(args: argparse.Namespace) -> int:
    try:
        check(args)
    except ValueError as exc:
        return refuse("kvsched bench compaction", exc)
    result = run_benchmark(args)
    print_report(result)
    write_json(args.out, result)
    sides = [s for s in ("summarize", "sliding_window") if s in result]
    save_beside(args.out, lambda path: grouped_bars(
        side_ratios(result, sides, ["prefill_tokens_computed", "followup_ttft_p95_s", "completion_tok_s"]), path,
        "kvsched bench compaction: each strategy over stock", "x stock"))
    return 0  # gates are reported, not enforced here


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    s = settings(args)
    model_dir = ensure_tiny_model(s["model_size"])
    target = math.ceil(args.growth * s["trigger_tokens"])
    cfg, finals = size_workload(model_dir, s["sessions"], target, args.tool_words, args.seed)
    working_set = sum(finals)
    num_blocks = max(math.ceil(working_set / args.pressure / BLOCK_SIZE), math.ceil((max(finals) + 64) / BLOCK_SIZE) + 4)
    max_model_len = int(math.ceil((max(finals) + cfg.max_tokens + 64) / 256) * 256)
    pool_tokens = num_blocks * BLOCK_SIZE
    env_common = compaction_env(s, args.wait_for_summary)
    sides = parse_sides(args.sides) if isinstance(args.sides, str) else list(args.sides)
    result: dict[str, Any] = {}
    for name in sides:
        scheduler, strategy = SIDES[name]
        env = dict(env_common, KVSCHED_COMPACTION=strategy) if strategy else {"KVSCHED_COMPACTION": "off"}
        spec = ServerSpec(model=model_dir, scheduler=scheduler, max_model_len=max_model_len, block_size=BLOCK_SIZE,
                          num_blocks=num_blocks, served_model_name="compaction", env=env,
                          extra_args=["--scheduling-policy", args.scheduling_policy])
        result[name] = run_side(name, spec, cfg, pool_tokens, progress=not args.no_progress)
    if "stock" in result and "invalid" not in result["stock"]:
        result["ratio"] = {k: ratios(v, result["stock"]) for k, v in result.items()
                           if k != "stock" and "invalid" not in v}
    shape = SIZES[s["model_size"]]
    result["config"] = {
        **s, "growth": args.growth, "pressure": working_set / pool_tokens, "keep_recent_messages": 2,
        "wait_for_summary": bool(args.wait_for_summary), "scheduling_policy": args.scheduling_policy,
        "workload": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()},
        "session_final_history_tokens": finals, "working_set_tokens": working_set, "kv_pool_tokens": pool_tokens,
        "num_blocks": num_blocks, "block_size": BLOCK_SIZE, "max_model_len": max_model_len,
        "model": {"size": s["model_size"], "parameters": shape.num_parameters(), **asdict(shape)},
        "provenance": provenance(),
    }
    if "summarize" in result and "stock" in result:
        k, st = result["summarize"], result["stock"]
        result["gates"] = {
            "summarize_peak_kv_per_session_le_0.35x": k["peak_kv_tokens_per_session"]
            <= 0.35 * st["peak_kv_tokens_per_session"],
            "summarize_prefill_tokens_le_0.5x": k["prefill_tokens_computed"] <= 0.5 * st["prefill_tokens_computed"],
            "zero_errors": all(result[x]["errors"] == 0 for x in sides),
        }
    return result


ROWS = ("peak_kv_tokens_per_session", "peak_kv_tokens_max_session", "peak_kv_tokens_p95_session",
        "peak_pinned_tokens_per_session", "prefill_tokens_computed", "followup_ttft_p95_s", "followup_ttft_n",
        "ttft_p50_s", "completion_tok_s", "throughput_tok_s", "sessions_pool_holds_at_peak", "preemptions", "errors",
        "summary_calls", "summaries", "summary_failures", "windows", "rewritten_requests", "wall_s")


def print_report(result: dict[str, Any]) -> None:
    sides = [s for s in SIDES if s in result]
    others = [s for s in sides if s != "stock"] if "stock" in result else []
    others = [s for s in others if s in result.get("ratio", {})]
    rows = []
    for key in ROWS:
        row: list[Any] = [key] + [result[s].get(key) for s in sides]
        row += [result["ratio"][s].get(key) for s in others]
        rows.append(row)
    print(table(rows, ["metric", *sides, *(f"{s}/stock" for s in others)]))
    n = {s: result[s].get("sessions_measured") for s in sides}
    print(f"p95 of peak KV per session over {n} sessions, follow-up TTFT p95 over followup_ttft_n turns; "
          "throughput_tok_s counts served prompt + completion tokens (compaction serves shorter prompts by design): "
          "completion_tok_s is the rate of answers")
    for s in sides:
        if "invalid" in result[s]:
            print(f"side {s} does not compare (no ratio): {result[s]['invalid']}")
    cfg = result["config"]
    print(f"sessions={cfg['sessions']} trigger={cfg['trigger_tokens']} tok, summary={cfg['summary_tokens']} tok, "
          f"histories up to {max(cfg['session_final_history_tokens'])} tok, pool={cfg['kv_pool_tokens']} tok "
          f"(uncompacted working set {cfg['pressure']:.2f}x the pool)")
    for gate, ok in result.get("gates", {}).items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {gate}")


__all__ = ["register", "run", "run_benchmark", "print_report"]
