"""A watchdog that takes a replica's `vllm serve` process group down when the replica process dies.

`VllmServer` starts vLLM in its own session (so it can signal the whole group: API server plus engine core), which
also means a replica killed with SIGKILL would leave vLLM running. This small process, started by the replica in its
own session, notices its parent is gone (its parent pid changes) and stops the group: SIGINT, then SIGKILL.

Usage: python -m kvsched.adapters.ray.reaper PGID
"""

from __future__ import annotations

import os
import signal
import sys
import time


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)


def watch(pgid: int, parent: int, period_s: float = 0.5) -> None:
    while group_alive(pgid):
        if os.getppid() != parent:
            stop_group(pgid)
            return
        time.sleep(period_s)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m kvsched.adapters.ray.reaper PGID", file=sys.stderr)
        return 2
    watch(int(argv[1]), os.getppid())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
