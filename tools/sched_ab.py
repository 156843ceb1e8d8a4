"""Lockstep A/B of two kvsched source trees on `kvsched bench sched`'s load (both sides kvsched).

    python tools/sched_ab.py [--tier] [--sessions N] [--cpu-time] [--out X.json] TREE_A TREE_B [PAIRS] [STEPS]

Each tree is a directory holding a `kvsched` package (e.g. `git archive HEAD kvsched | tar -x -C /tmp/a`, plus the
built `_C*.so` copied in). Worker processes import kvsched from their tree and take turns step by step (which goes
first alternates), pinned to the same CPU, with the bench's own code (kvsched.bench.sched: the same rounds, lockstep,
warm-up and summary), so what else the machine does hits both alike; prints each pair's mean step time and B/A.
A/A on one tree measured 0.972-1.012 per pair on a shared 2-core VM: read a difference below ~2% as noise. Used for
BENCHMARKS.md's "The 10,000 tier: where its cost is, and two attempts".

As the bench does (found by review: this tool did not): an untimed warm-up pair comes first on every process; a
process imports one tree for good, so each tree has two processes, spawned A, B, B, A, and the pairs alternate
between the two placements (what is particular to one process falls on both sides alike); both sides must do the
same work in every pair (tokens scheduled, turns finished, prefix hits), else the exit status is 1; `--out` writes
the figures as JSON with provenance (the command, this checkout's commit, and each tree's path and digest).

`--tier`: both sides with the FP8 tier at its default size (as `bench sched --tier`), or `--tier-gib G` GiB (one
that fills). `--sessions N`: N sessions (default
10,000; 256 is the bench's first tier). `--cpu-time`: the bench's timed calls are timed in the worker thread's CPU time
(`time.thread_time`) instead of wall time, so that time the machine's other jobs take the CPU away drops out (a step
the scheduler is descheduled in costs it nothing); what the garbage collector does in those calls still counts. A/A
with it (256 sessions, tier on, 4 pairs of 300 steps): 0.998-1.006 per pair.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path
from typing import Any


def _worker(conn: Any, tree: str, cpu: int, cpu_time: bool = False, tier_gib: str | None = None) -> None:
    """The bench's own worker, importing kvsched from `tree`."""
    sys.path.insert(0, tree)
    import kvsched

    if not kvsched.__file__.startswith(tree):
        raise SystemExit(f"{tree}: imported kvsched from {kvsched.__file__}")
    if tier_gib is not None:  # the bench asks for the tier's "auto" size: this one instead
        from kvsched.adapters.vllm import tier_config

        config = tier_config.kv_transfer_config
        tier_config.kv_transfer_config = lambda *a, **k: config(tier_gib)  # type: ignore[assignment]
    from kvsched.bench import sched
    from kvsched.tiny_model import ensure_tiny_model

    if cpu_time:  # the bench's step() reads `time.perf_counter` through its module's `time`
        import time
        from types import SimpleNamespace

        sched.time = SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    sched._worker(conn, ensure_tiny_model("test"), cpu)


