"""tests/background.py: start-ups launched ahead run at a lower CPU priority (their session's autogroup) until their
test takes them; tests/ahead.py's runs are started so, and the tests taking them run after their directory's others."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import ahead, background
from tests.ahead import Run

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def autogroups() -> None:
    if background.nice_of(os.getpid()) is None:
        pytest.skip("no autogroup scheduler in this kernel (/proc/PID/autogroup)")


def test_a_process_leading_its_own_session_is_lowered_and_restored_and_one_sharing_ours_is_left() -> None:
    autogroups()
    own = subprocess.Popen(SLEEP, start_new_session=True)
    ours = subprocess.Popen(SLEEP)
    try:
        assert background.lower({"a": SimpleNamespace(proc=own), "b": [ours, SimpleNamespace(proc=object())]})
        assert background.nice_of(own.pid) == background.NICE
        assert background.nice_of(ours.pid) == background.nice_of(os.getpid()) == 0  # the tests' own group
        background.restore((SimpleNamespace(procs=[own]), Path("x")))
        assert background.nice_of(own.pid) == 0
    finally:
        for proc in (own, ours):
            proc.kill()
            proc.wait()
    background.restore(own)  # exited: nothing to do


def test_a_run_started_ahead_is_in_the_background_until_its_test_takes_it() -> None:
    autogroups()
    mod = SimpleNamespace(__name__="fake_background", AHEAD={"test_b": lambda: Run(SLEEP)})
    ahead.begin([SimpleNamespace(module=mod, originalname="test_b")])
    proc = ahead._started["fake_background:test_b"].proc
    assert os.getsid(proc.pid) == proc.pid and background.nice_of(proc.pid) == background.NICE
    with pytest.raises(subprocess.TimeoutExpired):
        ahead.result(mod, "test_b", timeout_s=0.5)  # taken: restored, waited for, killed at its timeout
    assert proc.poll() is not None


def test_the_tests_taking_a_run_go_after_their_directorys_others_in_their_order() -> None:
    mod = SimpleNamespace(AHEAD={"test_t": None, "test_u:part": None})
    other = SimpleNamespace(AHEAD={})

    def item(nodeid: str, module: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(nodeid=nodeid, module=module, originalname=nodeid.rsplit("::", 1)[1].split("[")[0])

    items = [item("tests/a/test_m.py::test_t", mod), item("tests/a/test_m.py::test_x", mod),
             item("tests/a/test_m.py::test_u[1]", mod), item("tests/a/test_n.py::test_y", other),
             item("tests/b/test_o.py::test_t", other), item("tests/test_p.py::test_z", other)]
    ahead.takers_last(items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [
        "tests/a/test_m.py::test_x", "tests/a/test_n.py::test_y", "tests/a/test_m.py::test_t",
        "tests/a/test_m.py::test_u[1]", "tests/b/test_o.py::test_t", "tests/test_p.py::test_z"]


def test_a_tree_lowers_the_sessions_its_root_starts_later_until_restored() -> None:
    autogroups()
    code = ("import subprocess, sys, time; time.sleep(0.3); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "time.sleep(60)")
    root = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        tree = background.Tree(root.pid, period_s=0.05)
        deadline = time.monotonic() + 30
        # (a child that has not called setsid yet shares the root's autogroup, already lowered: wait for its own)
        while (len(kids := background.descendants(root.pid)[1:]) < 1 or os.getsid(kids[0]) != kids[0]
               or background.nice_of(kids[0]) != background.NICE):
            assert time.monotonic() < deadline, kids
            time.sleep(0.05)
        assert background.nice_of(root.pid) == background.NICE
        tree.restore()
        assert background.nice_of(root.pid) == background.nice_of(kids[0]) == 0
    finally:
        for pid in reversed(background.descendants(root.pid)):
            os.kill(pid, 9)
        root.wait()


def test_a_trees_sweep_ends_with_its_root() -> None:
    """Once the root exits and is reaped its number may be another process's: the sweep stops (it went on lowering
    whatever held that number's sessions)."""
    root = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], start_new_session=True)
    tree = background.Tree(root.pid, period_s=0.05)
    root.wait()
    tree._thread.join(timeout=10)
    assert not tree._thread.is_alive()
    tree.restore()
