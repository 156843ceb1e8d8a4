"""What the retention policy's per-turn calls cost warm (a tight loop) and cold (other memory walked in between).

    python tools/policy_hook_cold.py [SESSIONS] [CALLS]      (default 10000 sessions, 3000 turns)

A policy of SESSIONS pinned sessions (the 10,000 tier of `kvsched bench sched`) runs turns of random sessions, each
`request_arrived`, `turn_started`, `turn_finished` as the engine calls them: first back to back, then each call after
a walk over ~10 MB of other Python objects, as a scheduler step walks vLLM's requests and blocks between two of
kvsched's hooks. Only the calls are timed. A profile, not a benchmark (no stock side): it shows whether the hooks' cost inside the engine is the
work they do or the memory they touch (BENCHMARKS.md, "The 10,000 tier: where its cost is").
"""

from __future__ import annotations

import os
import random
import sys
import time

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 3_000
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    now = [0.0]
    policy = RetentionPolicy(RetentionConfig(), lambda: now[0], total_blocks=240_000, bytes_per_token=1024.0)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(sessions)]
    hints = TurnHints(role="worker")
    for key in keys:  # every session pinned after one turn
        policy.request_arrived(key, hints)
        policy.turn_started(key, 0)
        policy.turn_finished(key, hints, 320, 20)
        now[0] += 0.001
    rng = random.Random(1)
    other = [[i, float(i), str(i)] for i in range(200_000)]  # ~10 MB of objects none of the hooks reads

    def walk() -> int:
        return sum(other[j][0] for j in range(0, len(other), 10))

    hooks = (("request_arrived", lambda k: policy.request_arrived(k, hints)),
             ("turn_started", lambda k: policy.turn_started(k, 320)),  # its whole pin hit
             ("turn_finished", lambda k: policy.turn_finished(k, hints, 320, 20)))  # pinned again (same size)

    def turns(cold: bool) -> list[float]:
        """Each picked session's turn, hook by hook (arrives, starts, finishes); seconds per hook."""
        spent = [0.0] * len(hooks)
        for key in [keys[rng.randrange(sessions)] for _ in range(calls)]:
            for h, (_, hook) in enumerate(hooks):
                now[0] += 0.001
                if cold:
                    walk()
                t0 = time.perf_counter()
                hook(key)
                spent[h] += time.perf_counter() - t0
        return [x / calls for x in spent]

    warm, cold = turns(False), turns(True)
    print(f"{sessions} pinned sessions, {calls} turns: us per call")
    print(f"{'hook':16s} {'back to back':>12s} {'after a walk':>12s} {'ratio':>6s}")
    for (name, _), w, c in zip(hooks, warm, cold, strict=True):
        print(f"{name:16s} {w * 1e6:12.2f} {c * 1e6:12.2f} {c / w:6.1f}")
    print(f"{'a whole turn':16s} {sum(warm) * 1e6:12.2f} {sum(cold) * 1e6:12.2f} {sum(cold) / sum(warm):6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
