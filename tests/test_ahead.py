"""tests/ahead.py: a test's sub-process started ahead gives the test what `subprocess.run` would have."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests import ahead
from tests.ahead import Run

CODE = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"


def fake_module(name: str, **runs: Run | None) -> SimpleNamespace:
    return SimpleNamespace(__name__=name, AHEAD={key: (lambda run=run: run) for key, run in runs.items()})


def items(module: SimpleNamespace, *names: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(module=module, originalname=name) for name in names]


def test_a_run_started_ahead_gives_its_output_and_code_and_check_raises_as_subprocess_run() -> None:
    mod = fake_module("fake_ahead_a", **{"test_x": Run([sys.executable, "-c", CODE]),
                                        "test_x:again": Run([sys.executable, "-c", CODE])})
    ahead.begin(items(mod, "test_x"))
    assert {"fake_ahead_a:test_x", "fake_ahead_a:test_x:again"} <= set(ahead._started)
    done = ahead.result(mod, "test_x", timeout_s=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert "fake_ahead_a:test_x" not in ahead._started  # taken once
    with pytest.raises(subprocess.CalledProcessError):
        ahead.result(mod, "test_x:again", timeout_s=60, check=True)


def test_a_run_not_started_ahead_runs_when_taken_and_a_deselected_tests_is_not_started() -> None:
    mod = fake_module("fake_ahead_b", test_y=Run([sys.executable, "-c", CODE]), test_z=Run(["false"]), test_n=None)
    ahead.begin(items(mod, "test_other", "test_n"))
    assert not [k for k in ahead._started if k.startswith("fake_ahead_b:")]
    done = ahead.result(mod, "test_y", timeout_s=60)
    assert (done.returncode, done.stdout) == (3, "out\n")
    with pytest.raises(RuntimeError, match="nothing to run"):
        ahead.result(mod, "test_n", timeout_s=60)


def test_a_run_past_its_timeout_is_killed_and_raises_and_an_untaken_one_is_stopped() -> None:
    mod = fake_module("fake_ahead_c", test_s=Run([sys.executable, "-c", "import time; time.sleep(60)"]),
                      test_t=Run([sys.executable, "-c", "import time; time.sleep(60)"]))
    ahead.begin(items(mod, "test_s", "test_t"))
    proc = ahead._started["fake_ahead_c:test_s"].proc
    with pytest.raises(subprocess.TimeoutExpired):
        ahead.result(mod, "test_s", timeout_s=0.5)
    assert proc.poll() is not None
    untaken = ahead._started.pop("fake_ahead_c:test_t")
    saved = dict(ahead._started)  # the session's own runs stay for their tests
    ahead._started.clear()
    ahead._started["fake_ahead_c:test_t"] = untaken
    try:
        ahead.stop_untaken()
    finally:
        ahead._started.update(saved)
    assert untaken.proc.poll() is not None
