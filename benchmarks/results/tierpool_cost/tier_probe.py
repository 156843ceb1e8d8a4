"""Does `kvsched bench sched --tier`'s FP8 tier fill and evict, and what does its eviction cost when it does?

    python benchmarks/results/tierpool_cost/tier_probe.py SESSIONS STEPS [--tier-gib G] [--no-reach] [--out X.json]

One round of the bench's load (kvsched.bench.sched._Round, seed 0, tier on, as tools/sched_ab.py runs it) on the
tree on PYTHONPATH; prints the tier directory's counters and slots before and after the timed steps, how often the
eviction ran (`_evict_one`, `_evict_tail`), how many `pool_holds` lookups it made, and the thread CPU time spent in
`_evict_one` and in the lookups. `--tier-gib`: a tier of that size instead of the bench's "auto" (to make it fill);
`--no-reach`: the eviction without the pool query (the order before tierpool, 0832d89).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sessions", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("--tier-gib", default="auto")
    p.add_argument("--no-reach", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from kvsched.adapters.vllm import tier_config
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.core import tier as tiermod
    from kvsched.tiny_model import ensure_tiny_model

    calls: Counter[str] = Counter()
    spent: Counter[str] = Counter()  # thread CPU seconds

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls[name] += 1
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.thread_time() - t
        return wrapper

    d_cls = tiermod.TierDirectory
    d_cls._evict_one = timed("evict_one", d_cls._evict_one)  # type: ignore[method-assign]
    d_cls._evict_tail = timed("evict_tail", d_cls._evict_tail)  # type: ignore[method-assign]
    config = tier_config.kv_transfer_config
    tier_config.kv_transfer_config = lambda *a, **k: config(args.tier_gib)  # type: ignore[assignment]
    r = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 0, args.sessions, True, True)
    d = r.s.kvsched.tier.directory
    holds = d.reach.pool_holds
    d.reach.pool_holds = None if args.no_reach or holds is None else timed("pool_holds", holds)
    before = {"counters": dict(d.counters), "used_slots": d.used_slots, "calls": dict(calls)}
    calls.clear()
    spent.clear()
    step_s = 0.0
    for _ in range(args.steps):
        t = time.thread_time()
        r.step()
        step_s += time.thread_time() - t
    out = {"sessions": args.sessions, "steps": args.steps, "tier_gib": args.tier_gib, "reach": d.reach.pool_holds
           is not None, "num_slots": d.num_slots, "budget_bytes": d.config.budget_bytes, "before_timed": before,
           "after": {"counters": dict(d.counters), "used_slots": d.used_slots},
           "timed_calls": dict(calls), "timed_cpu_s": dict(spent), "step_cpu_s_total": step_s,
           "connector_stats": {k: v for k, v in r.s.kvsched.tier.stats.items() if v}, "work": dict(r.work)}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
