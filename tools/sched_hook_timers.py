"""Where kvsched's scheduler time goes on `kvsched bench sched`'s load: timers around its hooks for one round.

    python tools/sched_hook_timers.py [--with-output] [SESSIONS] [STEPS]   (default 10000 sessions, 300 steps;
                                                                             kvsched side only)

Wraps the hooks (and the policy, pin, lineage, payback and vLLM block-pool calls under them) with perf_counter timers
and prints us per step and per call. Each wrapper adds ~0.3 us per call, so nested figures read a little high; the
figures are a profile, not a benchmark: `kvsched bench sched` gives the ratio against stock. Used for BENCHMARKS.md's
"The 10,000 tier: where its cost is" and for the payback ghost's per-turn costs (with KVSCHED_PAYBACK_SAMPLING=8 in
the environment). `--with-output`: the bench's `--with-output` load (each prompt carries the last turn's answer).
With the mypyc build in use (kvsched/compiled.py) a compiled method's wrapper sees only the calls made from Python
code, not those from other compiled code: such rows are marked; KVSCHED_PURE_PYTHON=1 times them all.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any

from hook_timing import count_collections  # tools/, beside this script
from hook_timing import timed as timer_of


def main() -> int:
    argv = [a for a in sys.argv[1:] if a != "--with-output"]
    with_output = len(argv) < len(sys.argv) - 1
    sessions = int(argv[0]) if argv else 10_000
    steps = int(argv[1]) if len(argv) > 1 else 300
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    from kvsched.adapters.vllm import compat, session_lineage
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.tiny_model import ensure_tiny_model

    rnd = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True, with_output=with_output)
    pins = rnd.s.kvsched
    policy = pins.policy
    spent: dict[str, list[float]] = {}

    def wrapped(fn: Any, label: str) -> Any:
        """`fn` timed under `label` (a module function or a bound method held by an instance)."""
        return timer_of(spent, fn, label)

    native: set[str] = set()  # labels of compiled (mypyc) methods: calls from compiled code bypass the wrapper

    def timed(owner: Any, name: str, label: str) -> None:
        cls = type(owner)  # on the class: several of these objects have __slots__
        original = getattr(cls, name)
        cell = spent.setdefault(label, [0.0, 0])
        if not inspect.isfunction(original):
            native.add(label)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                cell[0] += time.perf_counter() - t
                cell[1] += 1

        setattr(cls, name, wrapper)

    # Printed in this order, nested as they call each other (a label's figure includes those indented under it).
    timed(pins, "on_request_added", "on_request_added (turn arrives)")
    timed(pins.resolver, "resolve", "  resolver.resolve (lineage)")
    compat.request_session = wrapped(compat.request_session, "    compat.request_session")
    session_lineage.tail_of = wrapped(session_lineage.tail_of, "    tail_of (the prompt's tail)")
    timed(pins.resolver.lineage, "named", "    lineage.named")
    timed(policy, "request_arrived", "  policy.request_arrived")
    timed(policy.returns, "arrived", "    returns.arrived (return model)")
    timed(pins, "on_scheduled", "on_scheduled (turn starts)")
    timed(pins.pins, "turn_started", "  pins.turn_started")
    timed(policy, "turn_started", "    policy.turn_started")
    timed(policy, "_observe_gap", "      policy._observe_gap")
    timed(policy, "_release", "      policy._release (any reason)")
    timed(pins, "on_request_finished", "on_request_finished (turn ends)")
    compat.reusable_prefix_blocks = wrapped(compat.reusable_prefix_blocks, "  compat.reusable_prefix_blocks")
    timed(pins.pins, "turn_finished", "  pins.turn_finished")
    timed(policy, "turn_finished", "    policy.turn_finished")
    timed(policy.returns, "turn_finished", "      returns.turn_finished (return model)")
    timed(pins.pins, "repin", "    pins.repin")
    timed(pins.resolver, "finished", "  resolver.finished (lineage)")
    compat.finish_anchor = wrapped(compat.finish_anchor, "    compat.finish_anchor")
    timed(pins.resolver.lineage, "finished", "    lineage.finished")
    timed(pins.pins, "enforce_budget", "  pins.enforce_budget")
    timed(policy.index, "_flush", "    release_index._flush")
    timed(pins.pins, "unpin", "pins.unpin (any reason)")
    pool = pins.pins.pool  # vLLM's own calls for the pins' blocks (bound methods the pool holds)
    pool._hold = wrapped(pool._hold, "  vLLM touch (pins.repin)")
    pool._return = wrapped(pool._return, "  vLLM free_blocks (pins.unpin, repin)")
    if policy.payback.enabled:
        timed(policy.payback, "observe", "    payback.observe")
        timed(policy.payback, "cached", "    payback.cached")
    # on_request_finished is bound into vLLM's _free_blocks wrapper at start-up: rebind it to the timed one
    rnd.s.kvsched_finishes.before = pins.on_request_finished
    collections = count_collections()  # the garbage collector's runs in the timed steps, and their seconds
    total = sum(rnd.step() for _ in range(steps))
    turns = rnd.work["finished_turns"]
    released = rnd._turn_releases() - rnd._released_before
    print(f"{sessions} sessions{' with output' if with_output else ''}, {steps} steps, {turns} finished turns; timed "
          f"step {total / steps * 1e6:.0f} us; {collections[0]} collections, "
          f"{collections[1] / steps * 1e6:.1f} us/step; "
          f"{released} pins released at a turn's start ({released / steps:.2f}/step)")
    for label, (secs, calls) in spent.items():
        print(f"{label:36s} {secs / steps * 1e6:8.1f} us/step {calls:7d} calls "
              f"{secs / max(calls, 1) * 1e6:7.2f} us/call" + ("  (compiled: calls from compiled code not seen)"
                                                              if label in native else ""))
    if native:
        print("kvsched.compiled.mode is 'compiled': `KVSCHED_PURE_PYTHON=1` times every hook (as pure Python)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
