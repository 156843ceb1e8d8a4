"""The garbage collector on `kvsched bench sched`'s load: its runs and their time, stock vs kvsched, and which of
kvsched's hooks leave the objects that set it off.

    python tools/sched_gc.py [SESSIONS] [STEPS]      (default 256 sessions, 300 steps; both sides, one process each)

CPython collects generation 0 when the GC-tracked objects allocated, less those freed, pass 700 since the last run.
vLLM's own step frees about what it allocates, so stock may run without a collection; every tracked object kvsched's
hooks keep (or whose free does not count: a tuple going back to its free list) brings the next one nearer, and a
collection then walks every young object, the new requests' token lists among them. Per side: the collections by
generation and their microseconds per step. kvsched side, second pass with the collector off: the net count of
tracked objects (allocated less freed, `gc.get_count()[0]`, held out of reach of 0) each hook leaves per call (nested
labels are included in the ones above them). A net near 0 is not enough: what a collection's count sees is the order
(an allocation counts, a free when the count is already 0 does not: a bulk free of thousands is mostly lost). A
diagnosis, not a benchmark: `kvsched bench sched` and tools/sched_ab.py give the ratios.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from typing import Any


def _side(which: str, sessions: int, steps: int) -> str:
    """One side's report (run in a spawned process, pinned to the highest CPU it may use)."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER, STOCK_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.tiny_model import ensure_tiny_model

    rnd = _Round(KVSCHED_SCHEDULER if which == "kvsched" else STOCK_SCHEDULER, ensure_tiny_model("test"), 1,
                 sessions, True)
    for _ in range(30):
        rnd.step()
    runs: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            runs[info["generation"]][0] += 1
            runs[info["generation"]][1] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    total = sum(rnd.step() for _ in range(steps))
    gc.callbacks.remove(on_gc)
    lines = [f"{which}: {sessions} sessions, {steps} steps, timed step {total / steps * 1e6:.0f} us; collections "
             + ", ".join(f"gen{g} {int(n)} ({s / steps * 1e6:.1f} us/step)" for g, (n, s) in runs.items())]
    if which == "kvsched":
        lines += _net_per_hook(rnd, steps)
    return "\n".join(lines)


def _net_per_hook(rnd: Any, steps: int) -> list[str]:
    """Tracked objects each hook leaves per call, over `steps` more steps with the collector off."""
    pins = rnd.s.kvsched
    policy = pins.policy
    net: dict[str, int] = {}  # in the order counted: a hook, then those it calls (indented)
    calls: dict[str, int] = defaultdict(int)

    def count(owner: Any, name: str, label: str) -> None:
        cls = type(owner)  # on the class: several of these objects have __slots__
        original = getattr(cls, name)
        net[label] = 0

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            before = gc.get_count()[0]
            try:
                return original(self, *args, **kwargs)
            finally:
                net[label] += gc.get_count()[0] - before
                calls[label] += 1

        setattr(cls, name, wrapper)

    count(pins, "on_request_added", "on_request_added")
    count(pins.resolver, "resolve", "  resolver.resolve (lineage)")
    count(policy, "request_arrived", "  policy.request_arrived")
    count(pins, "on_scheduled", "on_scheduled")
    count(pins, "on_request_finished", "on_request_finished")
    count(pins.pins, "turn_finished", "  pins.turn_finished")
    count(policy, "turn_finished", "    policy.turn_finished")
    count(pins.resolver, "finished", "  resolver.finished (lineage)")
    count(pins.pins, "enforce_budget", "  pins.enforce_budget")
    count(pins.pins, "unpin", "pins.unpin")
    # on_request_finished is bound into vLLM's _free_blocks wrapper at start-up: rebind it to the counted one
    rnd.s.kvsched_finishes.before = pins.on_request_finished
    gc.disable()
    # CPython 3.11 takes a free off the count only while it is above 0: held out of reach of 0, the count is the net
    # (before, a rebuild of the release index freeing ~7,500 stale entries at once read as nothing)
    held = [[] for _ in range(200_000)]
    before = gc.get_count()[0]
    for _ in range(steps):
        rnd.step()
    lines = [f"  net tracked objects over {steps} more steps (collector off): {gc.get_count()[0] - before} "
             f"({(gc.get_count()[0] - before) / steps:.1f} a step)"]
    lines += [f"  {label:32s} {net[label] / max(calls[label], 1):6.2f} a call ({calls[label]} calls)" for label in net]
    del held
    gc.enable()
    return lines


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for which in ("stock", "kvsched"):
            print(pool.apply(_side, (which, sessions, steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