def tree_digest(tree: str) -> str:
    """sha256 (12 hex digits) over the tree's kvsched/**/*.py paths and contents: which code a side ran."""
    h = hashlib.sha256()
    for path in sorted(Path(tree, "kvsched").rglob("*.py")):
        h.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def run_ab(conns: dict[tuple[str, int], Any], pairs: int, steps: int, sessions: int, tier: bool) -> dict[str, Any]:
    """`conns`: (tree "A"/"B", process 0/1) -> its worker's pipe. The bench's sides stand for the trees: "stock" for
    A, "kvsched" for B (both run kvsched's scheduler)."""
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import SIDES, _lockstep, _same_load, summarize, warm_up

    a_side, b_side = SIDES
    classes = dict.fromkeys(SIDES, KVSCHED_SCHEDULER)
    placements = [{a_side: conns["A", p], b_side: conns["B", p]} for p in (0, 1)]
    warm_up(placements, classes, tier=tier)
    timed, same_work, rows = [], True, []
    for seed in range(pairs):
        times, work = _lockstep(placements[seed % 2], classes, steps, seed, sessions, tier=tier)
        pinned = [work[side].pop("pinned_sessions_at_end", None) for side in (a_side, b_side)]
        same = _same_load(work[a_side], work[b_side], tier=False)  # both sides are kvsched: exactly the same work
        same_work = same_work and same
        timed.append(times)
        a, b = statistics.fmean(times[a_side]), statistics.fmean(times[b_side])
        rows.append({"pair": seed, "processes": seed % 2, "a_step_us": a * 1e6, "b_step_us": b * 1e6,
                     "b_over_a": b / a, "same_work": same, "work": {"A": work[a_side], "B": work[b_side]},
                     "pinned_sessions_at_end": {"A": pinned[0], "B": pinned[1]}})
        print(f"pair {seed} (processes {seed % 2}): A {a * 1e6:.0f} us, B {b * 1e6:.0f} us a step; B/A {b / a:.4f}; "
              f"same work: {same} (sessions pinned at the end: {pinned[0]} / {pinned[1]})", flush=True)
    s = summarize(timed)
    return {"A": s[a_side], "B": s[b_side], "b_over_a": s["ratio"], "pair_ratios": s["pair_ratios"],
            "pair_ratio_median": s["pair_ratio_median"], "pair_ratio_range": s["pair_ratio_range"],
            "same_work": same_work, "pairs": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("tree_a")
    p.add_argument("tree_b")
    p.add_argument("pairs", type=int, nargs="?", default=4)
    p.add_argument("steps", type=int, nargs="?", default=300)
    p.add_argument("--tier", action="store_true")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--cpu-time", action="store_true")
    p.add_argument("--tier-gib", default=None, help="with --tier: a tier of this many GiB instead of the default size "
                   "(e.g. 0.25 at 10,000 sessions: a tier that fills and evicts)")
    p.add_argument("--out", type=Path, default=None, help="write the figures here (JSON, with provenance)")
    args = p.parse_args(argv)
    from kvsched.bench.common import provenance, write_json

    trees = {"A": os.path.abspath(args.tree_a), "B": os.path.abspath(args.tree_b)}
    prov = provenance(["tools/sched_ab.py", *(argv if argv is not None else sys.argv[1:])])
    cpu = max(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    conns: dict[tuple[str, int], Any] = {}
    for key in (("A", 0), ("B", 0), ("B", 1), ("A", 1)):  # which tree's process starts first alternates
        parent, child = ctx.Pipe()
        ctx.Process(target=_worker, args=(child, trees[key[0]], cpu, args.cpu_time, args.tier_gib), daemon=True).start()
        child.close()
        conns[key] = parent
    try:
        result = run_ab(conns, args.pairs, args.steps, args.sessions, args.tier)
    finally:
        for c in conns.values():
            c.send(("quit", None))
    print(f"B/A mean {result['b_over_a']:.4f} (per pair {min(result['pair_ratios']):.4f}-"
          f"{max(result['pair_ratios']):.4f}; {args.sessions} sessions, tier {'on' if args.tier else 'off'}, "
          f"{'CPU' if args.cpu_time else 'wall'} time); same work in every pair: {result['same_work']}")
    result["config"] = {"trees": {k: {"path": t, "digest": tree_digest(t)} for k, t in trees.items()},
                        "pairs": args.pairs, "steps": args.steps, "sessions": args.sessions, "tier": args.tier,
                        "cpu_time": args.cpu_time, "tier_gib": args.tier_gib, "cpu": cpu, "provenance": prov,
                        "order": "4 processes (2 per tree, spawned A, B, B, A); pairs alternate between the two "
                                 "placements after an untimed warm-up pair on each; steps in lockstep, which side goes "
                                 "first alternating by step"}
    write_json(args.out, result)
    if not result["same_work"]:
        print("sched_ab: the two trees did different work in some pair: their step times do not compare",
              file=sys.stderr)
    return 0 if result["same_work"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
