"""Where the pin floor's scheduler time goes on `kvsched bench sched`'s load: timers around its hooks for one round.

    python tools/floor_hook_timers.py [SESSIONS] [STEPS]   (default 10000 sessions, 300 steps; the floor side only)

The floor is kvsched/bench/sched_floor.py (`tools/sched_sides.py floor` measures it against stock). Wraps its pin,
release and session read, vLLM's `touch` / `free_blocks` under them and the shortage wrapper around
`allocate_slots`, with perf_counter timers, and counts the garbage collector's runs in the timed steps (after 30
untimed ones, as tools/sched_gc.py). Each wrapper adds ~0.3 us per call, so the figures read a little high: a
profile, not a benchmark (as tools/sched_hook_timers.py is for kvsched's hooks).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    from kvsched.adapters.vllm import compat
    from kvsched.bench.sched import _Round
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER, FloorScheduler
    from kvsched.tiny_model import ensure_tiny_model

    spent: dict[str, list[float]] = {}

    def wrapped(fn: Any, label: str) -> Any:
        cell = spent.setdefault(label, [0.0, 0])

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cell[0] += time.perf_counter() - t
                cell[1] += 1

        return wrapper

    # Class-level wrappers, before the round's scheduler is built (its __init__ binds the pool's calls and the
    # allocate_slots wrapper: those are wrapped on the instance below).
    for name, label in (("add_request", "add_request (all: vLLM's + session read)"),
                        ("_free_blocks", "_free_blocks (all: pin + vLLM's free)"), ("_pin", "  _pin"),
                        ("_release", "_release (turn, budget, shortage)")):
        setattr(FloorScheduler, name, wrapped(getattr(FloorScheduler, name), label))
    compat.request_session = wrapped(compat.request_session, "  compat.request_session")
    rnd = _Round(FLOOR_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    s = rnd.s
    s._hold = wrapped(s._hold, "  vLLM touch (pin)")
    s._give_back = wrapped(s._give_back, "  vLLM free_blocks (release)")
    s._prefix = wrapped(s._prefix, "  compat.reusable_prefix read")
    manager = s.kv_cache_manager
    manager.allocate_slots = wrapped(manager.allocate_slots, "allocate_slots (vLLM's, in the shortage wrapper)")
    for _ in range(30):  # untimed, as tools/sched_gc.py: past the round's first prefills
        rnd.step()
    for cell in spent.values():  # the warm-up's calls do not count
        cell[:] = [0.0, 0]
    rnd.work["finished_turns"] = 0
    collections = [0, 0.0]

    def on_gc(phase: str, info: dict[str, int], started: list[float] = [0.0]) -> None:  # noqa: B006 (its state)
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections[0] += 1
            collections[1] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    released = dict(s.released)
    total = sum(rnd.step() for _ in range(steps))
    turns = rnd.work["finished_turns"]
    print(f"floor, {sessions} sessions, {steps} steps, {turns} finished turns; "
          f"timed step {total / steps * 1e6:.0f} us; "
          f"{collections[0]} collections, {collections[1] / steps * 1e6:.1f} us/step; released "
          + ", ".join(f"{k} {v - released[k]}" for k, v in s.released.items())
          + f"; {len(s.pins)} sessions pinned, {s.pinned_blocks} blocks")
    for label, (secs, calls) in spent.items():
        print(f"{label:50s} {secs / steps * 1e6:8.1f} us/step {calls:7d} calls "
              f"{secs / max(calls, 1) * 1e6:7.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
