"""kvsched/commands/ray_serve_stop.py without a cluster: Serve's graceful stop is bounded (a stop still running after
the grace, or at a second Ctrl-C, is forced: exit 130), Ray is shut down either way, and what is left of the process
groups the command's children started is killed, its own children's (the local redis-server) left to it. The real
command: tests/ray/test_ray_serve_stop.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from kvsched.commands import ray_serve_stop as rs

HANDLERS: dict[int, Any] = {}  # the signal handlers shut_down set (not the test process's own)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import ray

    calls: list[str] = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    HANDLERS.clear()
    monkeypatch.setattr(rs.signal, "signal", lambda sig, handler: HANDLERS.__setitem__(sig, handler))
    return calls


def test_a_graceful_stop_within_the_grace_is_exit_0(no_ray: list[str]) -> None:
    stopped: list[tuple[str, bool]] = []
    assert rs.shut_down("app", False, grace_s=5, graceful_stop=lambda *a: stopped.append(a)) == 0
    assert stopped == [("app", False)] and no_ray == ["ray.shutdown"]


def test_a_stop_past_the_grace_is_forced(no_ray: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    hang = threading.Event()
    began = time.monotonic()
    assert rs.shut_down("app", False, grace_s=0.3, graceful_stop=lambda *a: hang.wait(30)) == 130
    assert time.monotonic() - began < 10 and no_ray == ["ray.shutdown"]
    assert "forced (Serve still stopping after 0.3 s)" in capsys.readouterr().err
    hang.set()


def test_a_second_ctrl_c_forces_it(no_ray: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    hang = threading.Event()

    def stuck(*_: object) -> None:
        HANDLERS[signal.SIGINT](signal.SIGINT, None)  # the operator's second Ctrl-C
        hang.wait(30)

    began = time.monotonic()
    assert rs.shut_down("app", False, grace_s=60, graceful_stop=stuck) == 130
    assert time.monotonic() - began < 10 and "forced (a second Ctrl-C)" in capsys.readouterr().err
    hang.set()


def test_the_groups_its_childrens_children_lead_are_killed_its_childrens_own_kept() -> None:
    """A child (as Ray's raylet) whose child leads a process group (as a replica's `vllm serve`) with a member of its
    own (its engine core); and a child leading a group itself (as the local redis-server)."""
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(60)\"]); time.sleep(60)'], "
              "process_group=0)\n"
              "print(p.pid, flush=True); time.sleep(60)\n")
    raylet = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    redis = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        engine = int(raylet.stdout.readline())  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while sum(g == engine for _, g in rs.process_table().values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        groups = rs.started_groups(os.getpid())
        assert engine in groups and redis.pid not in groups
        assert rs.kill_groups(groups) == []
        assert not any(g == engine for _, g in rs.process_table().values())
        assert redis.poll() is None
    finally:
        for p in (raylet, redis):
            p.kill()
            p.wait()
