"""Where the pin floor's scheduler time goes on `kvsched bench sched`'s load: timers around its hooks for one round.

    python tools/floor_hook_timers.py [SESSIONS] [STEPS] [SIDE]   (default 10000 sessions, 300 steps, SIDE floor)

SIDE: `floor` or `floor-inc` (kvsched/bench/sched_floor.py's FloorScheduler / FloorIncScheduler; `tools/sched_sides.py`
measures them against stock), or `stock` (vLLM's AsyncScheduler: only vLLM's own calls are timed, the floors' figures
to compare them with). Wraps the floor's pin, release, turn start and session read, vLLM's `touch` / `free_blocks`
under them (the pin pool's) and the pool's own `hold_allocated` / `give_back` (its reference counts), the shortage
wrapper around `allocate_slots`, and vLLM's own `schedule()`, `update_from_output()` and the requests' own
`free_blocks`, with perf_counter timers, and counts the garbage collector's runs in the timed steps (after 30 untimed
ones, as tools/sched_gc.py). Each wrapper adds ~0.3 us per call, so the figures read a little high: a profile, not a
benchmark (as tools/sched_hook_timers.py is for kvsched's hooks).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hook_timing import count_collections  # tools/, beside this script
from hook_timing import timed as timer_of


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    side = sys.argv[3] if len(sys.argv) > 3 else "floor"
    from vllm.v1.core.sched.scheduler import Scheduler

    from kvsched.adapters.vllm import compat
    from kvsched.adapters.vllm.harness import STOCK_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.bench.sched_floor import FLOOR_INC_SCHEDULER, FLOOR_SCHEDULER, FloorIncScheduler, FloorScheduler
    from kvsched.tiny_model import ensure_tiny_model

    cls_name, cls = {"floor": (FLOOR_SCHEDULER, FloorScheduler), "floor-inc": (FLOOR_INC_SCHEDULER, FloorIncScheduler),
                     "stock": (STOCK_SCHEDULER, None)}[side]
    spent: dict[str, list[float]] = {}

    def wrapped(fn: Any, label: str) -> Any:
        return timer_of(spent, fn, label)

    # Class-level wrappers, before the round's scheduler is built (its __init__ binds the pool's calls and the
    # allocate_slots wrapper: those are wrapped on the instance below).
    Scheduler.schedule = wrapped(Scheduler.schedule, "vLLM's schedule() (its own: no floor hook inside)")
    Scheduler.update_from_output = wrapped(Scheduler.update_from_output, "vLLM's update_from_output() (all)")
    if cls is not None:
        for name, label in (("add_request", "add_request (all: vLLM's + session read)"),
                            ("_finished", "_finished (the pin, before vLLM's free)"), ("_pin", "  _pin"),
                            ("_turn_started", "_turn_started (in schedule(), after vLLM's)"),
                            ("_release", "_release (turn, budget, shortage)")):
            setattr(cls, name, wrapped(getattr(cls, name), label))
        compat.request_session = wrapped(compat.request_session, "  compat.request_session")
    if cls is not None:  # the pins' reference counts: the pin's (hold_allocated) and a release's (in give_back)
        from kvsched.adapters.vllm.pin_pool import VllmPinPool

        VllmPinPool.hold_allocated = wrapped(VllmPinPool.hold_allocated, "  the pin's counts (hold_allocated)")
        VllmPinPool.give_back = wrapped(VllmPinPool.give_back, "  give_back (counts + vLLM free_blocks)")
    rnd = _Round(cls_name, ensure_tiny_model("test"), 1, sessions, True)
    s = rnd.s
    manager = s.kv_cache_manager
    pool = compat.block_pool(s)
    pool.free_blocks = wrapped(pool.free_blocks, "vLLM free_blocks (the requests' own)")
    if cls is not None:
        s.pool._hold = wrapped(s.pool._hold, "  vLLM touch (pin)")
        s.pool._return = wrapped(s.pool._return, "  vLLM free_blocks (release)")
        s._prefix = wrapped(s._prefix, "  compat.reusable_prefix read")
        manager.allocate_slots = wrapped(manager.allocate_slots, "allocate_slots (vLLM's, in the shortage wrapper)")
    else:
        manager.allocate_slots = wrapped(manager.allocate_slots, "allocate_slots (vLLM's)")
    for _ in range(30):  # untimed, as tools/sched_gc.py: past the round's first prefills
        rnd.step()
    for cell in spent.values():  # the warm-up's calls do not count
        cell[:] = [0.0, 0]
    rnd.work["finished_turns"] = 0
    collections = count_collections()  # the garbage collector's runs in the timed steps, and their seconds
    released = dict(getattr(s, "released", {}))
    total = sum(rnd.step() for _ in range(steps))
    turns = rnd.work["finished_turns"]
    pins = ("; released " + ", ".join(f"{k} {v - released[k]}" for k, v in s.released.items())
            + f"; {len(s.pins)} sessions pinned, {s.pinned_blocks} blocks") if cls is not None else ""
    print(f"{side}, {sessions} sessions, {steps} steps, {turns} finished turns; "
          f"timed step {total / steps * 1e6:.0f} us; "
          f"{collections[0]} collections, {collections[1] / steps * 1e6:.1f} us/step{pins}")
    for label, (secs, calls) in spent.items():
        print(f"{label:50s} {secs / steps * 1e6:8.1f} us/step {calls:7d} calls "
              f"{secs / max(calls, 1) * 1e6:7.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
