"""Run several commands at once (start-ups that fail are single-threaded Python imports: on a multi-core host they
overlap) and collect each one's exit code and output."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Started:
    """Commands spawned by `start_together`, their output going to temporary files (a pipe nobody reads yet could fill
    and stall a command that is left to run while other tests do)."""

    procs: list[subprocess.Popen[bytes]]
    outputs: list[tuple[IO[bytes], IO[bytes]]]


def start_together(commands: list[list[str]], envs: list[dict[str, str] | None] | None = None) -> Started:
    """`envs[i]`: the whole environment of command i (None: this process's)."""
    envs = envs or [None] * len(commands)
    outputs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in commands]
    procs = [subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
             for cmd, env, (out, err) in zip(commands, envs, outputs, strict=True)]
    return Started(procs, outputs)


def collect(started: Started, timeout_s: float = 180) -> list[Finished]:
    """Wait for every command (each within `timeout_s` from now); one still running after is killed, and so is every
    command when this raises."""
    out = []
    try:
        for proc, (stdout, stderr) in zip(started.procs, started.outputs, strict=True):
            proc.wait(timeout=timeout_s)
            stdout.seek(0)
            stderr.seek(0)
            out.append(Finished(proc.returncode, stdout.read().decode(errors="replace"),
                                stderr.read().decode(errors="replace")))
    finally:
        stop(started)
    return out


def stop(started: Started) -> None:
    for proc in started.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for stdout, stderr in started.outputs:
        stdout.close()
        stderr.close()


def run_together(commands: list[list[str]], timeout_s: float = 180,
                 envs: list[dict[str, str] | None] | None = None) -> list[Finished]:
    """`envs[i]`: the whole environment of command i (None: this process's)."""
    return collect(start_together(commands, envs), timeout_s)
