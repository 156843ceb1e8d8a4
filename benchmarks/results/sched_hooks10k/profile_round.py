"""The bench's kvsched round alone, for a sampling profiler: `python profile_round.py SESSIONS STEPS` (helper hooks10k).

Builds `kvsched bench sched`'s round (seed 1, the 10,000 tier's untimed first turns included), writes
/tmp/hooks10k/ready with its pid once the round is built (start `py-spy record --native -p PID` then), and steps it.
Used as: `py-spy record --native -r 1000 -f raw -o prof10k.raw -p PID` on `profile_round.py 10000 2500`, CPU 1.
"""

from __future__ import annotations

import os
import sys
import time

from kvsched import compiled
from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
from kvsched.bench.sched import _Round
from kvsched.tiny_model import ensure_tiny_model


def main() -> int:
    sessions, steps = int(sys.argv[1]), int(sys.argv[2])
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rnd = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    print("mode", compiled.mode, flush=True)
    os.makedirs("/tmp/hooks10k", exist_ok=True)
    with open("/tmp/hooks10k/ready", "w") as f:
        f.write(str(os.getpid()))
    t = time.process_time()
    total = sum(rnd.step() for _ in range(steps))
    print(f"timed step {total / steps * 1e6:.0f} us; cpu {time.process_time() - t:.1f} s; "
          f"turns {rnd.work['finished_turns']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
