"""How many evictions does each pass of pin releases make in a full FP8 tier, and how many of the pool lookups repeat
one made earlier in the same pass (what `Reach.batch` saves)?

    python benchmarks/results/tiercost/pass_probe.py SESSIONS STEPS TIER_GIB

One round of `kvsched bench sched --tier`'s load (seed 0) with a tier of TIER_GIB GiB on the tree on PYTHONPATH;
counts, per `PinApplier.enforce_budget` / `expire` call that evicted, the `_evict_one` calls (`per_pass`: calls ->
passes), the lookups (`lookups`), and those asking a key already asked in the same pass (`repeats`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any


def main() -> None:
    sessions, steps, gib = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from tier_round import tier_round

    from kvsched.core import tier as tiermod

    r, d = tier_round(sessions, gib)
    counts: Counter[str] = Counter()
    per_pass: Counter[int] = Counter()
    seen: list[set[Any]] = []
    holds = d.reach.pool_holds

    def counted(key: Any) -> bool:
        counts["lookups"] += 1
        if seen:
            counts["repeats"] += key in seen[-1]
            seen[-1].add(key)
        return bool(holds(key))

    d.reach.pool_holds = counted
    pins = type(r.s.kvsched.pins)
    for name in ("enforce_budget", "expire"):
        def pass_(self: Any, _orig: Any = getattr(pins, name), _name: str = name) -> None:
            seen.append(set())
            before = counts["evictions"]
            try:
                _orig(self)
            finally:
                seen.pop()
            if counts["evictions"] > before:
                per_pass[counts["evictions"] - before] += 1
                counts["passes_" + _name] += 1
        setattr(pins, name, pass_)
    evict = tiermod.TierDirectory._evict_one

    def evict_one(self: Any, exclude: Any, want: int = 1) -> bool:
        counts["evictions"] += 1
        return evict(self, exclude, want)

    tiermod.TierDirectory._evict_one = evict_one  # type: ignore[method-assign]
    for _ in range(steps):
        r.step()
    print(json.dumps({"counts": counts, "per_pass": dict(sorted(per_pass.items()))}))


if __name__ == "__main__":
    main()
