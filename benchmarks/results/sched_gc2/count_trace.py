"""The garbage collector's young count step by step on `kvsched bench sched`'s kvsched round (helper gc2).

    python count_trace.py SESSIONS STEPS      (the bench's round, seed 1; CPU: the highest this process may use)

The collector on, at its default threshold: for each step whose count moved by more than 30 or that ran a collection,
the count before -> after and what each wrapped hook changed it by inside the step (100000: a collection ran inside
it); at the end the collections by generation and each hook's total. CPython 3.11 counts an allocation of a tracked
object and takes a free off only while the count is above 0, so a hook's figure is what it added to the walk that
sets off the next collection, not its net.
"""

from __future__ import annotations

import gc
import os
import sys
from collections import defaultdict
from typing import Any

from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
from kvsched.bench.sched import _Round
from kvsched.tiny_model import ensure_tiny_model

HOOKS = (("pins", "enforce_budget"), ("pins", "turn_finished"), ("pins", "turn_started"), ("resolver", "resolve"),
         ("resolver", "finished"), ("pins", "expire"), ("", "on_shortage"), ("", "make_room"),
         ("policy", "request_arrived"))


def main() -> int:
    sessions, steps = int(sys.argv[1]), int(sys.argv[2])
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rnd = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    for _ in range(30):
        rnd.step()
    runs: list[int] = []
    gc.callbacks.append(lambda phase, info: runs.append(info["generation"]) if phase == "start" else None)
    pins = rnd.s.kvsched
    moved: dict[str, int] = defaultdict(int)

    def wrap(owner: Any, name: str) -> None:
        cls = type(owner)  # on the class: several of these objects have __slots__
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any) -> Any:
            before, n = gc.get_count()[0], len(runs)
            try:
                return original(self, *args)
            finally:
                moved[name] += gc.get_count()[0] - before if len(runs) == n else 100_000

        setattr(cls, name, wrapper)

    for attr, name in HOOKS:
        wrap(getattr(pins, attr) if attr else pins, name)
    total: dict[str, int] = defaultdict(int)
    for i in range(steps):
        moved.clear()
        n, before = len(runs), gc.get_count()[0]
        rnd.step()
        for name, v in moved.items():
            total[name] += v if v < 10_000 else 0
        if len(runs) > n or abs(gc.get_count()[0] - before) > 30:
            print(f"{i}:{before}->{gc.get_count()[0]}{' GC' if len(runs) > n else ''} "
                  + ",".join(f"{k}={v}" for k, v in moved.items() if v))
    print("collections", len(runs), runs.count(1), runs.count(2))
    print(dict(total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
