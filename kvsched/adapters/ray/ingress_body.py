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
own as fast as the client sends it (`proxy.py`, `proxy_asgi_receive`), whatever this replica has read: kvsched's
middleware there (`proxy_body.py`) refuses a body over the limit before it is queued; this replica's limit still
applies (a Serve started by other means, a proxy limit above the config's)."""

from __future__ import annotations

from typing import Any

from kvsched.adapters.http_body import (
    BODY_TIMEOUT_S,
    BodyRefused,
    ClientLeft,
    closes_after_answer,
    drain,
    read_limited,
)
from kvsched.adapters.ray.requests import BadRequest, check_content_encoding, check_length


class RequestBody:
    """One request's body, read once (`read`) and, refused unread, drained (`before_refusal`). `complete`: the
    client's last body bytes were read (nothing is left on the connection)."""

    def __init__(self, request: Any) -> None:
        self.scope = request.scope
        self.receive = request.receive
        self.headers = request.headers
        self.complete = False

    async def read(self, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
        """The whole body (`http_body.read_limited`); BadRequest 415 if it is compressed, 413 as soon as it is over
        `max_bytes` (declared or received), 408 if it has not all arrived within `timeout_s`, 400 if the client left
        before it ended."""
        check_content_encoding(self.headers.get("content-encoding"))
        check_length(self.headers.get("content-length"), max_bytes)
        try:
            body = await read_limited(self.receive, max_bytes, timeout_s)
        except BodyRefused as exc:
            self.complete = not exc.unread
            raise BadRequest(exc.status, exc.message) from None
        except ClientLeft:
            self.complete = True
            raise BadRequest(400, "the client closed the connection before the request body ended") from None
        self.complete = True
        return body

    async def before_refusal(self, exc: BadRequest) -> dict[str, str] | None:
        """Before the answer to a request refused while or before its body was read: a 408 closes the connection
        (what is left of the body is not read: these headers say so); another refusal, on a connection that closes
        after the answer, waits until the rest of the body is drained (`http_body.drain`)."""
        if exc.status == 408:
            return {"connection": "close"}
        if not self.complete and closes_after_answer(self.scope):
            await drain(self.receive)
        return None
