"""The request body as the ingress reads it: refused (413) as soon as it is over the size limit, declared or not;
refused (408) when it has not all arrived within `body_timeout_s`; refused before it was all read on a connection that
closes after the answer, drained first (within bounds: `adapters/http_body.py`, which says why) so that the client
reads the answer, not a reset.

A body that does not arrive (a client sending a byte a second, or a Content-Length larger than what it sends) held the
request in the ingress for as long as the client kept the connection, found by probing a real cluster on loopback:
neither uvicorn (no body timeout) nor Ray 2.60's proxy (`http_options.request_timeout_s`, None by default:
`ray/serve/config.py` HTTPOptions) ends it. It is a 408 once `body_timeout_s` has passed since the ingress began
reading, answered with `Connection: close` (the rest of the body, if it comes, is not read). No engine replica is
involved before the body is read: a slow body holds no router slot, only one of the ingress's ongoing requests
(`max_ongoing_requests`), for at most `body_timeout_s`. Ray's proxy reads the body from uvicorn into a queue of its
own as fast as the client sends it (`proxy.py`, `proxy_asgi_receive`), whatever this replica has read."""

from __future__ import annotations

import asyncio
from typing import Any

from kvsched.adapters.http_body import BODY_TIMEOUT_S, closes_after_answer, drain
from kvsched.adapters.ray.requests import BadRequest, check_content_encoding, check_length


class RequestBody:
    """One request's body, read once (`read`) and, refused unread, drained (`before_refusal`). `complete`: the
    client's last body bytes were read (nothing is left on the connection)."""

    def __init__(self, request: Any) -> None:
        self.scope = request.scope
        self.receive = request.receive
        self.headers = request.headers
        self.complete = False
        self.read_bytes = 0

    async def _next(self) -> bytes | None:
        """The next chunk of the body, or None once the client disconnected."""
        message = await self.receive()
        if message["type"] != "http.request":  # http.disconnect
            self.complete = True
            return None
        chunk = message.get("body", b"")
        self.read_bytes += len(chunk)
        if not message.get("more_body", False):
            self.complete = True
        return bytes(chunk)

    async def read(self, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
        """The whole body; BadRequest 415 if it is compressed, 413 as soon as it is over `max_bytes` (declared or
        received), 408 if it has not all arrived within `timeout_s`, 400 if the client left before it ended."""
        check_content_encoding(self.headers.get("content-encoding"))
        check_length(self.headers.get("content-length"), max_bytes)
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(timeout_s):
                while not self.complete:
                    chunk = await self._next()
                    if chunk is None:
                        raise BadRequest(400, "the client closed the connection before the request body ended")
                    if self.read_bytes > max_bytes:
                        raise BadRequest(413, f"request body is over {max_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {timeout_s:g} s (received "
                                  f"{self.read_bytes} bytes)") from None
        return b"".join(chunks)

    async def before_refusal(self, exc: BadRequest) -> dict[str, str] | None:
        """Before the answer to a request refused while or before its body was read: a 408 closes the connection
        (what is left of the body is not read: these headers say so); another refusal, on a connection that closes
        after the answer, waits until the rest of the body is drained (`http_body.drain`)."""
        if exc.status == 408:
            return {"connection": "close"}
        if not self.complete and closes_after_answer(self.scope):
            await drain(self.receive)
        return None
