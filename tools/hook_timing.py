"""The timer wrapper `tools/sched_hook_timers.py` and `tools/floor_hook_timers.py` put around hooks (a profile's
timers, ~0.3 us a call: not a benchmark)."""

from __future__ import annotations

import gc
import time
from typing import Any


def timed(spent: dict[str, list[float]], fn: Any, label: str) -> Any:
    """`fn` timed under `label` in `spent` (label -> [seconds, calls]): a module function or a bound method."""
    cell = spent.setdefault(label, [0.0, 0])

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            cell[0] += time.perf_counter() - t
            cell[1] += 1

    return wrapper


def count_collections() -> list[float]:
    """[collections, seconds] of the garbage collector's runs from now on (a `gc.callbacks` entry, kept for good)."""
    collections = [0, 0.0]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections[0] += 1
            collections[1] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    return collections
