"""tools/soak.py's stop rule (`soak_clients.Until`): the soak runs its seconds, then on until enough of the subject's
turns were compared with stock's, up to a cap. tests/integration/test_soak.py's short soak leans on it so that a slow
CPU still compares enough turns to judge (a fixed 30 s compared ~20 turns here, too few on a CPU a few times slower)."""

from __future__ import annotations

import pytest

pytest.importorskip("httpx")

from tests.tools_loader import load_tool  # noqa: E402


def test_the_soak_runs_its_seconds_then_until_enough_turns_were_compared_up_to_its_cap(monkeypatch) -> None:
    soak = load_tool("soak")
    clients = __import__("soak_clients")
    now = [100.0]
    monkeypatch.setattr(clients.time, "monotonic", lambda: now[0])
    log = clients.Log()
    until = clients.Until(log, seconds=10, min_compared=2, cap_s=60)
    assert not until.over()  # within its seconds
    now[0] = 111.0
    log.pair("stock", None, None, {})  # stock against stock: not a compared turn
    log.pair("subject", None, None, {})
    assert not until.over()  # past its seconds, one turn compared of two
    log.pair("subject", None, None, {})
    assert until.over()
    now[0] = 100.0
    late = clients.Until(clients.Log(), seconds=10, min_compared=2, cap_s=60)
    now[0] = 159.0
    assert not late.over()
    now[0] = 160.0
    assert late.over()  # the cap, whatever was compared
    assert soak.Until is clients.Until
