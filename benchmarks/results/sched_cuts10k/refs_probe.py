"""A probe (not a benchmark) of the pins' reference counts on the bench's round: vLLM's `touch` / `free_blocks` calls
through `VllmPinPool` and their blocks a step, and the block ids the pins hold (helper cuts10k, BENCHMARKS.md).

    PYTHONPATH=TREE python refs_probe.py SESSIONS STEPS
"""

from __future__ import annotations

import os
import sys
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
from kvsched.bench.sched import _Round
from kvsched.tiny_model import ensure_tiny_model


def main() -> int:
    sessions, steps = int(sys.argv[1]), int(sys.argv[2])
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rnd = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    pins = rnd.s.kvsched
    pool = pins.pins.pool
    print("gpu blocks", compat.block_pool(rnd.s).num_gpu_blocks, "refs", len(pool.refs), "budget",
          pins.policy.budget_blocks)
    counts = {"hold": [0, 0], "give": [0, 0]}
    hold, give = pool._hold, pool._return

    def counted(fn: Any, cell: list[int]) -> Any:
        def call(blocks: list[Any]) -> None:
            cell[0] += 1
            cell[1] += len(blocks)
            fn(blocks)
        return call

    pool._hold, pool._return = counted(hold, counts["hold"]), counted(give, counts["give"])
    for _ in range(steps):
        rnd.step()
    print("refs", len(pool.refs), {k: (v[0] / steps, v[1] / steps) for k, v in counts.items()}, "turns",
          rnd.work["finished_turns"] / steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
