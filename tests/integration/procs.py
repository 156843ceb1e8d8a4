"""Run several commands at once (start-ups that fail are single-threaded Python imports: on a multi-core host they
overlap) and collect each one's exit code and output."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_together(commands: list[list[str]], timeout_s: float = 180,
                 envs: list[dict[str, str] | None] | None = None) -> list[Finished]:
    """`envs[i]`: the whole environment of command i (None: this process's)."""
    envs = envs or [None] * len(commands)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for cmd, env in zip(commands, envs, strict=True)]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            out.append(Finished(proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out
