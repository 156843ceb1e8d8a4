"""ASGI plumbing for kvsched's middleware: bounded body reading, bounded JSON parsing, header decoding, JSON answers.

Limits are what a hostile client meets first: a body over MAX_BODY_BYTES gets 413 (never read past the limit), JSON
nested deeper than MAX_JSON_DEPTH gets 400 (Python's parser would otherwise raise RecursionError, a 500), a body not
all arrived within BODY_TIMEOUT_S 408 (found by probing: a Content-Length larger than the body sent, or a byte a
second, held the request for as long as the client kept the connection; uvicorn has no body timeout), a compressed
body on the generation routes 415 (neither kvsched nor vLLM decompresses one: vLLM answered "There was an error
parsing the body"). A body refused before it was all read, on a connection that closes after the answer, is drained
(within bounds) before the answer goes, or the client gets a reset instead (`adapters/http_body.py`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from itertools import compress
from typing import Any

from kvsched.adapters.http_body import (
    BODY_TIMEOUT_S,
    BodyRefused,
    ClientLeft,
    closes_after_answer,
    drain,
    encoding_refusal,
    read_limited,
)
from kvsched.core.client_fields import repeated_header

MAX_BODY_BYTES = 64 * 1024 * 1024
SCAN_BODY_BYTES = 2**30  # bodies kvsched only scans for its own fields (routes it does not rewrite): vLLM's limit
MAX_JSON_DEPTH = 128
MAX_JSON_CONTAINERS = 1_000_000  # on the generation routes kvsched rewrites (token ids and text are cheap to parse)

Scope = dict[str, Any]


class HttpError(Exception):
    """An answer to send instead of forwarding the request: status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None,
                 unread: bool = False, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, param, status if code is None else code)
        self.unread = unread  # refused before the whole body was read: drained first on a closing connection
        self.close = close  # answered with `Connection: close` (the rest of the body is not read)


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
               405: "MethodNotAllowed", 408: "RequestTimeout", 413: "RequestTooLarge", 415: "UnsupportedMediaType",
               503: "ServiceUnavailable"}


def error_body(message: str, param: str | None = None, code: str | int = 400) -> dict[str, Any]:
    status = code if isinstance(code, int) else 400
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"), "param": param,
                      "code": code}}


class Disconnected(Exception):
    """The client went away while its body was being read: nothing to answer."""


def declared_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def read_body(scope: Scope, receive: Any, limit: int = MAX_BODY_BYTES,
                    timeout_s: float | None = BODY_TIMEOUT_S) -> bytes:
    """The whole request body, refusing (413) as soon as the declared or received size passes `limit`, and (408) if it
    has not all arrived within `timeout_s` (None: no limit)."""
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        raise HttpError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", unread=True)
    try:
        return await read_limited(receive, limit, timeout_s)
    except BodyRefused as exc:
        raise HttpError(exc.status, exc.message, unread=exc.unread, close=exc.status == 408) from None
    except ClientLeft:
        raise Disconnected from None


def check_content_encoding(raw: dict[str, bytes]) -> None:
    """HttpError 415 for a body sent compressed (a Content-Encoding but `identity`): nothing decompresses it, so a zip
    bomb never expands, and the client is told why its body is refused."""
    value = raw.get("content-encoding")
    if (why := encoding_refusal(None if value is None else value.decode("latin-1"))) is not None:
        raise HttpError(415, why, param="content-encoding", unread=True)


async def refuse(scope: Scope, receive: Any, send: Any, exc: HttpError, content: Any) -> None:
    """Answer `exc` with `content`: a body left unread on a connection that closes after the answer is drained first
    (`http_body.drain`), and a 408 closes the connection at once, unread (found by review69: on a closing connection
    it waited out the drain's 5 s for a body that had stopped coming, where the Ray ingress answers at once)."""
    if exc.unread and not exc.close and closes_after_answer(scope):
        await drain(receive)
    await send_json(send, exc.status, content, [(b"connection", b"close")] if exc.close else [])


