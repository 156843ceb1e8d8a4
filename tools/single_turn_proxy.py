"""Write a Mooncake-format trace (FAST'25 line format) shaped like Mooncake's where long pins lose: a stand-in for
developing the "never more prefill than LRU" fallback when the real traces (`kvsched trace fetch mooncake`) are not at
hand. Its figures are not the issue's gates (BENCHMARKS.md says which are which).

    python tools/single_turn_proxy.py SEED OUT.jsonl [--single 0.75]
    kvsched trace import --format mooncake OUT.jsonl OUT.kvsched.jsonl

2,500 sessions arrive over 1,000 s (Poisson, 0.4 s apart on average); a share `--single` of them send one request,
the others 2-6, lognormal gaps with a median of 55 s (Mooncake conversation: 94% of gaps over 30 s); each session opens
with one of 8 shared system prefixes (2-6 blocks of 512 tokens) and 2-20 blocks of its own, and each turn adds 1-4
blocks. Cut at 1,000 s like a recorded window (no tail of returning turns only)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("output", type=Path)
    ap.add_argument("--single", type=float, default=0.75, help="share of single-turn sessions")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    next_id = 1000

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    systems = [fresh(rng.randint(2, 6)) for _ in range(8)]
    events: list[tuple[float, dict[str, object]]] = []
    t = 0.0
    for _ in range(2500):
        t += rng.expovariate(1 / 0.4)
        turns = 1 if rng.random() < args.single else rng.randint(2, 6)
        hist = list(rng.choice(systems)) + fresh(rng.randint(2, 20))
        ts = t
        for _ in range(turns):
            n = len(hist) * 512 - rng.randint(0, 511)
            events.append((ts, {"timestamp": int(ts * 1000), "input_length": n,
                                "output_length": rng.randint(20, 600), "hash_ids": list(hist)}))
            ts += rng.lognormvariate(4.0, 1.0)
            hist = hist + fresh(rng.randint(1, 4))
    events.sort(key=lambda e: e[0])
    args.output.write_text("".join(json.dumps(d) + "\n" for ts, d in events if ts < 1000.0))


if __name__ == "__main__":
    main()
