"""kvsched's body limit in Ray Serve's HTTP proxy, before the proxy queues a body for kvsched's ingress.

Ray 2.60's proxy reads a request's body from uvicorn into a queue of its own as fast as the client sends it
(`serve/_private/proxy.py`, `HTTPProxy.proxy_asgi_receive`, started before the request is routed), and the ingress
replica, which holds the size limit (`max_body_bytes`, `ingress_body.py`), reads that queue by remote calls: a fast
client's over-limit body sat in the proxy's memory until the ingress was routed the request, refused it and the proxy
stopped reading, and a refused body on a closing connection was drained through those remote calls. Here, in the
proxy (Ray's HTTP proxy callback: `proxy_headers.middlewares`), a request is refused (413, the message the engines
and the ingress give) when:
- its declared Content-Length is over the limit: before the proxy routes it or reads a byte of it;
- its body, sent without a length (chunked), passes the limit as it arrives: the proxy is then told the client left
  (`http.disconnect`: Ray cancels the request to the ingress and answers nothing, `send_http_response_on_exception`),
  and the 413 is sent here, unless an answer already began (the ingress refused first: its answer passes).
What is left of a refused body is handled as the engines and the ingress handle it (`adapters/http_body.py`):
drained within bounds before the answer on a connection that closes after it, else left to uvicorn, which drops it
after the answer. A client that waits for `100 Continue` before it sends its body is answered at once, without it,
and the connection closed (uvicorn would read the body it never sends as the next request).

The limit reaches the proxy as KVSCHED_PROXY_MAX_BODY_BYTES in its environment (`proxy.controller_options`: the
config's `max_body_bytes` when `kvsched ray-serve` starts Serve), read once as the proxy starts; one limit for every
app on that proxy."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvsched.adapters.http_body import closes_after_answer, drain
from kvsched.adapters.ray.requests import MAX_BODY_BYTES
from kvsched.core.env import env_setting

ENV_PROXY_MAX_BODY = "KVSCHED_PROXY_MAX_BODY_BYTES"


def proxy_max_body_bytes(environ: Mapping[str, str] | None = None) -> int:
    """KVSCHED_PROXY_MAX_BODY_BYTES (unset or blank: the ingress's default, 64 MiB); ValueError naming it if it is not
    a whole number of bytes >= 1."""
    raw = env_setting(os.environ if environ is None else environ, ENV_PROXY_MAX_BODY)
    if raw is None:
        return MAX_BODY_BYTES
    word = raw.strip()
    if not (word.isascii() and word.isdigit() and int(word) >= 1):
        raise ValueError(f"{ENV_PROXY_MAX_BODY}={raw!r}: a whole number of bytes >= 1 (default {MAX_BODY_BYTES})")
    return int(word)


def body_framing(scope: Scope) -> tuple[int | None, bool]:
    """(the first Content-Length as a number, whether a Transfer-Encoding is sent): an HTTP/1.1 request with neither
    has no body, and one with a Transfer-Encoding is read by it whatever length it declares (RFC 9112 6.3). uvicorn
    refuses a malformed length before the app, and gives header names in lower case (as ASGI asks); its httptools
    parser refuses both headers at once, its h11 parser (where httptools is not installed) reads the body chunked
    (found by review70: a chunked body declaring `Content-Length: 0` passed the limit uncounted)."""
    length, encoded = None, False
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and length is None:
            length = int(value) if value.strip().isdigit() else None
        elif name == b"transfer-encoding":
            encoded = True
    return length, encoded


def waits_for_continue(scope: Scope) -> bool:
    return any(k == b"expect" and v.strip().lower() == b"100-continue" for k, v in scope.get("headers", ()))


def too_large(message: str) -> bytes:
    """The 413's body, an OpenAI error object as the ingress's `error()` makes it."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": 413}}).encode()


class ProxyBodyLimit:
    """Refuses (413) an HTTP request whose body is over `max_bytes`, declared or as it arrives; passes every other
    request and scope on untouched (one with a declared length within the limit, or no body: not even its messages
    are wrapped)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, encoded = body_framing(scope)
        if encoded:  # its length beside it means nothing (RFC 9112 6.3): h11 reads such a body chunked (review70)
            await self._counted(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            message = f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes"
            if waits_for_continue(scope):  # its body is not sent until the proxy asks for it: not asked
                await self._answer(send, message, close=True)
            else:
                await self._refuse(scope, receive, send, message)
            return
        await self.app(scope, receive, send)  # uvicorn delivers no more than the declared bytes (or none)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app with the body counted as it arrives: past the limit, before any answer began, the app is told the
        client left and the 413 is sent here once the app has returned."""
        size, over, more, answered = 0, False, False, False

        async def counting() -> Message:
            nonlocal size, over, more
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not answered:
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    over, more = True, bool(message.get("more_body", False))
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            nonlocal answered
            if over:  # the client is told by the 413 below; the app's answer to a disconnect is not sent
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting, sending)
        if over:
            message = f"request body is over the limit of {self.max_bytes} bytes"
            await self._refuse(scope, receive if more else None, send, message)

    async def _refuse(self, scope: Scope, receive: Receive | None, send: Send, message: str) -> None:
        """The 413, once what is left of the body (`receive` None: nothing) is drained if the connection closes after
        the answer."""
        if receive is not None and closes_after_answer(dict(scope)):
            await drain(receive)  # type: ignore[arg-type]  # (starlette's Message: a MutableMapping)
        await self._answer(send, message)

    @staticmethod
    async def _answer(send: Send, message: str, close: bool = False) -> None:
        body = too_large(message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413,
                    "headers": [*headers, (b"connection", b"close")] if close else headers})
        await send({"type": "http.response.body", "body": body})
