"""kvsched/bench/router_real.py's Killer without a cluster: it kills slot 0's engine only while that engine runs."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from kvsched.bench import router_real


def test_a_listed_engine_that_is_gone_is_not_killed_by_its_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose engine is gone (not replaced yet) still lists its engine_pid, which may be another process's
    number by now: the Killer records that it found no engine to kill, and signals nothing. Found by review71: it
    SIGKILLed slot 0's listed engine_pid whatever the engine's state."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(router_real, "replicas", lambda base: [
        {"slot": 0, "engine_pid": bystander.pid, "engine_alive": False, "replica_id": "gone"}])
    stopper = SimpleNamespace(stop_at=float("inf"))
    try:
        killer = router_real.Killer("http://ingress", None, 0.0, 0.0, 0.0)  # type: ignore[arg-type]
        killer(time.monotonic(), stopper)
        assert bystander.poll() is None and "no replica in slot 0 with its engine running" in str(killer.error)
    finally:
        bystander.kill()
        bystander.wait()
