"""Stock vLLM, the pin floor and kvsched (or kvsched with a feature off) in ONE lockstep run of `kvsched bench sched`'s
load: every side's step time against stock's, measured the same minutes on the same CPU.

    python tools/sched_sides.py [--sessions N]... [--rounds R] [--steps S] [--cpu-time] [--out X.json] SIDE...

SIDEs (stock is always run, first): `floor` (kvsched/bench/sched_floor.py: the least session-pin retention on vLLM's
pool), `floor-inc` (the floor with incremental pins, as kvsched's), `floor-noyield` (the floor without its shortage
hook), `floor-budget1` (the floor with the whole pool as its budget), `stock-aa` (stock again: the run's A/A),
`kvsched`, and kvsched with one feature removed by an existing knob (`KNOBS` below says which and what it removes).
Each side runs in its own process (its own heap and collector), with the bench's own rounds
(`kvsched.bench.sched._Round`: the same load, the same untimed warm-up of every session at 10,000, the same timed
calls); all sides step in lockstep, one step each in turn, the first side rotating by step. There are as many
processes as sides and the sides rotate over them round by round (`--rounds` a multiple of the sides: each side runs
in each process equally often); an untimed warm-up round runs first in every placement. Every round checks that every
side did stock's work (tokens scheduled, turns finished, prefix hits: `_same_load`), else the exit status is 1.
Used for BENCHMARKS.md's "The floor: what any pin policy costs on the 10,000 tier".

Keep the sides few (3 or 4): the policies' clock is the wall clock, and with N sides a session's next turn comes N
times later in wall time than in one side's steps (~780 steps at 10,000 sessions: ~15 s with 3 sides of ~6.5 ms),
so too many sides would let kvsched's 30 s TTL expire pins that the gate's two-side run keeps.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path
from typing import Any

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
KVSCHED = "kvsched.adapters.vllm.scheduler.KVSchedScheduler"
FLOOR = "kvsched.bench.sched_floor.FloorScheduler"
BUDGET = "KVSCHED_PIN_BUDGET_FRACTION"
# side -> (scheduler class, environment it is built with, what the setting removes from kvsched)
KNOBS: dict[str, tuple[str, dict[str, str], str]] = {
    "stock": (STOCK, {}, "vLLM's AsyncScheduler"),
    "stock-aa": (STOCK, {}, "stock again: the run's A/A"),
    "floor": (FLOOR, {}, "the least pin retention: pin at finish, release at the next start, LRU over the budget"),
    "floor-inc": ("kvsched.bench.sched_floor.FloorIncScheduler", {},
                  "the floor with incremental pins: the unhit tail back at a start, the new blocks held at the finish"),
    "floor-noyield": ("kvsched.bench.sched_floor.FloorNoYieldScheduler", {}, "the floor without its shortage hook"),
    "floor-budget1": (FLOOR, {BUDGET: "1.0"}, "the floor, the whole pool its budget (no LRU release)"),
    "kvsched": (KVSCHED, {}, "kvsched as the gate runs it"),
    "kvsched-payback0": (KVSCHED, {"KVSCHED_PAYBACK_SAMPLING": "0"}, "the payback tracker (fallback to LRU)"),
    "kvsched-infer0": (KVSCHED, {"KVSCHED_INFER_SESSIONS": "0"}, "session inference (named sessions' lineage stays)"),
    "kvsched-budget1": (KVSCHED, {BUDGET: "1.0"}, "the budget pass (the whole pool the budget; decisions differ)"),
    "kvsched-nopins": (KVSCHED, {"KVSCHED_MAX_TTL_S": "0"},
                       "pinning (every TTL 0: no pin is made; sessions, lineage, return and gap models stay)"),
}


def _env(base: dict[str, str], extra: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(base | extra)


def round_stats(scheduler: Any) -> dict[str, float]:
    """What the side's pins did in the round (counters since its start, the warm-up included)."""
    if hasattr(scheduler, "released"):  # the floor
        return dict(scheduler.stats())
    pins = getattr(scheduler, "kvsched", None)
    if pins is None:
        return {}
    c = pins.policy.counters
    return {"pinned_sessions": len(pins.pinned), "pinned_blocks": len(pins.block_refs), "pins": c["pins"],
            "budget_blocks": pins.policy.budget_blocks, "payback_fed": int(pins.policy.payback.armed),
            **{f"released_{r}": c[f"released_{r}"] + c[f"released_{r}_partial"]
               for r in ("turn", "budget", "ttl", "pressure", "payback")}}


def _worker(conn: Any, cpu: int | None, cpu_time: bool = False) -> None:
    """The bench's rounds, one step whenever told to; a round is built with its side's environment."""
    from kvsched.bench import sched
    from kvsched.tiny_model import ensure_tiny_model

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if cpu_time:  # the bench's step() reads `time.perf_counter` through its module's `time`
        import time
        from types import SimpleNamespace

        sched.time = SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    model_dir = ensure_tiny_model("test")
    base, tier_budget = dict(os.environ), sched.TIER_PIN_BUDGET
    rnd: Any = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "round":
            cls, env, seed, sessions = arg
            _env(base, env)
            sched.TIER_PIN_BUDGET = env.get(BUDGET, tier_budget)  # the 10,000 tier sets the budget itself
            try:
                rnd = sched._Round(cls, model_dir, seed, sessions)
            finally:
                sched.TIER_PIN_BUDGET = tier_budget
                _env(base, {})
            conn.send(None)
        elif cmd == "step":
            conn.send(rnd.step())
        elif cmd == "end":
            stats = round_stats(rnd.s)
            work = rnd.close()
            _env(base, {})
            rnd = None
            conn.send(work | {"stats": stats})
        else:
            return


