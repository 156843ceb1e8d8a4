"""A TTL or end flag in every spelling JSON and HTTP allow, through kvsched's middleware (the fake vLLM of
test_middleware): the engine receives exactly the Python float / bool the mypyc-compiled `TurnHints(ttl_s: float |
None, end: bool)` takes, or the client gets a 400 naming the field. tests/integration/test_hostile_clients.py sends
the TTL spellings to a real `vllm serve`."""

from __future__ import annotations

import json

import pytest

from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from kvsched.core.sessions import validate_end_flag
from tests.adapters.vllm.test_middleware import FakeVllm, call

HEADERS = [("Authorization", "Bearer secret"), ("Content-Type", "application/json")]


def _send(xargs: bytes = b"", headers=()) -> tuple[int, dict, dict | None]:
    """-> (status, answer, the vllm_xargs vLLM got)."""
    app = FakeVllm()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]%s}' % (
        b', "vllm_xargs": {"session_id": "s", %s}' % xargs if xargs else b"")
    status, answer = call(KVSchedMiddleware(app), app, "POST", "/v1/chat/completions", body, [*HEADERS, *headers])
    forwarded = json.loads(app.calls[0][1])["vllm_xargs"] if app.calls else None
    return status, answer, forwarded


@pytest.mark.parametrize("literal, ttl", [(b"30", 30.0), (b"30.0", 30.0), (b"3e1", 30.0), (b'"1.5"', 1.5),
                                          (b"1000000000000000000000000000000", 1e30), (b"0", 0.0)])
def test_a_body_ttl_reaches_the_engine_as_a_float(literal, ttl):
    status, _, xargs = _send(b'"ttl_s": %s' % literal)
    assert status == 200 and type(xargs["ttl_s"]) is float and xargs["ttl_s"] == ttl


@pytest.mark.parametrize("literal", [b"true", b"1e400", b"-1", b"[30]", b'"0x1e"', b'"1_000"', b"null"])
def test_a_body_ttl_that_is_no_number_of_seconds_is_a_400(literal):
    status, answer, _ = _send(b'"ttl_s": %s' % literal)
    if literal == b"null":  # JSON null: no TTL given
        assert status == 200
        return
    assert status == 400 and answer["error"]["param"] == "vllm_xargs.ttl_s", answer


@pytest.mark.parametrize("value, ttl", [("1.5", 1.5), ("3e1", 30.0), ("30", 30.0), ("0x1e", None), ("inf", None),
                                        ("1,5", None), ("true", None)])
def test_a_header_ttl_is_parsed_once_into_a_float_or_refused(value, ttl):
    status, answer, xargs = _send(headers=[("X-Session-Id", "s"), ("X-Session-TTL", value)])
    if ttl is None:
        assert status == 400 and answer["error"]["param"] == "x-session-ttl", answer
    else:
        assert status == 200 and type(xargs["ttl_s"]) is float and xargs["ttl_s"] == ttl


@pytest.mark.parametrize("literal, end", [(b"1", True), (b"0", False), (b"true", True), (b'"yes"', True),
                                          (b"1.0", None), (b"2", None), (b'"maybe"', None)])
def test_an_end_flag_reaches_the_engine_as_a_bool_or_is_a_400(literal, end):
    status, answer, xargs = _send(b'"session_end": %s' % literal)
    if end is None:
        assert status == 400 and answer["error"]["param"] == "vllm_xargs.session_end", answer
    else:  # the engine reads what is forwarded with the same validator (compat._hints), into a bool
        assert status == 200 and validate_end_flag(xargs["session_end"]) is end
