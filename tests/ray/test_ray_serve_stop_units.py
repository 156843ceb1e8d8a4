"""kvsched/commands/ray_serve_stop.py without a cluster: Serve's graceful stop is bounded (a stop still running after
the grace, or at a second Ctrl-C, is forced: exit 130), Ray is shut down either way, and what is left of the process
groups the command's children started is killed, its own children's (the local redis-server) left to it. The real
command: tests/ray/test_ray_serve_stop.py."""

from __future__ import annotations

import contextlib
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


PRELUDE = ("import os, subprocess, sys, time\n"
           "def spawn(code, **kw):\n"
           "    return subprocess.Popen([sys.executable, '-c', os.environ['PRELUDE'] + code], **kw)\n"
           "def say(*pids): print(*pids, flush=True)\n")


def tree(script: str, **popen: Any) -> tuple[subprocess.Popen[str], list[int]]:
    """A process running `script` (PRELUDE's `spawn(code, **popen)` starts another, `say(*pids)` tells them), and the
    pids it told."""
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PRELUDE": PRELUDE}, **popen)
    return proc, [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]


def wait_members(group: int, n: int) -> None:
    deadline = time.monotonic() + 10
    while sum(g == group for _, g, _ in rs.process_table().values()) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_groups_its_childrens_children_lead_are_killed_its_childrens_own_kept() -> None:
    """A command (as `kvsched ray-serve`) with a child (as Ray's raylet) whose child leads a process group (as a
    replica's `vllm serve`) with a member of its own (its engine core), and a child leading a group itself (as the local
    redis-server). Rooted in a process of its own, the groups of other processes' children left alone: found by
    review71, rooted at pytest's own process this test SIGKILLed every group led by pytest's grandchildren (the demo's
    `vllm serve` started in the background by tests/integration/early.py, dying without a word in its log; the shared
    cluster's engines)."""
    bystander, (demo_server,) = tree(f"p = spawn({SLEEP!r}, start_new_session=True); say(p.pid); time.sleep(60)",
                                     start_new_session=True)  # as `kvsched demo` and its `vllm serve`
    engine_tree = f"spawn({SLEEP!r}); time.sleep(60)"
    raylet = f"p = spawn({engine_tree!r}, process_group=0); say(p.pid); time.sleep(60)"
    command, (redis, engine) = tree(
        f"r = spawn({SLEEP!r}, start_new_session=True); p = spawn({raylet!r}, stdout=subprocess.PIPE, text=True); "
        f"say(r.pid, p.stdout.readline()); time.sleep(60)", start_new_session=True)
    try:
        wait_members(engine, 2)
        groups = rs.started_groups(command.pid)
        assert set(groups) == {engine} and len(groups[engine]) == 2, groups
        assert rs.kill_groups(groups) == []
        assert not any(g == engine for _, g, _ in rs.process_table().values())
        assert redis in rs.process_table() and demo_server in rs.process_table()
    finally:
        for p in (command, bystander):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in (redis, demo_server):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_group_none_of_whose_recorded_members_is_left_is_not_signalled() -> None:
    """The groups are recorded at the first Ctrl-C and killed after the graceful stop (up to 10 s later): a group whose
    recorded members have all gone may hold a new process under the same number by then (Linux hands a group's number
    out again once the group is empty). Such a record (here: the group's number with another start time) kills
    nothing; the same group recorded with its members is killed. Found by review71: killed by number alone."""
    group = subprocess.Popen([sys.executable, "-c", SLEEP], start_new_session=True)
    try:
        wait_members(group.pid, 1)
        stale = {group.pid: {(group.pid, "0")}}
        assert rs.kill_groups(stale, wait_s=0.2) == [] and group.poll() is None
        assert rs.kill_groups(rs.merge(stale, {group.pid: {(group.pid, rs.process_table()[group.pid][2])}})) == []
        assert group.wait(timeout=10) == -signal.SIGKILL
    finally:
        group.kill()
        group.wait()


def test_an_error_in_rays_shutdown_still_kills_the_engines_groups(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Found by review71: an exception from ray.shutdown() ended the stop there, a traceback, the engines' process
    groups recorded before it left running (their replicas' reapers aside)."""
    import ray

    def broken() -> None:
        raise RuntimeError("GCS unreachable")

    killed: list[dict[int, set[rs.Member]]] = []
    monkeypatch.setattr(ray, "shutdown", broken)
    monkeypatch.setattr(rs.signal, "signal", lambda *_: None)
    monkeypatch.setattr(rs, "started_groups", lambda pid: {4242: {(4242, "7")}})  # (not pytest's own: see above)
    monkeypatch.setattr(rs, "kill_groups", lambda groups: killed.append(groups) or [])
    assert rs.shut_down("app", True, grace_s=5, graceful_stop=lambda *a: None) == 0
    assert killed == [{4242: {(4242, "7")}}]
    assert "Ray's shutdown failed (RuntimeError: GCS unreachable)" in capsys.readouterr().err
