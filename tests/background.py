"""Start-ups launched ahead of the test that needs them run in the background: at a lower CPU priority until that
test's fixture takes them, so that they take what the tests running meanwhile leave idle, not a share of it.

Why: a `vllm serve` launched in a session of its own (`ServerSpec.own_session`, `procs.start_together`) gets, with
Linux's autogroup scheduler (on by default), a CPU share equal to the whole session's that started it: the session's
first wave of start-ups (tests/integration/early.py: four servers, three failing start-ups) held the unit tests'
process to ~2/8 of the 2 cores until they were up (test_compat's probe, 9 CPU-seconds, took 41 s), after which the
unit phase ran ~60 s at ~1.2 busy cores (helper suite69's sampler). Lowered, they take the core the unit tests leave.

`lower` sets the autogroup's nice value of a process that leads a session of its own to `NICE`; `restore` sets it
back to 0, which needs no privilege (only a value below 0 does; Linux lets an unprivileged process change an
autogroup's nice value once per 100 ms: retried). A kernel without autogroups, or a process that shares this
session's group (it would lower the tests' own), is left as it is. Children inherit the group: a server's engine core
and worker are lowered and restored with it."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from typing import Any

NICE = 10  # an autogroup's weight at nice 10 is ~1/9 of one at 0
RETRY_S = 1.0  # the unprivileged rate limit: one change per 100 ms


def _group(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _set(pid: int, nice: int) -> bool:
    """The autogroup of `pid` at `nice`; False when it could not be (or must not be: ours) changed."""
    group = _group(pid)
    if group is None or group == _group(os.getpid()):
        return False
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(nice))
            return True
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _pids(things: Any) -> Iterable[int]:
    """The process ids in what early.py and the fixtures hold: a Popen, a VllmServer (`.proc`), a procs.Started
    (`.procs`), or dicts, lists and tuples of them (anything else, and stand-ins without a pid, hold none)."""
    if isinstance(things, dict):
        things = list(things.values())
    if isinstance(things, list | tuple):
        for thing in things:
            yield from _pids(thing)
        return
    for proc in [getattr(things, "proc", None), *(getattr(things, "procs", None) or []), things]:
        pid = getattr(proc, "pid", None)
        if isinstance(pid, int) and getattr(proc, "poll", lambda: 0)() is None:
            yield pid


def lower(things: Any) -> Any:
    """`things`' processes in the background (NICE); returns `things`."""
    for pid in _pids(things):
        _set(pid, NICE)
    return things


def restore(things: Any) -> Any:
    """`things`' processes at the priority of the tests' own again (their test needs them now); returns `things`."""
    for pid in _pids(things):
        _set(pid, 0)
    return things


def nice_of(pid: int) -> int | None:
    """The autogroup nice value of `pid` (None: no autogroup to read)."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
