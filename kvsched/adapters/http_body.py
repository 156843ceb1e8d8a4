"""What kvsched's two HTTP fronts (the vLLM middleware, `vllm/http_io.py`, and the Ray ingress, `ray/ingress_body.py`)
do with a request body they refuse before reading it all: drain it (within bounds) before answering when the
connection closes after the answer, so that the client reads the answer instead of a reset.

Found by probing both on loopback (uvicorn 0.55 with httptools, as `vllm serve` and Ray 2.60's proxy run it): a body
over the limit sent with `Connection: close` (or over HTTP/1.0) got ECONNRESET, on the engine before a byte of its
413, through Ray's proxy after the 413's first bytes. uvicorn closes such a connection as soon as the answer is written
(`uvicorn/protocols/http/httptools_impl.py`, `RequestResponseCycle.send`: `if not self.keep_alive:
self.transport.close()`), and a socket closed with body bytes still unread sends the client a reset, which discards
what the client had not read yet. On a kept-alive connection (curl's, httpx's and the openai client's default)
uvicorn itself reads the rest of the body after the answer and drops it (`HttpToolsProtocol.on_body` returns once the
response is complete; `on_response_complete` resumes reading): the client reads the 413 and the connection serves
its next request. No drain is done there."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

BODY_TIMEOUT_S = 60.0  # a body not all arrived by then: 408 (a 64 MiB body needs ~9 Mbit/s to make it)
# Bounds of a refused body's drain: past them the answer is sent and the connection closed, whatever the client still
# sends (it may then see a reset). Time is the bound that matters: on a kept-alive connection uvicorn drains a refused
# body without any bound, at the same cost a byte. The bytes' bound is past the 72 MiB a client of the engine's 64 MiB
# limit was seen to send (found by tests/integration/test_hostile_bodies.py: a 64 MiB bound still left it a reset).
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_MAX_S = 5.0


class BodyRefused(Exception):
    """A body refused while it was read: 413 (over the limit) or 408 (not all arrived in time); `unread`: some of it
    may still be on the connection."""

    def __init__(self, status: int, message: str, unread: bool) -> None:
        super().__init__(message)
        self.status, self.message, self.unread = status, message, unread


class ClientLeft(Exception):
    """The client disconnected before its body ended."""


def encoding_refusal(value: str | None) -> str | None:
    """Why a body sent with this Content-Encoding is refused (415), or None: any coding but `identity`, since neither
    front nor vLLM decompresses one (found by probing: a gzip body was "not valid JSON", which hid the cause; a zip
    bomb never expands here)."""
    if value is None or all(c.strip().lower() in ("", "identity") for c in value.split(",")):
        return None
    return f"Content-Encoding {value[:40]!r} is not supported: send the JSON body uncompressed"


async def read_limited(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int, timeout_s: float | None) -> bytes:
    """The whole body from ASGI `receive`: BodyRefused 413 as soon as more than `limit` bytes came, 408 if it has not
    all arrived within `timeout_s` (None: no limit); ClientLeft if the client disconnected first."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":  # http.disconnect
                    raise ClientLeft
                chunk, more = message.get("body", b""), bool(message.get("more_body", False))
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(413, f"request body is over the limit of {limit} bytes", unread=more)
                chunks.append(bytes(chunk))
                if not more:
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyRefused(408, f"the request body did not arrive within {timeout_s:g} s (received {size} bytes)",
                          unread=True) from None


def closes_after_answer(scope: dict[str, Any]) -> bool:
    """Whether the server closes the connection once this request is answered: `Connection: close`, or HTTP/1.0
    without `Connection: keep-alive` (as httptools' `should_keep_alive` decides it for uvicorn)."""
    tokens: set[str] = set()
    for name, value in scope.get("headers", ()):
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    if "close" in tokens:
        return True
    return scope.get("http_version") == "1.0" and "keep-alive" not in tokens


async def drain(receive: Callable[[], Awaitable[dict[str, Any]]], max_bytes: int = DRAIN_MAX_BYTES,
                timeout_s: float = DRAIN_MAX_S) -> None:
    """Read and drop what is left of a request body (the caller knows some is left), up to `max_bytes` within
    `timeout_s`."""
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while size <= max_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                size += len(message.get("body", b""))
    except TimeoutError:
        return
