"""Lockstep A/B of two kvsched source trees on `kvsched bench sched`'s 10,000-session load (both sides kvsched).

    python tools/sched_ab.py TREE_A TREE_B [PAIRS] [STEPS]

Each tree is a directory holding a `kvsched` package (e.g. `git archive HEAD kvsched | tar -x -C /tmp/a`, plus the
built `_C*.so` copied in). Two worker processes, one per tree, pinned to the same CPU, take turns step by step (which
goes first alternates) as the bench's own pairs do, so what else the machine does hits both alike; prints each pair's
mean step time and B/A. A/A on one tree measured 0.972-1.012 per pair on a shared 2-core VM: read a difference below
~2% as noise. Used for BENCHMARKS.md's "The 10,000 tier: where its cost is, and two attempts".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
from typing import Any


def _worker(conn: Any, tree: str, cpu: int) -> None:
    """The bench's own worker, importing kvsched from `tree`."""
    sys.path.insert(0, tree)
    import kvsched

    if not kvsched.__file__.startswith(tree):
        raise SystemExit(f"{tree}: imported kvsched from {kvsched.__file__}")
    from kvsched.bench.sched import _worker as bench_worker
    from kvsched.tiny_model import ensure_tiny_model

    bench_worker(conn, ensure_tiny_model("test"), cpu)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import SIDES, _lockstep

    trees = dict(zip(SIDES, (os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])), strict=True))  # A, B
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    cpu = max(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    conns = {}
    for side, tree in trees.items():
        parent, child = ctx.Pipe()
        ctx.Process(target=_worker, args=(child, tree, cpu), daemon=True).start()
        child.close()
        conns[side] = parent
    a_side, b_side = SIDES
    ratios = []
    for seed in range(pairs):
        times, work = _lockstep(conns, dict.fromkeys(SIDES, KVSCHED_SCHEDULER), steps, seed, 10_000)
        a, b = statistics.fmean(times[a_side]), statistics.fmean(times[b_side])
        ratios.append(b / a)
        print(f"pair {seed}: A {a * 1e6:.0f} us, B {b * 1e6:.0f} us a step; B/A {b / a:.4f}; same work: "
              f"{work[a_side] == work[b_side]}", flush=True)
    print(f"B/A mean {statistics.fmean(ratios):.4f}, range {min(ratios):.4f}-{max(ratios):.4f}")
    for c in conns.values():
        c.send(("quit", None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
