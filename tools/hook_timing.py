"""The timer wrapper `tools/sched_hook_timers.py` and `tools/floor_hook_timers.py` put around hooks (a profile's
timers, ~0.3 us a call: not a benchmark)."""

from __future__ import annotations

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
