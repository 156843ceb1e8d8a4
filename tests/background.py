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


def descendants(root: int) -> list[int]:
    """`root` and every live process under it (from /proc's parent ids), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Tree:
    """A process whose descendants start sessions of their own (`kvsched demo`: its `vllm serve` children, each in
    its own session and so its own autogroup, at nice 0): every session under it lowered, looked at every `period_s`
    on a thread of this process, until `restore`."""

    def __init__(self, root: int, period_s: float = 0.5) -> None:
        import threading

        self.root, self.period_s, self.started = root, period_s, _start_time(root)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sweep, name="background-tree", daemon=True)
        self._thread.start()

    def _alive(self) -> bool:
        """The root still runs (its number not handed to another process since: found by review71, a sweep outliving
        the demo could lower a stranger's sessions)."""
        return self.started is not None and _start_time(self.root) == self.started

    def _sweep(self) -> None:
        while not self._done.is_set() and self._alive():
            for pid in descendants(self.root):
                if _leads_session(pid) and nice_of(pid) != NICE:
                    _set(pid, NICE)
            self._done.wait(self.period_s)

    def restore(self) -> None:
        """Stops lowering; every session under the root at the tests' priority again."""
        self._done.set()
        self._thread.join()
        if not self._alive():
            return
        for pid in descendants(self.root):
            if _leads_session(pid):
                _set(pid, 0)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _leads_session(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


def nice_of(pid: int) -> int | None:
    """The autogroup nice value of `pid` (None: no autogroup to read)."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
