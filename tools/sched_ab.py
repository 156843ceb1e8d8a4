"""Lockstep A/B of two kvsched source trees on `kvsched bench sched`'s load (both sides kvsched).

    python tools/sched_ab.py [--tier] [--sessions N] [--cpu-time] TREE_A TREE_B [PAIRS] [STEPS]

Each tree is a directory holding a `kvsched` package (e.g. `git archive HEAD kvsched | tar -x -C /tmp/a`, plus the
built `_C*.so` copied in). Two worker processes, one per tree, pinned to the same CPU, take turns step by step (which
goes first alternates) as the bench's own pairs do, so what else the machine does hits both alike; prints each pair's
mean step time and B/A. A/A on one tree measured 0.972-1.012 per pair on a shared 2-core VM: read a difference below
~2% as noise. Used for BENCHMARKS.md's "The 10,000 tier: where its cost is, and two attempts".

`--tier`: both sides with the FP8 tier at its default size (as `bench sched --tier`). `--sessions N`: N sessions (default
10,000; 256 is the bench's first tier). `--cpu-time`: the bench's timed calls are timed in the worker thread's CPU time
(`time.thread_time`) instead of wall time, so that time the machine's other jobs take the CPU away drops out (a step
the scheduler is descheduled in costs it nothing); what the garbage collector does in those calls still counts. A/A
with it (256 sessions, tier on, 4 pairs of 300 steps): 0.998-1.006 per pair.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
from typing import Any


def _worker(conn: Any, tree: str, cpu: int, cpu_time: bool = False) -> None:
    """The bench's own worker, importing kvsched from `tree`."""
    sys.path.insert(0, tree)
    import kvsched

    if not kvsched.__file__.startswith(tree):
        raise SystemExit(f"{tree}: imported kvsched from {kvsched.__file__}")
    from kvsched.bench import sched
    from kvsched.tiny_model import ensure_tiny_model

    if cpu_time:  # the bench's step() reads `time.perf_counter` through its module's `time`
        import time
        from types import SimpleNamespace

        sched.time = SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    sched._worker(conn, ensure_tiny_model("test"), cpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a")
    p.add_argument("tree_b")
    p.add_argument("pairs", type=int, nargs="?", default=4)
    p.add_argument("steps", type=int, nargs="?", default=300)
    p.add_argument("--tier", action="store_true")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--cpu-time", action="store_true")
    args = p.parse_args()
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import SIDES, _lockstep

    trees = dict(zip(SIDES, (os.path.abspath(args.tree_a), os.path.abspath(args.tree_b)), strict=True))  # A, B
    cpu = max(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    conns = {}
    for side, tree in trees.items():
        parent, child = ctx.Pipe()
        ctx.Process(target=_worker, args=(child, tree, cpu, args.cpu_time), daemon=True).start()
        child.close()
        conns[side] = parent
    a_side, b_side = SIDES
    ratios = []
    for seed in range(args.pairs):
        times, work = _lockstep(conns, dict.fromkeys(SIDES, KVSCHED_SCHEDULER), args.steps, seed, args.sessions,
                                tier=args.tier)
        a, b = statistics.fmean(times[a_side]), statistics.fmean(times[b_side])
        ratios.append(b / a)
        pinned = [work[side].pop("pinned_sessions_at_end", None) for side in (a_side, b_side)]
        print(f"pair {seed}: A {a * 1e6:.0f} us, B {b * 1e6:.0f} us a step; B/A {b / a:.4f}; same work: "
              f"{work[a_side] == work[b_side]} (sessions pinned at the end: {pinned[0]} / {pinned[1]}: a change of "
              f"release order may differ there)", flush=True)
    print(f"B/A mean {statistics.fmean(ratios):.4f}, range {min(ratios):.4f}-{max(ratios):.4f} ({args.sessions} "
          f"sessions, tier {'on' if args.tier else 'off'}, {'CPU' if args.cpu_time else 'wall'} time)")
    for c in conns.values():
        c.send(("quit", None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
