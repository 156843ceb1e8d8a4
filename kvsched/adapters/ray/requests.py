"""What the OpenAI ingress reads from a request before routing it: the JSON body within size and depth limits, and
the session (id, role, end flag) from the headers or the body, where kvsched's vLLM middleware reads them too
(`X-Session-Id` / `session_id` / `vllm_xargs.session_id`, `X-Agent-Role`, `X-Session-End` / `vllm_xargs.session_end`).

Pure functions, so the limits are fuzzed without a cluster. Every problem is a `BadRequest` carrying its HTTP status
(400, or 413 for a body over the size limit) and a message; nothing else may escape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kvsched.core.sessions import InvalidSessionInput, validate_end_flag, validate_role, validate_session_id

MAX_BODY_BYTES = 64 * 1024 * 1024  # as kvsched's vLLM middleware
MAX_JSON_DEPTH = 64  # an OpenAI request nests about 6 deep (messages, content parts, tool schemas a little more)
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
    """The request's session, from lower-cased `headers` or the body; conflicting ids are refused."""
    xargs = payload.get("vllm_xargs")
    xargs = xargs if isinstance(xargs, dict) else {}
    try:
        raw_ids = [headers.get("x-session-id"), payload.get("session_id"), xargs.get("session_id")]
        ids = {validate_session_id(v) for v in raw_ids if v is not None}
        if len(ids) > 1:
            raise InvalidSessionInput(f"conflicting session ids in one request: {sorted(ids)}")
        role_raw = headers.get("x-agent-role")
        end_raw = headers["x-session-end"] if "x-session-end" in headers else xargs.get("session_end")
        role = validate_role(role_raw) if role_raw is not None else None
        end = validate_end_flag(end_raw) if end_raw is not None else False
    except InvalidSessionInput as exc:
        raise BadRequest(400, str(exc), param="session") from None
    sid = ids.pop() if ids else None
    if end and sid is None:
        raise BadRequest(400, "X-Session-End needs a session id (X-Session-Id)", param="session")
    return SessionFields(sid, role, end)


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
