"""KVSCHED_TRACE on vLLM's real scheduler (harness.py): a trace whose writes fail stops, the engine serves on."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import PrefillCounts, RequestFactory, run_until_idle  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def _turns(s, n=3):
    f, counts, history = RequestFactory(BLOCK), PrefillCounts(), list(range(100, 180))
    for i in range(n):
        s.add_request(f.make(history, 4, session_id="a"))
        run_until_idle(s, counts=counts)
        history = history + [7] * 3 + list(range(300 + 20 * i, 320 + 20 * i))
    return counts


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a file whose writes fail: ENOSPC)")
def test_a_trace_whose_writes_fail_stops_and_the_engine_serves_on(harness_cfg, monkeypatch, caplog):
    """Found by review: with KVSCHED_TRACE on a full disk (/dev/full here) the first decision's write raised out of
    the scheduler's hooks and the engine core died."""
    monkeypatch.setenv("KVSCHED_TRACE", "/dev/full")
    s = sched(harness_cfg)
    counts = _turns(s)
    assert counts.cached_tokens >= 2 * 80  # every later turn served from the session's pin
    assert s.kvsched._trace is None and s.kvsched.pins.before_apply is None
    assert sum("decision trace" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_working_trace_has_a_line_per_decision(harness_cfg, monkeypatch, tmp_path):
    path = tmp_path / "t.jsonl"
    monkeypatch.setenv("KVSCHED_TRACE", str(path))
    s = sched(harness_cfg)
    _turns(s)
    s.kvsched._trace.close()
    ops = [json.loads(line)["op"] for line in path.read_text().splitlines()]
    assert ops.count("start") == 3 and ops.count("pin") == 3


def test_one_id_under_two_salts_is_two_sessions_in_the_trace(harness_cfg, monkeypatch, tmp_path):
    """The rows name a session by its whole key (id, tenant, salt, branch), hashed: with the id alone, two tenants'
    (or salts') sessions of one id shared a name once the trace hashed ids (found by review)."""
    path = tmp_path / "t.jsonl"
    monkeypatch.setenv("KVSCHED_TRACE", str(path))
    s = sched(harness_cfg)
    f, counts = RequestFactory(BLOCK), PrefillCounts()
    for salt in ("s1", "s2"):
        s.add_request(f.make(list(range(100, 180)), 4, session_id="a", cache_salt=salt))
        run_until_idle(s, counts=counts)
    s.kvsched._trace.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    starts = [r["session"] for r in rows if r["op"] == "start"]
    pins = [r["session"] for r in rows if r["op"] == "pin"]
    assert len(starts) == 2 and starts[0] != starts[1]
    assert sorted(pins) == sorted(starts)  # each session's pin is named as its start