def lockstep(conns: dict[str, Any], steps: int, seed: int, sessions: int) -> tuple[dict[str, list[float]],
                                                                                   dict[str, dict[str, Any]]]:
    """One round of every side on `seed` (side -> its worker in `conns`), one step each in turn, the first side
    rotating by step."""
    for side, c in conns.items():
        cls, env, _ = KNOBS[side]
        c.send(("round", (cls, env, seed, sessions)))
    for c in conns.values():
        c.recv()
    from kvsched.bench.sched import run_steps

    order = list(conns)
    return run_steps(conns, lambda i: order[(i + seed) % len(order):] + order[:(i + seed) % len(order)], steps)


def placements(sides: list[str], procs: list[Any]) -> list[dict[str, Any]]:
    """Placement r puts side j in process (j + r) mod n: over n rounds every side runs in every process once."""
    n = len(sides)
    return [{side: procs[(j + r) % n] for j, side in enumerate(sides)} for r in range(n)]


def run_tier(places: list[dict[str, Any]], rounds: int, steps: int, sessions: int) -> dict[str, Any]:
    from kvsched.bench.sched import WORK, _same_load

    sides = list(places[0])
    per_round: list[dict[str, list[float]]] = []
    same = dict.fromkeys(sides, True)
    stats: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(rounds):
        times, work = lockstep(places[r % len(places)], steps, seed=r, sessions=sessions)
        per_round.append(times)
        stock = statistics.fmean(times["stock"])
        line = []
        for side in sides:
            stats[side].append({k: work[side][k] for k in (*WORK, "turn_releases")} | work[side]["stats"])
            same[side] = same[side] and _same_load(work["stock"], work[side], tier=False)
            if side != "stock":
                line.append(f"{side} {statistics.fmean(times[side]) / stock:.3f}")
        print(f"{sessions} sessions, round {r + 1}/{rounds} (stock {stock * 1e6:.0f} us a step): x stock "
              + ", ".join(line) + f"; same work: {all(same.values())}", flush=True)
    out: dict[str, Any] = {}
    for side in sides:
        ts = [t for rnd in per_round for t in rnd[side]]
        ratios = [statistics.fmean(rnd[side]) / statistics.fmean(rnd["stock"]) for rnd in per_round]
        out[side] = {"step_us": statistics.fmean(ts) * 1e6, "step_us_median": statistics.median(ts) * 1e6,
                     "steps": len(ts), "round_step_us": [statistics.fmean(rnd[side]) * 1e6 for rnd in per_round],
                     "round_ratios": ratios, "round_ratio_median": statistics.median(ratios),
                     "round_ratio_range": [min(ratios), max(ratios)], "same_load": same[side],
                     "rounds": stats[side], "removes": KNOBS[side][2], "env": KNOBS[side][1]}
    for side in sides:
        out[side]["ratio"] = out[side]["step_us"] / out["stock"]["step_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("sides", nargs="+", choices=[k for k in KNOBS if k != "stock"])
    p.add_argument("--sessions", type=int, action="append", default=None, help="repeatable (default 256 and 10000)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per tier (default: 2 x the sides)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cpu", type=int, default=None, help="CPU every worker is pinned to (default: the highest)")
    p.add_argument("--cpu-time", action="store_true", help="time the bench's calls in thread CPU time (as sched_ab)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from kvsched.bench.common import provenance, table, write_json
    from kvsched.bench.plots import grouped_bars, save_beside

    sides = ["stock", *dict.fromkeys(s for s in args.sides)]
    tiers = args.sessions or [256, 10_000]
    rounds = args.rounds or 2 * len(sides)
    prov = provenance(["tools/sched_sides.py", *(argv if argv is not None else sys.argv[1:])])
    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    procs: list[Any] = []
    for _ in sides:
        parent, child = ctx.Pipe()
        ctx.Process(target=_worker, args=(child, cpu, args.cpu_time), daemon=True).start()
        child.close()
        procs.append(parent)
    places = placements(sides, procs)
    results: dict[str, Any] = {}
    try:
        for place in places:  # untimed: every side has run in every process before any timed step
            lockstep(place, 50, seed=99, sessions=256)
        for n in tiers:
            results[str(n)] = run_tier(places, rounds, args.steps, n)
    finally:
        for c in procs:
            c.send(("quit", None))
    ok = all(s["same_load"] for r in results.values() for s in r.values())
    for n, r in results.items():
        print(f"{n} sessions ({rounds} rounds of {args.steps} steps):")
        print(table([[side, s["step_us"], s["step_us_median"], f"{s['ratio']:.3f}",
                      "{:.3f} ({:.3f}-{:.3f})".format(s["round_ratio_median"], *s["round_ratio_range"]),
                      s["same_load"]] for side, s in r.items()],
                    ["side", "mean step us", "median step us", "x stock (mean)", "per-round median (range)",
                     "stock's work"]))
    write_json(args.out, {"tiers": results, "same_load": ok,
                          "config": {"sides": sides, "sessions": tiers, "rounds": rounds, "steps_per_round": args.steps,
                                     "cpu": cpu, "cpu_time": args.cpu_time, "provenance": prov,
                                     "order": f"{len(sides)} processes, sides rotating over them by round after an "
                                              "untimed warm-up round in every placement; steps in lockstep, the "
                                              "first side rotating by step"}})
    save_beside(args.out, lambda path: grouped_bars(
        {f"{n} sessions": {side: s["ratio"] for side, s in r.items() if side != "stock"} for n, r in results.items()},
        path, "mean scheduler step time over stock's, one lockstep run", "x stock"))
    if not ok:
        print("sched_sides: a side did other work than stock in some round: its step times do not compare",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
