"""KVSCHED_TRACE's file (decision_trace.py) on its own: private, bounded, and naming no client's session id. Found by
review: created 0644, with no size limit, holding every client's raw session ids."""

from __future__ import annotations

import json
import os
import stat

import pytest

from kvsched.adapters.vllm.decision_trace import DecisionTrace
from kvsched.adapters.vllm.settings_check import engine_setting_errors, known_setting_names


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_new_trace_file_is_its_owners_only(tmp_path):
    old = os.umask(0o022)
    try:
        trace = DecisionTrace(str(tmp_path / "t.jsonl"))
    finally:
        os.umask(old)
    trace.write({"t": 0.0, "session": "s", "op": "start"})
    trace.close()
    assert stat.S_IMODE(os.stat(tmp_path / "t.jsonl").st_mode) == 0o600


def test_sessions_are_named_by_a_keyed_hash_never_as_sent(tmp_path):
    path = tmp_path / "t.jsonl"
    trace = DecisionTrace(str(path))
    for sid in ("secret-session-A", "secret-session-A", "b"):
        assert trace.write({"t": 1.0, "session": sid, "op": "pin", "blocks": 3})
    trace.write({"t": 2.0, "session": "b", "op": "release", "reason": "pressure", "blocks": 3,
                 "scores": [(0.5, "secret-session-A", 9, 1.0, 2.0, 0), (0.7, "b", 3, 1.0, 0.0, 0)]})
    trace.close()
    assert "secret-session-A" not in path.read_text()
    a, a2, b, release = rows(path)
    assert a["session"] == a2["session"] != b["session"] == release["session"] and len(a["session"]) == 16
    assert [s[1] for s in release["scores"]] == [a["session"], b["session"]] and release["scores"][0][2] == 9
    other = DecisionTrace(str(tmp_path / "u.jsonl"))  # another engine's trace: another key
    assert other.session_id("secret-session-A") != a["session"]


def test_the_trace_stops_at_its_size_limit_counting_what_the_file_held(tmp_path, monkeypatch, caplog):
    path = tmp_path / "t.jsonl"
    path.write_text("x" * 500 + "\n")  # an earlier engine's lines
    monkeypatch.setenv("KVSCHED_TRACE_MAX_MB", "0.001")  # 1,000 bytes
    trace = DecisionTrace(str(path))
    written = 0
    for _ in range(100):  # bounded: a trace without a limit would fill the disk
        if not trace.write({"t": 1.0, "session": "s", "op": "start", "cached": 0, "prompt": 10}):
            break
        written += 1
    assert 0 < written < 10 and os.path.getsize(path) <= 1000
    assert not trace.write({"t": 2.0, "session": "s", "op": "start"})  # stopped for good
    assert sum("KVSCHED_TRACE_MAX_MB" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert all(line.startswith("{") for line in path.read_text().splitlines()[1:])  # whole lines only


@pytest.mark.parametrize("value", ["0", "-1", "lots", "inf"])
def test_a_malformed_size_limit_is_refused_before_the_engine_starts(monkeypatch, value):
    monkeypatch.setenv("KVSCHED_TRACE_MAX_MB", value)
    assert [e for e in engine_setting_errors() if e.startswith("KVSCHED_TRACE_MAX_MB=")]
    assert "KVSCHED_TRACE_MAX_MB" in known_setting_names()


def test_a_row_naming_its_session_key_is_hashed_with_its_tenant_and_salt(tmp_path):
    """What the rows could carry instead of the bare id (a change in session_pins.py): the key, whose tenant and salt
    then tell two tenants' sessions of one id apart, still never written as sent."""
    from kvsched.core.sessions import SessionId, SessionKey

    path = tmp_path / "t.jsonl"
    trace = DecisionTrace(str(path))
    a, b = SessionKey(SessionId("same"), None, "tenant-a"), SessionKey(SessionId("same"), None, "tenant-b")
    for key in (a, b, a):
        trace.write({"t": 0.0, "session": key, "op": "start"})
    trace.close()
    first, second, third = (r["session"] for r in rows(path))
    assert first == third != second and "same" not in path.read_text() and "tenant-a" not in path.read_text()
