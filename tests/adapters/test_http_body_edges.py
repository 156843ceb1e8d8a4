"""The request-body readers at their edges (review69): a Content-Length written with leading zeros, a plus sign or
white space, sent twice (agreeing or not) or beside `Transfer-Encoding: chunked`; `Content-Encoding: identity`; an
empty POST; a body exactly at the limit and one byte over. Through the engine middleware's reader
(`vllm/http_io.read_body`) and the Ray ingress's (`ray/ingress_body.RequestBody`), which share `http_body.read_limited`
and must answer alike. And what review69 found: on a connection that closes after the answer, the middleware drained a
408's body (a client that stopped sending) for up to `http_body.DRAIN_MAX_S` more before answering, where the 408
closes the connection unread (as the ingress's does)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from kvsched.adapters.ray.ingress_body import RequestBody
from kvsched.adapters.ray.requests import BadRequest
from kvsched.adapters.vllm.http_io import HttpError, read_body
from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from tests.adapters.vllm.test_middleware import FakeVllm
from tests.asgi_parts import body_parts

LIMIT = 100


def middleware_read(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes | str]:
    """(200, the body) or (the refusal's status, its message), read by the engine middleware's reader."""
    _, receive = body_parts(parts)
    try:
        return 200, asyncio.run(read_body({"headers": headers}, receive, limit=LIMIT, timeout_s=5.0))
    except HttpError as exc:
        return exc.status, exc.body["error"]["message"]


def ingress_read(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes | str]:
    """The same by the Ray ingress's reader (Starlette's headers: the first of a repeated name)."""
    _, receive = body_parts(parts)
    first: dict[str, str] = {}
    for k, v in headers:
        first.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    request = SimpleNamespace(scope={"headers": headers, "http_version": "1.1"}, receive=receive, headers=first)
    try:
        return 200, asyncio.run(RequestBody(request).read(LIMIT, 5.0))
    except BadRequest as exc:
        return exc.status, exc.message


def sent_to(sent: list[dict[str, Any]]) -> Any:
    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    return send


READERS = {"middleware": middleware_read, "ingress": ingress_read}
BODY = b'{"model": "m"}'


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("length", [b"014", b"+14", b" 14 ", b"0000000000000000000014"])
def test_a_content_length_with_zeros_a_sign_or_spaces_reads_the_body(reader, length):
    assert READERS[reader]([BODY], [(b"content-length", length)]) == (200, BODY)


@pytest.mark.parametrize("reader", READERS)
def test_two_content_lengths_or_one_beside_chunked_never_let_more_than_the_limit_through(reader):
    read = READERS[reader]
    assert read([BODY], [(b"content-length", b"14"), (b"content-length", b"14")]) == (200, BODY)
    # the first says little, the body is over: refused as it is read, whatever was declared
    status, message = read([b"x" * 60, b"x" * 60], [(b"content-length", b"14"), (b"content-length", b"120")])
    assert status == 413 and f"limit of {LIMIT} bytes" in str(message), message
    status, _ = read([b"x" * 60] * 2, [(b"transfer-encoding", b"chunked"), (b"content-length", b"14")])
    assert status == 413
    status, message = read([BODY], [(b"content-length", b"%d" % (LIMIT + 1))])  # declared past it: not read
    assert status == 413 and str(LIMIT + 1) in str(message) and str(LIMIT) in str(message), message


@pytest.mark.parametrize("reader", READERS)
def test_an_empty_post_a_body_at_the_limit_and_one_byte_over(reader):
    read = READERS[reader]
    assert read([b""], []) == (200, b"")
    assert read([b""], [(b"content-length", b"0")]) == (200, b"")
    assert read([b"x" * 40, b"x" * 60], [(b"transfer-encoding", b"chunked")]) == (200, b"x" * LIMIT)
    assert read([b"x" * LIMIT], [(b"content-length", b"%d" % LIMIT)]) == (200, b"x" * LIMIT)
    status, message = read([b"x" * 40, b"x" * 61], [(b"transfer-encoding", b"chunked")])
    assert status == 413 and f"limit of {LIMIT} bytes" in str(message), message


def test_identity_is_no_encoding_on_the_middleware_and_a_real_one_a_415() -> None:
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for encoding, status in ((b"identity", 200), (b"Identity, identity", 200), (b"", 200), (b"br", 415)):
        app = FakeVllm()
        sent: list[dict[str, Any]] = []
        _, receive = body_parts([chat])
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "app": app,
                 "query_string": b"", "http_version": "1.1",
                 "headers": [(b"authorization", b"Bearer secret"), (b"content-encoding", encoding)]}

        asyncio.run(KVSchedMiddleware(app)(scope, receive, sent_to(sent)))
        assert sent[0]["status"] == status, (encoding, sent[0])


def test_a_408_on_a_closing_connection_is_answered_at_once_not_after_a_drain() -> None:
    """The client stopped sending: the middleware's 408 closes the connection without reading on (no receive after
    the body timeout), as the ingress's does; a drain there only waited out DRAIN_MAX_S for bytes that do not come."""
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    mw.body_timeout_s = 0.1
    waits: list[str] = []
    first = [{"type": "http.request", "body": b'{"mo', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if first:
            return first.pop()
        waits.append("receive")
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "app": app,
             "query_string": b"", "http_version": "1.1",
             "headers": [(b"authorization", b"Bearer secret"), (b"connection", b"close"), (b"content-length", b"99")]}
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"], sent[0]
    assert waits == ["receive"], waits  # the one the body timeout ended; none after it
