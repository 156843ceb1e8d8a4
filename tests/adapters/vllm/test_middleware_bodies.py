"""Bodies a hostile client sends slowly, compressed, or over the limit on a connection that closes after the answer,
through kvsched's middleware over the fake vLLM of test_middleware (no engine). Each found by probing a real
`vllm serve --scheduler kvsched` (tests/integration/test_hostile_bodies.py sends the over-limit ones there)."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

from kvsched.adapters.http_body import closes_after_answer
from kvsched.adapters.vllm.http_io import MAX_BODY_BYTES
from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from tests.adapters.vllm.test_middleware import FakeVllm
from tests.asgi_parts import body_parts

AUTH = (b"authorization", b"Bearer secret")
JSON = (b"content-type", b"application/json")
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def run(mw: KVSchedMiddleware, app: FakeVllm, headers: list[tuple[bytes, bytes]], parts: list[bytes],
        hang: bool = False, http_version: str = "1.1") -> tuple[int, dict[bytes, bytes], Any, int]:
    """A POST /v1/chat/completions whose body comes in `parts` (then, if `hang`, never ends): (status, answer
    headers, answer JSON, parts left unread when the answer started)."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "query_string": b"",
             "app": app, "headers": [AUTH, JSON, *headers], "http_version": http_version}
    messages, receive = body_parts(parts, hang)
    sent: list[dict[str, Any]] = []
    left: list[int] = []

    async def send(m: dict[str, Any]) -> None:
        if m["type"] == "http.response.start":
            left.append(len(messages))
        sent.append(m)

    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body), left[0]


def test_a_body_that_does_not_arrive_is_a_408_that_closes_the_connection() -> None:
    """Found by probing: a Content-Length larger than the body sent, or a body of a byte a second, held the request
    for as long as the client kept the connection (uvicorn has no body timeout). Now a 408 with a message once the
    middleware's body timeout (60 s by default) has passed, the connection closed, nothing sent to vLLM."""
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    mw.body_timeout_s = 0.2
    status, headers, body, _ = run(mw, app, [(b"content-length", b"%d" % (len(CHAT) + 50))], [CHAT[:5]], hang=True)
    assert status == 408 and headers.get(b"connection") == b"close", (status, headers)
    assert "within 0.2 s" in body["error"]["message"] and body["error"]["type"] == "RequestTimeout", body
    assert app.calls == []


def test_a_body_over_the_limit_is_drained_before_the_413_only_when_the_connection_closes() -> None:
    """Found by probing: with `Connection: close` (or HTTP/1.0) the client got a reset instead of the 413 (uvicorn
    closed the socket with the body unread). The rest of the body is now read first; on a kept-alive connection it is
    left to uvicorn (which drops it after the answer)."""
    parts = [b"x" * (1 << 20)] * 70  # 70 MiB in 1 MiB parts, declared by none
    for headers, version, drained in (([(b"connection", b"close")], "1.1", True), ([], "1.0", True),
                                      ([(b"connection", b"keep-alive")], "1.0", False), ([], "1.1", False)):
        app = FakeVllm()
        status, _, body, left = run(KVSchedMiddleware(app), app, [(b"transfer-encoding", b"chunked"), *headers],
                                    parts, http_version=version)
        assert status == 413 and str(MAX_BODY_BYTES) in body["error"]["message"], body
        assert (left == 0) == drained and app.calls == [], (headers, version, left)
    assert closes_after_answer({"headers": [(b"Connection", b"Upgrade, Close")], "http_version": "1.1"})


def test_a_compressed_body_is_a_415_naming_its_encoding() -> None:
    """Found by probing: a gzip body got vLLM's 400 "There was an error parsing the body" (nothing decompresses it,
    so a zip bomb cannot expand): now kvsched's 415 naming Content-Encoding. `identity` is no encoding."""
    for encoding, body in ((b"gzip", gzip.compress(CHAT)), (b"deflate", CHAT), (b"gzip, br", CHAT)):
        app = FakeVllm()
        status, _, answer, _ = run(KVSchedMiddleware(app), app, [(b"content-encoding", encoding)], [body])
        assert status == 415 and answer["error"]["param"] == "content-encoding", answer
        assert app.calls == []
    app = FakeVllm()
    assert run(KVSchedMiddleware(app), app, [(b"content-encoding", b"identity")], [CHAT])[0] == 200
