"""How `kvsched ray-serve` stops on Ctrl-C (or SIGTERM): within seconds, as `vllm serve` does, and leaving nothing of
what it started.

The first Ctrl-C takes Serve down gracefully, for at most STOP_GRACE_S: Serve's shutdown on the local cluster this
command started (each engine replica's `__del__` stops its `vllm serve`), or only this command's application on a
cluster it joined (--address, RAY_ADDRESS: other applications and the cluster itself are left running). Past the
grace, or at a second Ctrl-C, it is forced. Then `ray.shutdown()`: it stops the local cluster (or only disconnects
from a joined one), and whatever is left of the engines' process groups on this machine (a `vllm serve` and its
engine core) is killed, so that no engine outlives the command.

Found by leftovers70 (reported: ~66 s to stop, not reproduced here). What bounded nothing before: Serve's own shutdown
removes the deployments one tier after another (the ingress, then the engines), each replica sleeping Ray's
`graceful_shutdown_wait_loop_s` (2 s) before it first counts its requests and draining in-flight ones for up to its
`graceful_shutdown_timeout_s` (the engines' 30 s, kept for an autoscaling scale-down, where a replica's requests must
finish), `serve.shutdown()` waits up to 30 s for Serve's controller, and a second Ctrl-C changed nothing. Measured
(one tiny CPU replica, Ctrl-C to the command's process group, Xeon model 167, 2 shared cores): before, 8.5-8.6 s idle
and 8.9-11.6 s with two streams in flight; now 4.6-5.7 s idle and 8.7 s under load (tests/ray/test_ray_serve_stop.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping

STOP_GRACE_S = 10.0  # Serve's graceful shutdown, in-flight requests finishing within it; then forced
KILL_WAIT_S = 5.0  # how long the engines' process groups are given to go after SIGKILL

logger = logging.getLogger("kvsched.ray_serve")


Member = tuple[int, str]  # (pid, start time in clock ticks since boot): a pid names one process only with its start


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, start time) of every live (non-zombie) process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(entry)] = (int(fields[1]), int(fields[2]), fields[19])
    return out


def started_groups(pid: int) -> dict[int, set[Member]]:
    """The process groups led by processes `pid`'s children started, at any depth (on the local cluster: each
    replica's `vllm serve`, which leads its engine core's and workers' group; Ray's own workers), each with its
    members now. Not those of its own children: the redis-server of `store: {url: local}`, which the command stops
    itself."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return groups_of({p for p in found if table[p][1] == p and table[p][0] != pid and p != os.getpgrp()}, table)


def groups_of(leaders: Iterable[int], table: dict[int, tuple[int, int, str]] | None = None) -> dict[int, set[Member]]:
    """The groups these processes lead, each with its members now (`table`: process_table's, read if None)."""
    groups: dict[int, set[Member]] = {g: set() for g in leaders}
    for member, (_, group, started) in (process_table() if table is None else table).items():
        if group in groups:
            groups[group].add((member, started))
    return groups


def merge(groups: dict[int, set[Member]], more: dict[int, set[Member]]) -> dict[int, set[Member]]:
    for group, members in more.items():
        groups.setdefault(group, set()).update(members)
    return groups


def holding(groups: Mapping[int, Collection[Member]]) -> dict[int, set[Member]]:
    """The members now of each group of `groups` that still holds one of the members recorded with it. A group none
    of whose recorded members is left may be gone: Linux hands its number out again once it is empty."""
    now: dict[int, set[Member]] = {}
    for pid, (_, group, started) in process_table().items():
        if group in groups:
            now.setdefault(group, set()).add((pid, started))
    return {g: members for g, members in now.items() if members & set(groups[g])}


def kill_groups(groups: Mapping[int, Collection[Member]], wait_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL every group of `groups` that still holds one of the members recorded with it (`holding`); the groups
    killed that are still alive after `wait_s` (none, but for a process stuck in the kernel). Found by review71: a
    group recorded before the 10-s graceful stop was killed after it by number alone, whatever held the number by
    then."""
    ours = set(holding(groups))
    for group in ours:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    left = ours
    deadline = time.monotonic() + wait_s
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = ours & {group for _, group, _ in process_table().values()}
    return sorted(left)


def graceful(app_name: str, started: bool) -> None:
    """Serve's graceful shutdown (the local cluster's), or the deletion of this command's application (a joined
    cluster's)."""
    from ray import serve

    try:
        if started:
            serve.shutdown()
        else:
            serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - the command stops anyway: Ray is shut down next
        logger.warning(f"kvsched ray-serve: Serve's shutdown failed ({exc}); stopping Ray")


def shut_down(app_name: str, started: bool, grace_s: float = STOP_GRACE_S,
              graceful_stop: Callable[[str, bool], None] = graceful) -> int:
    """Stop serving (the module's rule); 0 when Serve stopped gracefully, 130 when forced (a second Ctrl-C or the
    grace over)."""
    import ray

    force = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: force.set())
    print(f"kvsched ray-serve: shutting down (at most {grace_s:g} s; Ctrl-C again to force)", flush=True)
    groups = started_groups(os.getpid()) if started else {}
    worker = threading.Thread(target=graceful_stop, args=(app_name, started), name="serve-shutdown", daemon=True)
    worker.start()
    deadline = time.monotonic() + grace_s
    while worker.is_alive() and not force.is_set() and time.monotonic() < deadline:
        worker.join(0.1)
    forced = worker.is_alive()
    if forced:
        why = "a second Ctrl-C" if force.is_set() else f"Serve still stopping after {grace_s:g} s"
        print(f"kvsched ray-serve: forced ({why}): stopping Ray and the engines now", file=sys.stderr, flush=True)
    try:
        ray.shutdown()  # the local cluster's processes stopped (a joined cluster: disconnected only)
    except Exception as exc:  # noqa: BLE001 - the engines' groups are killed anyway (review71: they were skipped)
        print(f"kvsched ray-serve: Ray's shutdown failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
    if started:
        merge(groups, started_groups(os.getpid()))
        left = kill_groups(groups)
        if left:
            print(f"kvsched ray-serve: process groups {left} did not stop", file=sys.stderr, flush=True)
    return 130 if forced else 0
