"""`kvsched bench sched`: per-step cost of vLLM's scheduler vs kvsched's, same synthetic load, no model execution.

256 sessions run concurrently on the tiny model's config (vLLM's real scheduler, KV cache manager and block pool;
see adapters/vllm/harness.py). When a turn finishes, the session's next turn arrives with its history plus a tool
result, so pins, hits, finishes and new turns all happen at steady state. We time `schedule()` +
`update_from_output()` per step, and the scheduler's `add_request()` of the turns that step's finishes bring (kvsched's
hook finds the request's session there: found by review, it was untimed); building the requests and the fake model
runner are outside the timed region. `--tier` runs the kvsched side with its FP8 tier at the default size, as `vllm
serve --scheduler kvsched` does (its scheduler side: the copies into the tier are the workers' work, not run here).
`--with-output`: the next turn's prompt also carries the finished turn's own output tokens (as its `Request` recorded
them) before the tool result, as a chat or agent client sends the assistant's answer back; by default it does not
(the gate's workload), so a turn never hits the output blocks of the pin its last turn left.

Fairness (BENCH_PROTOCOL): each side runs in its own process (its own heap and garbage collector, so each pays for
the collections its own allocations cause), and the two step in lockstep: stock's step i, then kvsched's step i (the
order alternates by step), one process running at a time, so whatever else a shared machine is doing hits both alike.
The two processes swap sides every pair, which cancels anything particular to one process.

The 10,000-session tier (`--sessions 10000`; `--quick` runs both) keeps 256 requests in flight over 10,000 sessions
taken in turn, so ~9,700 sit idle with their prefixes pinned. Its pool holds every session's prefix on both sides (so
both compute the same tokens: the loads must match), and the pin budget (KVSCHED_PIN_BUDGET_FRACTION=0.2 on the kvsched
side) is exceeded from the start: every finished turn makes a release decision among thousands of pinned sessions. An
untimed warm-up gives every session its first turn before the timed steps.
A pair of rounds runs one seed on both sides, and every pair checks that both did the same work (tokens scheduled,
turns finished, prefix-cache hits); an untimed warm-up pair comes first. The headline is the ratio of mean step times
over all steps; the median and range of the per-pair ratios are reported beside it. As in vLLM's engine core
(`EngineCore.__init__` calls `freeze_gc_heap()`), the start-up heap -- above all the block pool's KVCacheBlock
objects -- is frozen out of the garbage collector before the timed steps, on both sides; the collector stays on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvsched.bench.args import check_args, check_out_path, count, refuse
from kvsched.bench.common import provenance, table, write_json
from kvsched.bench.plots import grouped_bars, save_beside

CONCURRENCY = 256
TIER_SESSIONS = 10_000
TIER_BLOCKS = 240_000  # every prefix of the 10,000 sessions stays cached on both sides
TIER_PIN_BUDGET = "0.2"  # of TIER_BLOCKS: ~48,000 blocks, fewer than the sessions' pins after their first turn
SIDES = ("stock", "kvsched")
WORK = ("scheduled_tokens", "finished_turns", "cached_prompt_tokens")  # what both sides of a pair must do alike


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("sched", help="scheduler step overhead: stock vs kvsched")
    p.add_argument("--quick", action="store_true", help="4 pairs of 300-step rounds (default: 6 pairs of 2,000)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--sessions", type=int, action="append", default=None,
                   help=f"sessions taken in turn, {CONCURRENCY} in flight (repeatable; default {CONCURRENCY}, "
                        f"--quick: {CONCURRENCY} and {TIER_SESSIONS})")
    p.add_argument("--rounds", type=int, default=None, help="pairs of rounds (stock and kvsched, order alternating)")
    p.add_argument("--cpu", type=int, default=None,
                   help="CPU both worker processes are pinned to (they never run at once; default: the highest CPU "
                        "this process may use; -1: no pinning)")
    p.add_argument("--unnamed", action="store_true",
                   help="requests carry no session field: kvsched finds each turn's session by session inference "
                        "(block-hash lookups per request) instead of by its id")
    p.add_argument("--tier", action="store_true",
                   help="the kvsched side with its FP8 tier at the default size (as `vllm serve --scheduler kvsched`)")
    p.add_argument("--with-output", action="store_true",
                   help="each turn's prompt carries the previous turn's output tokens before the tool result, as a "
                        "real client sends the answer back (default: history + tool result only, the gate's workload)")
    p.add_argument("--aa", action="store_true",
                   help="A/A check of the harness: stock vLLM on both sides (the ratio should be 1)")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)


class _Round:
    """One round of the synthetic load on one scheduler: `step()` runs one engine step and returns the seconds spent
    in `schedule()` + `update_from_output()`; `work` counts tokens scheduled, turns finished and prompt tokens hit."""

    def __init__(self, scheduler_cls: str, model_dir: Path, seed: int, sessions: int = CONCURRENCY,
                 named: bool = True, tier: bool = False, with_output: bool = False) -> None:
        from vllm.utils.gc_utils import freeze_gc_heap

        from kvsched.adapters.vllm.harness import STOCK_SCHEDULER, HarnessConfig, RequestFactory, build_scheduler

        many = sessions > CONCURRENCY
        self._budget_env = os.environ.get("KVSCHED_PIN_BUDGET_FRACTION")
        if many:
            os.environ["KVSCHED_PIN_BUDGET_FRACTION"] = TIER_PIN_BUDGET  # read when the scheduler is built
        fp8_tier = None
        if tier and scheduler_cls != STOCK_SCHEDULER:
            from kvsched.adapters.vllm.tier_config import kv_transfer_config

            fp8_tier = kv_transfer_config("auto")
        cfg = HarnessConfig(model_dir=model_dir, num_blocks=TIER_BLOCKS if many else 120_000, block_size=16,
                            max_num_seqs=CONCURRENCY, max_num_batched_tokens=16_384, max_model_len=8192,
                            kv_transfer_config=fp8_tier)
        self.s = build_scheduler(scheduler_cls, cfg)
        freeze_gc_heap()  # as EngineCore does after start-up; undone by close()
        self.f = RequestFactory(cfg.block_size)
        self.rng = random.Random(seed)
        self.named = named
        self.with_output = with_output
        # with_output: request id -> its Request, to read its output tokens at its finish
        self.live: dict[str, Any] = {}
        self.history: dict[str, list[int]] = {}
        self.owner: dict[str, str] = {}
        self.work = dict.fromkeys(WORK, 0)
        self.added_s = 0.0  # time in the scheduler's add_request since the last step began
        self.idle = deque(f"s{i}" for i in range(CONCURRENCY, sessions))  # next turn: the longest-idle session
        for i in range(min(CONCURRENCY, sessions)):
            self._new_turn(f"s{i}")
        if many:  # untimed: every session finishes its first turn (and holds a pin) before the timed steps
            while self.work["finished_turns"] < sessions:
                self.step()
            self.work = dict.fromkeys(self.work, 0)
        self._released_before = self._turn_releases()

    def _new_turn(self, sid: str) -> None:
        rng = self.rng
        h = self.history.setdefault(sid, [1, 2, 3] * 60)  # shared system prompt
        h.extend(rng.randrange(10, 2000) for _ in range(rng.randint(40, 120)))  # tool result
        if len(h) > 6000:
            h[:] = h[:180]  # the session starts over, as if compacted
        req = self.f.make(h, rng.randint(8, 32), session_id=sid if self.named else None,
                          xargs={"agent_role": rng.choice(["worker", "orch"])})
        self.owner[req.request_id] = sid
        if self.with_output:
            self.live[req.request_id] = req
        t = time.perf_counter()
        self.s.add_request(req)
        self.added_s += time.perf_counter() - t

    def step(self) -> float:
        from vllm.v1.outputs import ModelRunnerOutput

        from kvsched.adapters.vllm.harness import FAKE_TOKEN

        s = self.s
        self.added_s = 0.0
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        req_ids = list(out.num_scheduled_tokens)
        sampled = [[] if s.requests[rid].is_prefill_chunk else [FAKE_TOKEN] for rid in req_ids]
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        t2 = time.perf_counter()
        engine_out = s.update_from_output(out, mro)
        t3 = time.perf_counter()
        self.work["scheduled_tokens"] += out.total_num_scheduled_tokens
        self.work["cached_prompt_tokens"] += sum(int(n.num_computed_tokens) for n in out.scheduled_new_reqs)
        for outputs in engine_out.values():
            for o in outputs.outputs:
                if o.finish_reason is not None and o.request_id in self.owner:
                    self.work["finished_turns"] += 1
                    sid = self.owner.pop(o.request_id)
                    if self.with_output:  # the answer goes back into its session's history, before the tool result
                        self.history[sid].extend(self.live.pop(o.request_id).output_token_ids)
                    if self.idle:
                        self.idle.append(sid)
                        sid = self.idle.popleft()
                    self._new_turn(sid)
        return (t1 - t0) + (t3 - t2) + self.added_s

    def _turn_releases(self) -> int:
        """kvsched's pins released, whole or their tail, when the session's next turn started without hitting them
        (0 on stock): what a prompt that leaves out the last turn's output costs kvsched at each turn. The pin
        floors' (kvsched/bench/sched_floor.py) are their pins given back at a turn (found by review: 0 was written
        for them, in tools/sched_sides.py's rounds too, beside their `released_turn` of thousands)."""
        released = getattr(self.s, "released", None)
        if isinstance(released, dict):
            return int(released["turn"])
        policy = getattr(getattr(self.s, "kvsched", None), "policy", None)
        if policy is None:
            return 0
        return int(policy.counters["released_turn"] + policy.counters["released_turn_partial"])

    def close(self) -> dict[str, int]:
        policy = getattr(getattr(self.s, "kvsched", None), "policy", None)
        pinned = policy.pinned_sessions if policy is not None else 0
        released = self._turn_releases() - self._released_before
        del self.s
        gc.unfreeze()
        if self._budget_env is None:
            os.environ.pop("KVSCHED_PIN_BUDGET_FRACTION", None)
        else:
            os.environ["KVSCHED_PIN_BUDGET_FRACTION"] = self._budget_env
        return self.work | {"pinned_sessions_at_end": pinned, "turn_releases": released}