def parse_json(body: bytes, max_containers: int | None = None) -> Any:
    """The body as JSON, or None when it is not JSON at all (vLLM answers that itself). Too deep: HttpError 400; more
    than `max_containers` objects and arrays (an upper bound, braces in strings counted too, before parsing: millions
    of tiny objects cost ~25x their bytes once parsed): HttpError 413."""
    if max_containers is not None and body.count(b"{") + body.count(b"[") > max_containers:
        raise HttpError(413, f"request body holds over {max_containers:,} JSON objects and arrays")
    try:
        value = json.loads(body) if body else None
    except RecursionError:
        raise HttpError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # includes UnicodeDecodeError
        return None
    if too_deep(value, MAX_JSON_DEPTH):
        raise HttpError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def too_deep(value: Any, limit: int) -> bool:
    """Is any container nested more than `limit` levels deep? Iterative: no recursion of its own, and no Python step
    per scalar (a body of a million numbers was a second of event-loop stall here)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in containers(obj.values() if isinstance(obj, dict) else obj))
    return False


_is_container = frozenset({dict, list}).__contains__  # of a value's type: with map(type, ...), a loop in C


def containers(values: Any) -> Iterator[Any]:
    """The dicts and lists among `values` (a list, or a dict's values) of parsed JSON: its scalars (token ids, numbers,
    text) are skipped without a Python step each."""
    return compress(values, map(_is_container, map(type, values)))


def container_items(node: dict[Any, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    """(key or index, child) for the dicts and lists directly inside `node`, skipping scalars as `containers` does."""
    if isinstance(node, dict):
        return compress(node.items(), map(_is_container, map(type, node.values())))
    return compress(enumerate(node), map(_is_container, map(type, node)))


def route_path(scope: Mapping[str, Any]) -> str:
    """The path a request is routed by: under `--root-path` the server's prefix is removed, as Starlette routes it.
    Every kvsched check of a path reads this one (found by review: compaction compared the prefixed path, so a client
    escaped even the operator's `cap` by sending the prefixed URL)."""
    return str(scope.get("path", "")).removeprefix(scope.get("root_path", ""))


def first_headers(scope: Scope) -> dict[str, bytes]:
    """Header name (lower case) -> raw value of its first occurrence (as Starlette's `Headers.get` reads it)."""
    out: dict[str, bytes] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.decode("latin-1").lower(), v)
    return out


def refuse_repeated(scope: Scope, names: Iterable[str]) -> None:
    """HttpError 400 naming the first of `names` (lower case) sent more than once with different values: kvsched, as
    Starlette, reads the first, so the other would be dropped unsaid (found by probing: two X-Session-Id headers, one
    a proxy's, were served 200 under the first). The same value repeated is that value."""
    if (name := repeated_header(scope.get("headers", []), names)) is not None:
        raise HttpError(400, f"header {name} is sent more than once with different values: send it once", param=name)


def utf8_headers(raw: dict[str, bytes], names: Iterable[str]) -> dict[str, str]:
    """The named headers decoded as UTF-8 (so `café` by header is `café` by body); invalid UTF-8 is a 400."""
    out: dict[str, str] = {}
    for name in names:
        if name in raw:
            try:
                out[name] = raw[name].decode("utf-8")
            except UnicodeDecodeError:
                raise HttpError(400, f"header {name} is not valid UTF-8", param=name) from None
    return out


def replace_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != name]
    out.append((name, value))
    return out


def replay(body: bytes, receive: Any) -> Any:
    """A receive channel that yields the already-read body, then defers to the client's (disconnect detection)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


REQUEST_ID_HEADER = b"x-request-id"


def with_request_id(send: Any, request_id: bytes | None) -> Any:
    """`send` with the `x-request-id` header vLLM's XRequestIdMiddleware (`--enable-request-id-headers`,
    `vllm/entrypoints/serve/middleware/x_request_id.py`) appends to every answer: the client's own (`request_id`, the
    raw value of its first X-Request-Id, as Starlette's `Headers.get` reads it), else a new `uuid.uuid4().hex`."""

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            value = uuid.uuid4().hex.encode() if request_id is None else request_id
            message = dict(message, headers=[*message.get("headers", ()), (REQUEST_ID_HEADER, value)])
        await send(message)

    return sending


async def send_json(send: Any, status: int, content: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or ())]})
    await send({"type": "http.response.body", "body": body})


def body_kind(content_type: bytes) -> str | None:
    """"json" or "form" for the bodies vLLM reads `vllm_xargs` from (JSON; the audio routes' forms), else None."""
    ctype = content_type.lower()
    if b"json" in ctype:
        return "json"
    if ctype.startswith((b"multipart/form-data", b"application/x-www-form-urlencoded")):
        return "form"
    return None


async def form_fields(scope: Scope, body: bytes) -> list[dict[str, Any]] | None:
    """A form body's text fields, one {name: value} each (a name may repeat), as vLLM reads them (Starlette's parser;
    `vllm_xargs` is JSON text, decoded here as vLLM decodes it); None if it does not parse (vLLM refuses it too).
    HttpError 413 when the `vllm_xargs` fields together pass MAX_BODY_BYTES or MAX_JSON_CONTAINERS."""
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(dict(scope, type="http"), receive).form()
        items = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        await form.close()
    except Exception:
        return None
    xargs = [v for k, v in items if k == "vllm_xargs"]  # parsed below: the generation routes' limits (a form's own
    if sum(map(len, xargs)) > MAX_BODY_BYTES or sum(v.count("{") + v.count("[") for v in xargs) > MAX_JSON_CONTAINERS:
        raise HttpError(413, "the form's vllm_xargs fields are over the limits of a JSON body")  # are 1,000 x 1 MB
    fields: list[dict[str, Any]] = []
    for name, value in items:
        if name == "vllm_xargs":
            try:
                fields.append({name: json.loads(value)})
                continue
            except (ValueError, RecursionError):  # not JSON, or nested past the parser: vLLM refuses it as well
                pass
        fields.append({name: value})
    return fields
