"""An ASGI middleware for Ray Serve's HTTP proxy: a header the proxy decodes as UTF-8 for itself, sent in bytes that
are no UTF-8, gets kvsched's 400 naming it. Without it Ray 2.60's proxy raised UnicodeDecodeError and answered 500
before kvsched's ingress saw the request (each reproduced on a local cluster with a raw socket).

Ray's proxy decodes (`bytes.decode()`, UTF-8), for every HTTP request it routes to an app: `x-request-id` (its request
id) and `serve_multiplexed_model_id` (any case, `-` as `_`) in `serve/_private/proxy.py`
(`setup_request_context_and_handle`); the session header (`RAY_SERVE_SESSION_ID_HEADER_KEY`, default `x-session-id`,
`-` as `_`; the Serve kvsched starts reads none: proxy.py); `x-request-timeout-seconds` and
`x-request-disconnect-disabled` (`http_util.py`, `send_request_to_replica`); `traceparent` when Ray's tracing is on
(`proxy_request_response.py`). Nothing else of the request is decoded there: a header name, path or query string
holding bytes outside ASCII is refused by uvicorn's parser first (400), a percent-escape that is no UTF-8 is decoded
with replacement characters and reaches the ingress (which refuses it), and the body is not read.

Ray calls `middlewares()` in each HTTP proxy as it starts when `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names it
(`proxy.controller_options` sets it); Ray wraps its own RequestIdMiddleware innermost, so these run first. The normal
path costs one `bytes.isascii()` per header; only a value outside ASCII is matched against the names and decoded."""

from __future__ import annotations

import json

from ray.serve._private.constants import (
    SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
    SERVE_HTTP_REQUEST_ID_HEADER,
    SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
    SERVE_MULTIPLEXED_MODEL_ID,
    SERVE_SESSION_ID,
)
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from kvsched.adapters.ray.proxy_body import ProxyBodyLimit, proxy_max_body_bytes

CALLBACK = "kvsched.adapters.ray.proxy_headers:middlewares"  # for RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
# Compared as Ray's proxy compares them: these exactly (the server gives header names in lower case) ...
EXACT = frozenset({SERVE_HTTP_REQUEST_ID_HEADER, SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
                   SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER})
# ... and these in lower case with `-` read as `_` (Ray's `_matches_session_id_header` and its multiplexing match).
FOLDED = frozenset({SERVE_MULTIPLEXED_MODEL_ID, SERVE_SESSION_ID.lower().replace("-", "_")})
TRACE_HEADER = "traceparent"  # decoded only while Ray's tracing is on


def read_by_ray(name: str) -> bool:
    """Whether Ray's proxy decodes the header `name` (lower case) as UTF-8 before the app sees the request."""
    if name in EXACT or name.replace("-", "_") in FOLDED:
        return True
    if name == TRACE_HEADER:
        from ray.serve._private.tracing_utils import is_tracing_enabled

        return is_tracing_enabled()  # set up in the proxy after its middlewares: asked per request
    return False


def undecodable(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first header Ray's proxy would fail to decode (its name as sent, in lower case), or None."""
    for key, value in headers:
        if value.isascii():
            continue
        name = key.decode("latin-1").lower()
        if read_by_ray(name):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return name
    return None


def error_body(name: str) -> bytes:
    """kvsched's 400 (the ingress's `error()`, an OpenAI error object) naming the header."""
    return json.dumps({"error": {"message": f"header {name} is not valid UTF-8", "type": "invalid_request_error",
                                 "param": name, "code": 400}}).encode()


class RayHeadersUtf8:
    """Answers 400 naming the header to an HTTP request with a header Ray's proxy would fail to decode (a WebSocket:
    closed before it is accepted, the server's 403); passes every other request and scope on untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (name := undecodable(scope["headers"])) is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": f"header {name} is not valid UTF-8"})
                return
            body = error_body(name)
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def middlewares() -> list[Middleware]:
    """Ray's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the proxy's middlewares, the last in
    the list running first: the body limit (`proxy_body.py`, KVSCHED_PROXY_MAX_BODY_BYTES), then the headers. A
    callback of your own can return `[*yours, *middlewares()]` to keep both."""
    return [Middleware(RayHeadersUtf8), Middleware(ProxyBodyLimit, max_bytes=proxy_max_body_bytes())]