def _worker(conn: Any, model_dir: Path, cpu: int | None = None) -> None:
    """A process that runs rounds (its own heap and garbage collector), one step whenever it is told to."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    rnd: _Round | None = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "round":
            rnd = _Round(arg[0], model_dir, *arg[1:])  # (cls, seed, sessions, named, tier[, with_output])
            conn.send(None)
        elif cmd == "step":
            assert rnd is not None
            conn.send(rnd.step())
        elif cmd == "end":
            assert rnd is not None
            conn.send(rnd.close())
            rnd = None
        else:
            return


def _lockstep(conns: dict[str, Any], classes: dict[str, str], steps: int, seed: int, sessions: int = CONCURRENCY,
              named: bool = True, tier: bool = False,
              with_output: bool = False) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """One pair of rounds on `seed`, side -> worker as `conns` says: the two sides take turns step by step (which
    goes first alternates), so that whatever else the machine is doing hits both alike; one side runs at a time."""
    for side, c in conns.items():
        c.send(("round", (classes[side], seed, sessions, named, tier) + ((True,) if with_output else ())))
    for c in conns.values():
        c.recv()
    return run_steps(conns, lambda i: SIDES if (i + seed) % 2 == 0 else SIDES[::-1], steps)


def run_steps(conns: dict[str, Any], order_of: Callable[[int], Sequence[str]],
              steps: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """`steps` steps of the started rounds, side by side in `order_of(step)`, one side at a time; then each round's
    end: (side -> its step times, side -> what its round's `close` returned). Also tools/sched_sides.py's."""
    times: dict[str, list[float]] = {side: [] for side in conns}
    for i in range(steps):
        for side in order_of(i):
            conns[side].send(("step", None))
            times[side].append(conns[side].recv())
    work = {}
    for side, c in conns.items():
        c.send(("end", None))
        work[side] = c.recv()
    return times, work


def warm_up(placements: list[dict[str, Any]], classes: dict[str, str], named: bool = True, tier: bool = False,
            with_output: bool = False) -> None:
    """Untimed: a short pair on every placement, so each side has run in every process (imports, first calls,
    caches) before any timed step."""
    for conns in placements:
        _lockstep(conns, classes, 50, seed=99, named=named, tier=tier, with_output=with_output)


def _same_load(stock: dict[str, int], kvsched: dict[str, int], tier: bool) -> bool:
    """Both sides did the same work. With the FP8 tier the kvsched side computes a little less: the tier restores the
    partial last blocks stock recomputes (~0.2% of the tokens here), so its tokens scheduled plus hit must match."""
    if not tier:
        return all(stock[k] == kvsched[k] for k in WORK)
    total = [w["scheduled_tokens"] + w["cached_prompt_tokens"] for w in (stock, kvsched)]
    return stock["finished_turns"] == kvsched["finished_turns"] and total[0] == total[1]


def summarize(pairs: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per side: mean and median step time (us) over every step of every round; the ratio of the means (the gate's
    figure), and the kvsched/stock ratio of each pair's mean step times with their median and range."""
    out: dict[str, Any] = {}
    for side in SIDES:
        ts = [t for pair in pairs for t in pair[side]]
        out[side] = {"step_us": statistics.fmean(ts) * 1e6, "step_us_median": statistics.median(ts) * 1e6,
                     "steps": len(ts), "round_step_us": [statistics.fmean(p[side]) * 1e6 for p in pairs]}
    out["ratio"] = out["kvsched"]["step_us"] / out["stock"]["step_us"]
    pair_ratios = [statistics.fmean(p["kvsched"]) / statistics.fmean(p["stock"]) for p in pairs]
    out["pair_ratios"] = pair_ratios
    out["pair_ratio_median"] = statistics.median(pair_ratios)
    out["pair_ratio_range"] = [min(pair_ratios), max(pair_ratios)]
    return out


def check(args: argparse.Namespace) -> None:
    """The options, before the worker processes start (found by review: --steps 0 ran the default 2,000 steps,
    --steps -1 and --rounds 0 or -1 started both processes); --cpu names one this process may use, or -1."""
    check_args(args, steps=count(1, 10**7), rounds=count(1, 10**4), sessions=count(1, 10**6))
    if args.sessions and len(set(args.sessions)) < len(args.sessions):  # the JSON keys its tiers by sessions
        raise ValueError(f"--sessions names a value twice: {', '.join(map(str, args.sessions))}")
    allowed = sorted(os.sched_getaffinity(0))
    if args.cpu is not None and args.cpu != -1 and args.cpu not in allowed:
        raise ValueError(f"--cpu must be -1 (no pinning) or a CPU this process may use ({', '.join(map(str, allowed))})"
                         f", got {str(args.cpu)[:40]}")
    check_out_path("--out", args.out)


def run(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    try:
        check(args)
    except ValueError as exc:
        return refuse("kvsched bench sched", exc)

    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER, STOCK_SCHEDULER
    from kvsched.tiny_model import ensure_tiny_model

    steps = args.steps if args.steps is not None else (300 if args.quick else 2000)
    rounds = args.rounds if args.rounds is not None else (4 if args.quick else 6)
    model_dir = ensure_tiny_model("test")
    classes = {"stock": STOCK_SCHEDULER, "kvsched": STOCK_SCHEDULER if args.aa else KVSCHED_SCHEDULER}
    # Both processes on one CPU: they take turns anyway, and neither can be the one that wakes up next to other work.
    # (Measured A/A with pinning: 0.997-1.003 per pair; unpinned: 0.87-1.05 on a shared 2-core machine.)
    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else (None if args.cpu == -1 else args.cpu)
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    workers: list[Any] = []
    procs = []
    for _ in SIDES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, model_dir, cpu), daemon=True)
        proc.start()
        child.close()  # the worker's end lives in the worker: if it dies, recv() here raises instead of hanging
        workers.append(parent)
        procs.append(proc)
    # The two processes swap sides every pair, so that anything particular to one process (where its memory lies,
    # which core it wakes on next to other work) falls on both sides equally.
    placements = [dict(zip(SIDES, workers, strict=True)), dict(zip(SIDES, workers[::-1], strict=True))]
    tiers = args.sessions or ([CONCURRENCY, TIER_SESSIONS] if args.quick else [CONCURRENCY])
    results: dict[str, Any] = {}
    try:
        warm_up(placements, classes, named=not args.unnamed, tier=args.tier, with_output=args.with_output)
        for sessions in tiers:
            pairs: list[dict[str, list[float]]] = []
            same_load, pinned, released = True, 0, 0
            for r in range(rounds):
                times, work = _lockstep(placements[r % 2], classes, steps, seed=r, sessions=sessions,
                                          named=not args.unnamed, tier=args.tier, with_output=args.with_output)
                pinned = work["kvsched"].pop("pinned_sessions_at_end")
                work["stock"].pop("pinned_sessions_at_end")
                turn_releases = work["kvsched"].pop("turn_releases", 0)
                released += turn_releases
                work["stock"].pop("turn_releases", 0)
                same_load = same_load and _same_load(work["stock"], work["kvsched"], args.tier)
                pairs.append(times)
                print(f"{sessions} sessions, pair {r + 1}/{rounds}: kvsched/stock "
                      f"{statistics.fmean(times['kvsched']) / statistics.fmean(times['stock']):.3f} "
                      f"({work['kvsched']['finished_turns']} turns per side, {pinned} sessions pinned at the end, "
                      f"kvsched released {turn_releases} pins a turn did not hit)",
                      flush=True)
            results[str(sessions)] = summarize(pairs) | {"same_load": same_load, "pinned_sessions_at_end": pinned,
                                                         "kvsched_turn_releases_per_step": released / (rounds * steps)}
    finally:
        for c in workers:
            with contextlib.suppress(OSError):  # a worker that died already
                c.send(("quit", None))
        for proc in procs:
            proc.join(timeout=30)
    result = dict(results[str(tiers[0])])  # the first tier's figures at the top, as before tiers existed
    result["tiers"] = results
    same_load = all(r["same_load"] for r in results.values())
    result["config"] = {"concurrency": CONCURRENCY, "sessions": tiers, "steps_per_round": steps, "rounds": rounds,
                        "cpu": cpu, "aa_check": args.aa, "kvsched_side": classes["kvsched"], "unnamed": args.unnamed,
                        "fp8_tier": args.tier, "with_output": args.with_output,
                        "workload": "next prompt: history + the turn's output tokens + tool result" if args.with_output
                        else "next prompt: history + tool result (the turn's output not sent back; the gate's)",
                        "timed": "schedule + update_from_output + add_request of new turns",
                        "tier_blocks": TIER_BLOCKS, "tier_pin_budget_fraction": float(TIER_PIN_BUDGET),
                        "order": "two processes, sides swapped every pair; a pair's rounds run in lockstep, one step "
                                 "each in turn, which side goes first alternating by step",
                        "provenance": provenance()}
    for n, r in results.items():
        print(f"{n} sessions:")
        print(table([[side, r[side]["step_us"], r[side]["step_us_median"], r[side]["steps"]] for side in SIDES],
                    ["scheduler", "mean step us", "median step us", "steps"]))
        lo, hi = r["pair_ratio_range"]
        print(f"kvsched/stock mean step time: {r['ratio']:.3f} (gate: <= 1.10); per-pair median "
              f"{r['pair_ratio_median']:.3f}, range {lo:.3f}-{hi:.3f}; same load per pair: {r['same_load']}")
    write_json(args.out, result)
    save_beside(args.out, lambda path: grouped_bars(
        {f"{n} sessions": {f"pair {i}": x for i, x in enumerate(r["pair_ratios"])} for n, r in results.items()},
        path, "kvsched bench sched: mean scheduler step time, kvsched over stock, per lockstep pair", "x stock"))
    return 0 if same_load else 1
