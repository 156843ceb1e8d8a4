"""What the OpenAI ingress reads from a request before routing it: the JSON body within size and depth limits, and
the session (id, role, end flag) from the headers or the body, read as kvsched's vLLM middleware reads them
(`kvsched.core.client_fields`: `X-Session-Id` / `session_id` / `vllm_xargs.session_id`, `prompt_cache_key`, `user`,
`metadata.user_id`; `X-Agent-Role` / `vllm_xargs.agent_role`; `X-Session-End` / `vllm_xargs.session_end`).

Pure functions, so the limits are fuzzed without a cluster. Every problem is a `BadRequest` carrying its HTTP status
(400, or 413 for a body over the size limit) and a message; nothing else may escape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kvsched.adapters.http_body import encoding_refusal
from kvsched.core.client_fields import read_session_fields, repeated_header
from kvsched.core.sessions import InvalidSessionInput

CHARS_PER_TOKEN = 4  # prompt size estimate before any usage is known
MAX_BODY_BYTES = 64 * 1024 * 1024  # as kvsched's vLLM middleware
# As kvsched's vLLM middleware (kvsched/adapters/vllm/http_io.py), so a body an engine takes directly passes the
# endpoint too (found by review: 64 here refused what README's Security table promises). An OpenAI request nests
# about 6 deep (messages, content parts; a tool's JSON schema more); the depth check is iterative and json.loads goes
# far deeper.
MAX_JSON_DEPTH = 128
# Objects and arrays a body may hold: parsed, each costs ~60-200 bytes of Python objects (found by review: a 64 MiB
# body of 22 million empty messages took ~3 GiB of the ingress). Token ids and text are cheap to parse: not counted.
MAX_JSON_CONTAINERS = 1_000_000
# kvsched's headers the engines read as UTF-8 and refuse sent twice with different values (`adapters.vllm.middleware`;
# the salt headers of the session routes: `owners.AUTH_HEADERS`)
SESSION_HEADERS = ("x-session-id", "x-agent-role", "x-session-ttl", "x-session-end", "x-kvsched-compaction")
REQUEST_ID = "x-request-id"  # Ray's proxy's request id (serve/_private/constants.py SERVE_HTTP_REQUEST_ID_HEADER)
# vLLM writes the request id into every chunk it streams (the `id` of each), so an id is bounded before it is sent:
# a uuid is 32 to 36 characters, a W3C trace id 32, a traceparent 55
MAX_REQUEST_ID_BYTES = 256
# `stream` as vLLM's request models read it (`stream: bool | None`, pydantic's lax mode)
_STREAM = TypeAdapter(bool | None)


def lower(request: Any) -> dict[str, str]:
    """The request's headers by lower-case name (a repeated one: its last value)."""
    return {k.lower(): v for k, v in request.headers.items()}


def request_id(request: Any) -> dict[str, str]:
    """The request's id, to send the engine: `x-request-id` as Ray's proxy and vLLM read it (the first, if repeated).
    Ray 2.60's proxy puts one in every request it routes (RequestIdMiddleware: the client's X-Request-Id, else one it
    makes) and answers it (`X-Request-ID`); vLLM serves a request under it (the answer's `id`, its logs). One over
    MAX_REQUEST_ID_BYTES is a 400 (found by review: neither Ray's proxy nor vLLM's server limits a header's size, and
    vLLM repeats the id in every chunk it streams, so a client's 1 MiB id made each token a MiB of answer)."""
    value = request.headers.get(REQUEST_ID)
    if value is not None and len(value) > MAX_REQUEST_ID_BYTES:  # a server's header text: one character a byte
        raise BadRequest(400, f"X-Request-Id is {len(value)} bytes; the limit is {MAX_REQUEST_ID_BYTES} (the engine "
                              f"repeats it in every chunk it streams)", param=REQUEST_ID)
    return {} if value is None else {REQUEST_ID: value}


class BadRequest(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True, slots=True)
class SessionFields:
    session_id: str | None = None
    role: str | None = None
    end: bool = False


def check_content_type(value: str | None) -> None:
    """Refuse (415) a body that declares itself other than JSON, as vLLM does (FastAPI reads a request model from an
    `application/json` or `application/*+json` body, or one that declares no type; others are a 422). Found by
    probing: the ingress read any body as JSON and sent it on as `application/json`, so a `text/plain` or form body
    was served 200 where the engine alone refuses it."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise BadRequest(415, f"Content-Type must be application/json, got {value[:60]!r}", param="content-type")


def check_content_encoding(value: str | None) -> None:
    """Refuse (415) a body sent compressed (`http_body.encoding_refusal`)."""
    if (why := encoding_refusal(value)) is not None:
        raise BadRequest(415, why, param="content-encoding")


def check_length(content_length: str | None, max_bytes: int = MAX_BODY_BYTES) -> None:
    """Refuse a declared body over the limit before reading it."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise BadRequest(400, f"Content-Length is not a number: {content_length[:40]!r}") from None
    if n > max_bytes:
        raise BadRequest(413, f"request body is {n} bytes; the limit is {max_bytes}")


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, `[]` and `{}` are 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
            deepest = max(deepest, d + 1)
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
            deepest = max(deepest, d + 1)
    return deepest


