"""Bodies over the limit, on a connection that closes after the answer, sent to the shared hardened `vllm serve
--scheduler kvsched` (conftest.py; no start-up of its own). Found by probing: the client got ECONNRESET before a
byte of kvsched's 413 (uvicorn closed the socket with the body unread); the middleware now drains the rest (within
bounds: `kvsched/adapters/http_body.py`) and the client reads the whole 413. The slow and compressed bodies are
tests/adapters/vllm/test_middleware_bodies.py (a 408 here would wait the server's 60 s)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.integration.secure import KEYS, chat
from tests.raw_http import answered, chunked, exchange

pytestmark = pytest.mark.integration
LIMIT = 64 << 20  # the middleware's MAX_BODY_BYTES
BIG = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * (LIMIT + (8 << 20))}]}).encode()


def test_a_body_over_the_limit_on_a_closing_connection_gets_the_whole_413(secure_server: Any) -> None:
    port = urlparse(secure_server.base).port
    assert port is not None
    key = b"authorization: Bearer " + KEYS[0].encode()
    for version, head, parts in (
            (b"1.1", [key, b"connection: close", b"content-length: %d" % len(BIG)], [BIG]),
            (b"1.1", [key, b"connection: close", b"transfer-encoding: chunked"], chunked(BIG, 1 << 20)),
            (b"1.0", [key, b"content-length: %d" % len(BIG)], [BIG])):
        answer, failure = exchange(port, "/v1/chat/completions", head, parts, version=version, timeout_s=120)
        assert failure is None, (version, head[1:], failure, answer[:300])
        status, _, error = answered(answer)
        assert status == 413 and str(LIMIT) in error["error"]["message"], (version, head[1:], answer[:300])
        r = chat(secure_server, [{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.status_code == 200, r.text
