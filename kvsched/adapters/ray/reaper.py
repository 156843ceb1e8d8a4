"""A watchdog that takes a replica's `vllm serve` process group down when the replica process dies.

`VllmServer` starts vLLM in its own session, so the API server and its engine-core and worker processes share one
process group that can be signalled as a whole. When Ray kills a replica it also SIGKILLs the replica's direct
children (`RAY_kill_child_processes_on_worker_exit`), which would leave vLLM's engine core and workers orphaned.
So the reaper detaches itself (double fork: not a child of the replica, not killed with it), watches the replica's
pid (with its start time, so a reused pid does not fool it; the group's leader's too, so that a group gone whose
number a new group took is neither watched nor stopped) and stops the group: SIGKILL at once when the API server
is already gone (nothing is left to shut down cleanly; Ray kills the replica's direct children with it), else SIGINT,
then SIGKILL after 5 s. Either way the group is gone well within 10 s of the replica's death.

A PGID that names no process group (not created yet: its leader has not called setsid) is refused with exit
status 1 and a message, before the detach: a watch of it would end at once, silently.

Usage: python -m kvsched.adapters.ray.reaper PGID PARENT_PID
"""

from __future__ import annotations

import os
import signal
import sys
import time


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def renumbered(pgid: int, leader_started: str | None) -> bool:
    """Whether `pgid` names another process than the group's leader seen at `leader_started` (None: not seen): then
    the group is gone (Linux hands a group's number out again only once the group is empty) and the number may lead
    another's group. Found by review71: the watch and the stop went by the number alone."""
    return leader_started is not None and start_time(pgid) not in (None, leader_started)


def stop_group(pgid: int, grace_s: float = 10.0, leader_started: str | None = None) -> None:
    """SIGINT the whole group, SIGKILL whatever is left after `grace_s` (at once when it is 0); nothing once the
    group's number names another process than its leader seen at `leader_started` (`renumbered`)."""
    steps = ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)) if grace_s > 0 else ((signal.SIGKILL, 5.0),)
    for sig, wait_s in steps:
        if renumbered(pgid, leader_started):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)


def leader_alive(pgid: int) -> bool:
    """Whether the group's leader (vLLM's API server, pid == pgid) is running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pgid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def watch(pgid: int, parent: int, parent_started: str | None, period_s: float = 0.5,
          leader_started: str | None = None) -> None:
    while group_alive(pgid) and not renumbered(pgid, leader_started):
        if parent_started is None or start_time(parent) != parent_started:
            stop_group(pgid, grace_s=5.0 if leader_alive(pgid) else 0.0, leader_started=leader_started)
            return
        time.sleep(period_s)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print("usage: python -m kvsched.adapters.ray.reaper PGID PARENT_PID", file=sys.stderr)
        return 2
    pgid, parent = int(argv[1]), int(argv[2])
    if not group_alive(pgid):  # its watch would end at once, silently: say so, to whoever started the reaper
        print(f"reaper: no process group {pgid} (not started yet, or gone): nothing to watch", file=sys.stderr)
        return 1
    parent_started, leader_started = start_time(parent), start_time(pgid)
    if os.fork() != 0:  # detach: the first child exits, the grandchild (re-parented to init) watches
        return 0
    os.setsid()
    watch(pgid, parent, parent_started, leader_started=leader_started)
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)
