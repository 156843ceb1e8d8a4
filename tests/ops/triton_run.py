"""The Triton interpreter checks (triton_checks.py) as a background process, started when the suite is collected.

Why: the interpreter runs for ~35 s on one core (an AVX2-only EPYC), while the in-process unit tests collected before
it leave the machine's other core idle; started at collection, its wall time hides under theirs (`make test` on 2 cores
was at its 15-minute limit). The test then waits for it and checks exactly what it checked when it ran it itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

TEST_NAME = "test_triton_interpreter.py::test_triton_kernels_match_the_reference_in_the_interpreter"


class ChecksRun:
    """One run of triton_checks.py under TRITON_INTERPRET=1 (set before triton is imported, hence its own process)."""

    def __init__(self) -> None:
        self.out: IO[str] = tempfile.TemporaryFile("w+")  # files, not pipes: no one reads them until the end
        self.err: IO[str] = tempfile.TemporaryFile("w+")
        script = Path(__file__).with_name("triton_checks.py")
        self.proc = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, TRITON_INTERPRET="1"),
                                     stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout_s: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it ends; killed past `timeout_s`."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self.out.seek(0)
        self.err.seek(0)
        return code, self.out.read(), self.err.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_run: ChecksRun | None = None


def checks_run() -> ChecksRun:
    """The run started at collection, else one started now (the test alone, or collected without the hook)."""
    global _run
    if _run is None:
        _run = ChecksRun()
    return _run


def stop() -> None:
    """At the session's end: a run whose test never ran (deselected late, -x) is not left behind."""
    if _run is not None:
        _run.stop()
