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


SLEEP = "import time; time.sleep(60)"
ENGINE = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEP!r}]); time.sleep(60)"
RAYLET = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {ENGINE!r}], process_group=0); "
          "print('engine', p.pid, flush=True); time.sleep(60)")
LEADER = ("import subprocess, sys, time; r = subprocess.Popen([sys.executable, '-c', {sleep!r}], "
          "start_new_session=True); print({name!r}, r.pid, flush=True); time.sleep(60)")
COMMAND = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {RAYLET!r}]); " + LEADER.format(
    sleep=SLEEP, name="redis")


def test_the_groups_its_childrens_children_lead_are_killed_its_childrens_own_kept() -> None:
    """A command (as `kvsched ray-serve`) with a child (as Ray's raylet) whose child leads a process group (as a
    replica's `vllm serve`) with a member of its own (its engine core), and a child leading a group itself (as the
    local redis-server). Only the command's tree is searched: a group led by a grandchild of the test process outside
    it (as a background `kvsched demo`'s `vllm serve`: this test's first version searched from the test process and
    killed the demo's two servers in two full runs) is left running."""
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True, process_group=0)
    bystander = subprocess.Popen([sys.executable, "-c", LEADER.format(sleep=SLEEP, name="other")],
                                 stdout=subprocess.PIPE, text=True, process_group=0)
    pids: dict[str, int] = {}
    try:
        for out in (command.stdout, command.stdout, bystander.stdout):
            name, pid = out.readline().split()  # type: ignore[union-attr]
            pids[name] = int(pid)
        deadline = time.monotonic() + 10
        while sum(g == pids["engine"] for _, g in rs.process_table().values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        groups = rs.started_groups(command.pid)
        assert pids["engine"] in groups and pids["redis"] not in groups and pids["other"] not in groups, (pids, groups)
        assert rs.kill_groups(groups) == []
        table = rs.process_table()
        assert not any(g == pids["engine"] for _, g in table.values())
        assert pids["redis"] in table and pids["other"] in table  # the command's own child; the group outside it
    finally:
        for group in [command.pid, bystander.pid, *pids.values()]:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (command, bystander):
            p.wait()
