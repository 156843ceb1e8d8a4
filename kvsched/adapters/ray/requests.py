"""What the OpenAI ingress reads from a request before routing it: the JSON body within size and depth limits, and
the session (id, role, end flag) from the headers or the body, read as kvsched's vLLM middleware reads them
(`kvsched.core.client_fields`: `X-Session-Id` / `session_id` / `vllm_xargs.session_id`, `prompt_cache_key`, `user`,
`metadata.user_id`; `X-Agent-Role` / `vllm_xargs.agent_role`; `X-Session-End` / `vllm_xargs.session_end`).

Pure functions, so the limits are fuzzed without a cluster. Every problem is a `BadRequest` carrying its HTTP status
(400, or 413 for a body over the size limit) and a message; nothing else may escape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kvsched.core.client_fields import read_session_fields
from kvsched.core.sessions import InvalidSessionInput

MAX_BODY_BYTES = 64 * 1024 * 1024  # as kvsched's vLLM middleware
# As kvsched's vLLM middleware (kvsched/adapters/vllm/http_io.py), so a body an engine takes directly passes the
# endpoint too (found by review: 64 here refused what README's Security table promises). An OpenAI request nests
# about 6 deep (messages, content parts; a tool's JSON schema more); the depth check is iterative and json.loads goes
# far deeper.
MAX_JSON_DEPTH = 128
# Objects and arrays a body may hold: parsed, each costs ~60-200 bytes of Python objects (found by review: a 64 MiB
# body of 22 million empty messages took ~3 GiB of the ingress). Token ids and text are cheap to parse: not counted.
MAX_JSON_CONTAINERS = 1_000_000
# `stream` as vLLM's request models read it (`stream: bool | None`, pydantic's lax mode)
_STREAM = TypeAdapter(bool | None)


class BadRequest(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True, slots=True)
class SessionFields:
    session_id: str | None = None
    role: str | None = None
    end: bool = False


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


def is_header_safe(value: str) -> bool:
    """Can `value` travel as an HTTP header value? Servers decode header bytes as latin-1, so a value that arrived as
    a header always can; a session id from the JSON body may hold any character (it then stays in the body)."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


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
