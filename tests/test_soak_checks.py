"""tools/soak_sessions.py's own checks, without a server: the first request under a cache_salt may get no cached token
(a failure with the salt and session), a salt's later requests may; a turn's tenant is one of the server's keys; an
edited history keeps its length and its last message."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("httpx")

from tests.tools_loader import load_tool  # noqa: E402


def soak_with(log):
    load_tool("soak")  # puts tools/ on sys.path for its sibling modules
    sessions, clients = __import__("soak_sessions"), __import__("soak_clients")
    target = clients.Target("kv", "http://127.0.0.1:9", "tiny", "k0", "admin", True, ("k0", "k1"))
    return sessions.Soak(target, None, log), clients


def test_a_fresh_salts_first_request_with_cached_tokens_fails_and_a_later_one_does_not() -> None:
    log = load_tool("soak").Log()
    soak, clients = soak_with(log)
    assert soak.salts.claim("s1") and not soak.salts.claim("s1") and not soak.salts.claim(None)
    reply = clients.Reply([1], [0.0], [{}], "x", 100, cached=32)
    soak.check_cached(reply, False, "s1", "sid")  # the salt's second request: may hit its own blocks
    assert not log.failures
    soak.check_cached(reply, True, "s2", "sid")
    assert [f["what"] for f in log.failures] == ["kv: the first request under salt s2 got 32 cached tokens "
                                                 "(another salt's KV)"]
    soak.check_cached(clients.Reply([1], [0.0], [{}], "x", 100, cached=0), True, "s3", "sid")
    soak.check_cached(clients.Reply([1], [0.0], [{}], "x", 100), True, "s4", "sid")  # not reported: not judged
    assert len(log.failures) == 1
    assert log.counts["kv:salt_fresh_checked"] == 2 and log.counts["kv:cached_unreported"] == 1


def test_tenants_and_edits() -> None:
    soak, _ = soak_with(load_tool("soak").Log())
    assert [soak.kvsched.as_tenant(i).key for i in range(3)] == ["k0", "k1", "k0"]
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
               {"role": "assistant", "content": "a"}, {"role": "tool", "content": "t"}]
    edited = soak.edit(random.Random(0), history)
    assert len(edited) == 4 and edited[-1] == history[-1] and edited[0] == history[0]
    assert edited[1]["content"].startswith("edited: ") and history[1]["content"] == "u"


def test_a_turn_beside_its_sessions_delete_that_raises_is_a_reported_failure(monkeypatch) -> None:
    """The turn of a session whose DELETE runs meanwhile is sent on a thread of its own: an error there (a reset
    connection) must be the soak's failure, not a line on stderr and a conversation that quietly ends (review70)."""
    import httpx

    log = load_tool("soak").Log()
    soak, clients = soak_with(log)
    sessions = __import__("soak_sessions")

    def reset(*_args, **_kwargs):
        raise httpx.ReadError("Connection reset by peer")

    monkeypatch.setattr(sessions, "chat", reset)
    monkeypatch.setattr(sessions, "delete", lambda *_args: 200)
    conv = sessions.Conv(soak.kvsched, "sid", {}, None)
    with httpx.Client() as client:
        assert soak.turn(client, random.Random(0), [{"role": "user", "content": "hi"}], {}, conv, True, 4) is None
    assert [f["what"] for f in log.failures] == ["kv: a turn beside its session's DELETE raised ReadError: "
                                                 "Connection reset by peer"]
