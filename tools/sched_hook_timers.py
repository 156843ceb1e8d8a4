"""Where kvsched's scheduler time goes on `kvsched bench sched`'s load: timers around its hooks for one round.

    python tools/sched_hook_timers.py [SESSIONS] [STEPS]      (default 10000 sessions, 300 steps; kvsched side only)

Wraps the hooks (and the policy, pin and payback calls under them) with perf_counter timers and prints us per step and
per call. Each wrapper adds ~0.3 us per call, so nested figures read a little high; the figures are a profile, not a
benchmark: `kvsched bench sched` gives the ratio against stock. Used for BENCHMARKS.md's "The 10,000 tier: where its
cost is" and for the payback ghost's per-turn costs (with KVSCHED_PAYBACK_SAMPLING=8 in the environment).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.tiny_model import ensure_tiny_model

    rnd = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    pins = rnd.s.kvsched
    policy = pins.policy
    spent: dict[str, list[float]] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        cls = type(owner)  # on the class: several of these objects have __slots__
        original = getattr(cls, name)
        cell = spent.setdefault(label, [0.0, 0])

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                cell[0] += time.perf_counter() - t
                cell[1] += 1

        setattr(cls, name, wrapper)

    timed(pins, "on_scheduled", "on_scheduled (turn starts)")
    timed(pins, "on_request_finished", "on_request_finished (turn ends)")
    timed(pins.pins, "turn_started", "  pins.turn_started")
    timed(pins.pins, "turn_finished", "  pins.turn_finished")
    timed(pins.pins, "enforce_budget", "  pins.enforce_budget")
    timed(pins.pins, "unpin", "    pins.unpin")
    timed(pins.resolver, "finished", "  resolver.finished (lineage)")
    timed(policy, "turn_started", "    policy.turn_started")
    timed(policy, "turn_finished", "    policy.turn_finished")
    timed(pins, "on_request_added", "on_request_added (turn arrives)")
    timed(policy, "request_arrived", "  policy.request_arrived")
    timed(policy.index, "_flush", "    release_index._flush")
    if policy.payback.enabled:
        timed(policy.payback, "observe", "    payback.observe")
        timed(policy.payback, "cached", "    payback.cached")
    # on_request_finished is bound into vLLM's _free_blocks wrapper at start-up: rebind it to the timed one
    cell = next(c for c in rnd.s._free_blocks.__closure__ if getattr(c.cell_contents, "__name__", "") ==
                "on_request_finished")
    cell.cell_contents = pins.on_request_finished
    total = sum(rnd.step() for _ in range(steps))
    turns = rnd.work["finished_turns"]
    print(f"{sessions} sessions, {steps} steps, {turns} finished turns; timed step {total / steps * 1e6:.0f} us")
    for label, (secs, calls) in spent.items():
        print(f"{label:36s} {secs / steps * 1e6:8.1f} us/step {calls:7d} calls {secs / max(calls, 1) * 1e6:7.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