def parse_body(raw: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise BadRequest(413, f"request body is over {max_bytes} bytes")
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_CONTAINERS:  # an upper bound, counted in C before parsing
        raise BadRequest(413, f"request body holds over {MAX_JSON_CONTAINERS:,} JSON objects and arrays")
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise BadRequest(400, f"request body nests deeper than {max_depth} levels") from None
    except ValueError:  # includes UnicodeDecodeError
        raise BadRequest(400, "request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, "request body must be a JSON object")
    if json_depth(payload) > max_depth:
        raise BadRequest(400, f"request body nests deeper than {max_depth} levels")
    return payload


def header_text(value: str) -> str | None:
    """`value` as the ingress forwards a header: its UTF-8 bytes, held as the latin-1 text a server decodes header
    bytes to (`engine._forward` sends them back as those bytes), so the engine, which reads kvsched's headers as
    UTF-8, reads `value`. None: no UTF-8 carries it (a lone surrogate; session ids refuse those). Found by probing:
    a body's `session_id` "café" went on as the latin-1 byte 0xE9, which kvsched's engine refuses (400, "header
    x-session-id is not valid UTF-8", a header the client never sent)."""
    try:
        return value.encode("utf-8").decode("latin-1")
    except UnicodeEncodeError:
        return None


def utf8_headers(headers: Mapping[str, str], names: Iterable[str] = SESSION_HEADERS) -> dict[str, str]:
    """The named headers of lower-cased `headers` (decoded as latin-1 by the server) read as UTF-8, as kvsched's
    engines read them (`adapters.vllm.http_io.utf8_headers`); invalid UTF-8 is a 400 naming the header. Found by
    probing: read as latin-1, X-Session-Id "café" keyed the router (and its KV reports, a DELETE's forgetting) under
    "cafÃ©", conflicted with the body's "café" (400), and "日本" was refused as holding a control character (U+0097)
    while the engine takes all three."""
    out: dict[str, str] = {}
    for name in names:
        if name in headers:
            try:
                out[name] = headers[name].encode("latin-1").decode("utf-8")
            except UnicodeError:
                raise BadRequest(400, f"header {name} is not valid UTF-8", param=name) from None
    return out


def refuse_repeated(raw_headers: Iterable[tuple[bytes, bytes]], names: Iterable[str] = SESSION_HEADERS) -> None:
    """BadRequest 400 naming the first of `names` (lower case) sent more than once with different values, as
    kvsched's engines refuse it (`adapters.vllm.http_io.refuse_repeated`). Found by probing: the ingress read the
    last of two X-Session-Id headers (a dict of Starlette's items) and routed and forwarded that one, where the
    engine, sent them both, would refuse them; the same held for the role, end, TTL, compaction and salt headers.
    The same value repeated is that value."""
    if (name := repeated_header(raw_headers, names)) is not None:
        raise BadRequest(400, f"header {name} is sent more than once with different values: send it once",
                         param=name)


def session_fields(payload: Mapping[str, Any], headers: Mapping[str, str]) -> SessionFields:
    """The request's session, from lower-cased `headers` or the body, read by the engines' own reader
    (`kvsched.core.client_fields`) so that the router keys a turn by the session the engine files it under. Found by
    review: `prompt_cache_key`, `user`, `metadata.user_id` and `vllm_xargs.agent_role` were read by the engines only,
    so those turns were routed least loaded (losing their KV every turn) and the role picked no pool. The ingress
    serves chat and completions only, where the engines ignore `previous_response_id` (a `/v1/responses` field)."""
    try:
        fields = read_session_fields(payload, headers)
    except InvalidSessionInput as exc:
        raise BadRequest(400, str(exc), param=exc.field or "session") from None
    return SessionFields(fields.session_id, fields.role, bool(fields.end))  # an end without an id is refused above


def stream_flag(payload: dict[str, Any]) -> bool:
    """Whether vLLM streams the answer: `stream` read as vLLM reads it (true/false, 1/0, "true"/"false", "yes"/"no",
    "on"/"off", "t"/"f", "y"/"n", "1"/"0" in any case; null or absent: no), written back as a JSON boolean. Found by
    review: `"stream": "true"` took the buffered path while vLLM streamed, so the whole answer waited in the ingress
    (and under the request deadline)."""
    if payload.get("stream") is None:
        return False
    try:
        flag = bool(_STREAM.validate_python(payload["stream"]))
    except ValidationError:
        raw = payload["stream"]
        shown = json.dumps(raw)[:40] if isinstance(raw, str | int | float) else f"a JSON {type(raw).__name__}"
        raise BadRequest(400, f"stream must be a boolean, got {shown}", param="stream") from None
    payload["stream"] = flag
    return flag


def estimate_tokens(payload: dict[str, Any]) -> int:
    text = payload.get("messages") if "messages" in payload else payload.get("prompt")
    return len(json.dumps(text)) // CHARS_PER_TOKEN if text is not None else 0
