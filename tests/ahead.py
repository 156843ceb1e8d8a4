"""Sub-processes that unit tests wait for, started ahead of them, in the background, when the session starts
(tests/conftest.py): a test module's `AHEAD` maps "test_function_name" or "test_function_name:part" to a function
returning the `Run` (None: nothing to run here, the test skips); the test takes what it returned with `result`.

Why: those tests (a sub-process each importing torch and vLLM: ~9-15 CPU-seconds) ran in the unit phase beside the
integration package's start-ups (tests/integration/early.py), the session's one process blocked on each, which got
its share of two busy cores (test_compat's probe: ~9 CPU-seconds in 47-49 s). Started ahead, each runs while the
session's process goes on with the next tests. What a run reads of the environment is read at the session's start, as
the tests' own processes inherit it (tests/conftest.py fails a test that leaves a KVSCHED_* setting changed)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import pytest


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
        self.proc = subprocess.Popen(run.argv, env=run.env, cwd=run.cwd, stdout=self.out, stderr=self.err, text=True)

    def wait(self, timeout_s: float) -> subprocess.CompletedProcess[str]:
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
