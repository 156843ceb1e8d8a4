"""Sub-processes that unit tests wait for, started ahead of them, in the background, when the session starts
(tests/conftest.py): a test module's `AHEAD` maps "test_function_name" or "test_function_name:part" to a function
returning the `Run` (None: nothing to run here, the test skips); the test takes what it returned with `result`.

Why: those tests (a sub-process each importing torch and vLLM: ~9-15 CPU-seconds) ran in the unit phase beside the
integration package's start-ups (tests/integration/early.py), the session's one process blocked on each, which got
its share of two busy cores (test_compat's probe: ~9 CPU-seconds in 47-49 s). Started ahead, each runs while the
session's process goes on with the next tests. What a run reads of the environment is read at the session's start, as
the tests' own processes inherit it (tests/conftest.py fails a test that leaves a KVSCHED_* setting changed).
Each run leads a session of its own, in the background (tests/background.py: a lower CPU priority, so that the unit
tests go on at one core's pace) until its test takes it, and the tests that take one run after the other tests of
their directory (`takers_last`), so that their runs have that directory's other tests' time to finish."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import pytest

from tests import background


@dataclass(frozen=True)
class Run:
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None


class _Started:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.out: IO[str] = tempfile.TemporaryFile("w+")  # files, not pipes: nobody reads them until the test
        self.err: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(run.argv, env=run.env, cwd=run.cwd, stdout=self.out, stderr=self.err, text=True,
                                     start_new_session=True)
        background.lower(self.proc)

    def wait(self, timeout_s: float) -> subprocess.CompletedProcess[str]:
        background.restore(self.proc)  # its test waits for it now
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.out.seek(0)
            self.err.seek(0)
            out, err = self.out.read(), self.err.read()
            self.out.close()
            self.err.close()
        return subprocess.CompletedProcess(self.run.argv, self.proc.returncode, out, err)


_started: dict[str, _Started] = {}  # by "module:key"


def _takes_a_run(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    name = getattr(item, "originalname", None)
    return any(key.split(":")[0] == name for key in getattr(module, "AHEAD", {}))


def takers_last(items: list[pytest.Item]) -> None:
    """Each test that takes a run (its module's `AHEAD`) after the other tests of its directory, in their order: the
    tests before it give its run time to finish (a module-scoped fixture it used would be set up again for it; none
    of today's uses one)."""
    def directory(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0].rpartition("/")[0]

    last: dict[str, int] = {directory(item): n for n, item in enumerate(items)}
    moved: dict[int, list[pytest.Item]] = {}
    for item in items:
        if _takes_a_run(item):
            moved.setdefault(last[directory(item)], []).append(item)
    if not moved:
        return
    takers = {id(item) for group in moved.values() for item in group}
    out: list[pytest.Item] = []
    for n, item in enumerate(items):
        if id(item) not in takers:
            out.append(item)
        out.extend(moved.get(n, []))
    items[:] = out


def begin(items: list[pytest.Item]) -> None:
    """Starts the `AHEAD` runs of these items' tests (once per session)."""
    names = {(item.module.__name__, item.originalname) for item in items if getattr(item, "module", None) is not None}
    modules = {item.module.__name__: item.module for item in items if getattr(item, "module", None) is not None}
    for mod_name, module in modules.items():
        ahead: dict[str, Callable[[], Run | None]] = getattr(module, "AHEAD", {})
        for key, make in ahead.items():
            full = f"{mod_name}:{key}"
            if (mod_name, key.split(":")[0]) in names and full not in _started and (run := make()) is not None:
                _started[full] = _Started(run)


def result(module: Any, key: str, timeout_s: float, check: bool = False) -> subprocess.CompletedProcess[str]:
    """What `module.AHEAD[key]`'s run printed and returned (waited for at most `timeout_s` from now; run now if it
    was not started ahead), as `subprocess.run(..., capture_output=True, text=True)` gives it."""
    started = _started.pop(f"{module.__name__}:{key}", None)
    if started is not None:
        done = started.wait(timeout_s)
    else:
        run = module.AHEAD[key]()
        if run is None:
            raise RuntimeError(f"{module.__name__}.AHEAD[{key!r}] has nothing to run here")
        done = subprocess.run(run.argv, env=run.env, cwd=run.cwd, capture_output=True, text=True, timeout=timeout_s)
    if check:
        done.check_returncode()
    return done


def stop_untaken() -> None:
    """Kills the runs no test took (a session stopped before their tests ran)."""
    while _started:
        _, started = _started.popitem()
        if started.proc.poll() is None:
            started.proc.kill()
        started.proc.wait()
        started.out.close()
        started.err.close()
