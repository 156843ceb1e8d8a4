"""What a request says about its session, read from every field a client may use, in one documented precedence.

kvsched's own fields come first, then the caching fields of the OpenAI and Anthropic APIs, so that clients written for
those APIs get session retention without a change:

session id (the first present wins; kvsched's three must agree):
  1. `X-Session-Id` header, body `session_id`, `vllm_xargs.session_id`
  2. `prompt_cache_key` (the id as given)
  3. `previous_response_id` (`/v1/responses`): the session of that earlier response, if this server knows it
  4. `safety_identifier`, then `user`, then Anthropic `metadata.user_id`: `user:<value>` (one id per end user; each of
     the user's conversations becomes a branch of it, see `kvsched.core.lineage`)
  5. none: session inference (the engine finds the session by the prompt's block hashes)
TTL (seconds; the server caps it at KVSCHED_MAX_TTL_S):
  1. `X-Session-TTL` header, `vllm_xargs.ttl_s`
  2. `prompt_cache_options.ttl` (a duration: "30m")
  3. `prompt_cache_retention`: "in_memory" 600 s (OpenAI keeps in-memory caches 5-10 min), "24h" 86,400 s
  4. Anthropic `cache_control.ttl` on system, message or tool blocks: the longest ("5m" when a block has none)
Role and end only come from kvsched's fields (`X-Agent-Role`, `X-Session-End` or `vllm_xargs`). A header and its
`vllm_xargs` key (role, end, TTL) given together must agree, as kvsched's three session id fields must.
`vllm_xargs.kvsched_infer` (0 keeps the request out of session inference) takes an end flag's values.

An API field's value that is not a usable id as sent (over 128 characters, control characters) is hashed into one
(`<prefix>sha256:<32 hex>`), since those APIs allow such values; a value of the wrong type, empty, or over 1,024
characters is refused with the field's name. Pure functions: the API server applies the result.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from kvsched.core.sessions import (
    InvalidSessionInput,
    SessionId,
    shown,
    validate_end_flag,
    validate_role,
    validate_session_id,
    validate_ttl,
)

MAX_API_VALUE_LEN = 1024
RETENTION_TTL_S = {"in_memory": 600.0, "24h": 86_400.0}
DEFAULT_CACHE_CONTROL_TTL_S = 300.0
USER_PREFIX = "user:"
INFER_KEY = "kvsched_infer"  # the engine's `compat.XARG_INFER`: 0 keeps a request out of session inference
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)", re.ASCII)  # fullmatch: "²m" and "5m\n" are no durations
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}

PreviousSession = Callable[[str], SessionId | None]


@dataclass(frozen=True, slots=True)
class SessionFields:
    """The session a request names (None: it names none) and its hints, each with the field it came from."""

    session_id: SessionId | None = None
    source: str | None = None
    ttl_s: float | None = None
    ttl_source: str | None = None
    role: str | None = None
    end: bool | None = None
    infer: bool | None = None


def read_session_fields(payload: Mapping[str, Any], headers: Mapping[str, str],
                        previous: PreviousSession = lambda _r: None) -> SessionFields:
    """Apply the precedence above to a request body and its (lower-cased) headers. Raises InvalidSessionInput whose
    `field` names the offending field."""
    sid, source = _explicit_id(payload, headers)
    for name, prefix in (("prompt_cache_key", ""), ("previous_response_id", None), ("safety_identifier", USER_PREFIX),
                         ("user", USER_PREFIX)):
        if name not in payload or payload[name] is None:
            continue
        value = _api_string(payload[name], name)
        if sid is not None:
            continue
        if prefix is None:
            found = previous(value)
            if found is not None:
                sid, source = found, name
        else:
            sid, source = api_session_id(prefix, value), name
    metadata = payload.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("user_id") is not None:
        value = _api_string(metadata["user_id"], "metadata.user_id")
        if sid is None:
            sid, source = api_session_id(USER_PREFIX, value), "metadata.user_id"
    ttl, ttl_source = _ttl(payload, headers)
    xargs = _xargs(payload)
    role = _hint(headers, xargs, "x-agent-role", "agent_role", validate_role)
    end = _hint(headers, xargs, "x-session-end", "session_end", validate_end_flag)
    infer = validate_infer(xargs.get(INFER_KEY))
    if sid is None and (end is not None or ttl_source in ("X-Session-TTL", "vllm_xargs.ttl_s")):
        raise InvalidSessionInput("ttl_s / session_end need a session id (X-Session-Id or vllm_xargs.session_id)",
                                  field="session_id")
    return SessionFields(sid, source, ttl, ttl_source, role, end, infer)


def api_session_id(prefix: str, value: str) -> SessionId:
    """The session id for an API field's value: as given when it is a valid id, else a digest of it."""
    try:
        return validate_session_id(prefix + value)
    except InvalidSessionInput:
        return SessionId(f"{prefix}sha256:{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}")


def validate_infer(raw: object) -> bool | None:
    """`vllm_xargs.kvsched_infer` as a flag (None: not given), as the engine reads it (`compat.request_scope`). Found
    by probing: "maybe", [0] or 0.5 were served and read as "infer", "false" and "no" too."""
    if raw is None:
        return None
    try:
        return validate_end_flag(raw)
    except InvalidSessionInput:
        raise InvalidSessionInput(f"vllm_xargs.{INFER_KEY} must be 0/1, true/false or yes/no (0 keeps the request out "
                                  f"of session inference), got {shown(raw)}", field=f"vllm_xargs.{INFER_KEY}") from None


def parse_duration(raw: object, field: str) -> float:
    """"30s", "5m", "1h" -> seconds."""
    m = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
    value = float(m.group(1)) * _UNIT_S[m.group(2)] if m else math.nan
    if not math.isfinite(value):
        raise InvalidSessionInput(f"{field} must be a duration such as \"5m\" or \"1h\", got {raw!r}", field=field)
    return value


# ---- internals --------------------------------------------------------------------------------------------------
def _xargs(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    xargs = payload.get("vllm_xargs")
    return xargs if isinstance(xargs, Mapping) else {}


def _explicit_id(payload: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[SessionId | None, str | None]:
    xargs = _xargs(payload)
    found: dict[SessionId, str] = {}
    for present, value, name in (("x-session-id" in headers, headers.get("x-session-id"), "X-Session-Id"),
                                 ("session_id" in payload, payload.get("session_id"), "session_id"),
                                 ("session_id" in xargs, xargs.get("session_id"), "vllm_xargs.session_id")):
        if present and value is not None:
            try:
                found.setdefault(validate_session_id(value), name)
            except InvalidSessionInput as exc:
                raise InvalidSessionInput(str(exc), field=name) from None
    if len(found) > 1:
        raise InvalidSessionInput(f"conflicting session ids in one request: {sorted(found)}", field="session_id")
    return next(iter(found.items()), (None, None))


def _api_string(raw: object, field: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidSessionInput(f"{field} must be a non-empty string, got {raw!r}"[:200], field=field)
    if len(raw) > MAX_API_VALUE_LEN:
        raise InvalidSessionInput(f"{field} is {len(raw)} characters long; the limit is {MAX_API_VALUE_LEN}",
                                  field=field)
    return raw


def _hint(headers: Mapping[str, str], xargs: Mapping[str, Any], header: str, key: str,
          check: Callable[[object], Any]) -> Any:
    """The hint from its header or `vllm_xargs` key, validated; both present must agree (as the session ids must:
    found by review, the header silently won over a different `vllm_xargs.agent_role`)."""
    found = []
    for field, raw in ((header, headers.get(header)), (f"vllm_xargs.{key}", xargs.get(key))):
        if raw is None:
            continue
        try:
            found.append(check(raw))
        except InvalidSessionInput as exc:
            raise InvalidSessionInput(str(exc), field=field) from None
    if len(found) > 1 and found[0] != found[1]:
        raise InvalidSessionInput(f"conflicting {key} in one request: {header} {found[0]!r}, vllm_xargs.{key} "
                                  f"{found[1]!r}"[:200], field=header)
    return found[0] if found else None


def _ttl(payload: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[float | None, str | None]:
    """Every TTL field present is validated; the highest in the precedence is used."""
    found: list[tuple[float, str]] = []
    explicit = _hint(headers, _xargs(payload), "x-session-ttl", "ttl_s", validate_ttl)
    if explicit is not None:
        found.append((explicit, "X-Session-TTL" if "x-session-ttl" in headers else "vllm_xargs.ttl_s"))
    options = payload.get("prompt_cache_options")
    if options is not None and not isinstance(options, Mapping):  # found by review: a string or list passed
        raise InvalidSessionInput(f"prompt_cache_options must be an object, got {options!r}"[:200],
                                  field="prompt_cache_options")
    if isinstance(options, Mapping) and options.get("ttl") is not None:
        found.append((parse_duration(options["ttl"], "prompt_cache_options.ttl"), "prompt_cache_options.ttl"))
    retention = payload.get("prompt_cache_retention")
    if retention is not None:
        if not isinstance(retention, str) or retention not in RETENTION_TTL_S:
            raise InvalidSessionInput(f"prompt_cache_retention must be one of {sorted(RETENTION_TTL_S)}, got "
                                      f"{retention!r}"[:200], field="prompt_cache_retention")
        found.append((RETENTION_TTL_S[retention], "prompt_cache_retention"))
    controls = [c for c in _cache_controls(payload)]
    if controls:
        found.append((max(_cache_control_ttl(c) for c in controls), "cache_control.ttl"))
    return found[0] if found else (None, None)


def _cache_controls(payload: Mapping[str, Any]) -> list[object]:
    """`cache_control` values of the system blocks, message content blocks and tools (Anthropic's breakpoints; some
    OpenAI-compatible clients put them on chat content parts too)."""
    blocks: list[object] = []
    for name in ("system", "tools"):
        if isinstance(payload.get(name), list):
            blocks.extend(payload[name])
    messages = payload.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, Mapping) and isinstance(m.get("content"), list):
                blocks.extend(m["content"])
    return [b["cache_control"] for b in blocks if isinstance(b, Mapping) and b.get("cache_control") is not None]


def _cache_control_ttl(control: object) -> float:
    if not isinstance(control, Mapping) or control.get("type", "ephemeral") != "ephemeral":
        raise InvalidSessionInput(f"cache_control must be {{\"type\": \"ephemeral\", \"ttl\": \"5m\" | \"1h\"}}, got "
                                  f"{control!r}"[:200], field="cache_control")
    ttl = control.get("ttl")
    return DEFAULT_CACHE_CONTROL_TTL_S if ttl is None else parse_duration(ttl, "cache_control.ttl")


def repeated_header(raw_headers: Iterable[tuple[bytes, bytes]], names: Iterable[str]) -> str | None:
    """The first of `names` (lower case) sent more than once with different values, or None. A server reads one of
    them (Starlette the first, a dict of its items the last) and the other would be dropped unsaid: found by probing,
    two X-Session-Id headers (one a proxy's) were served 200 under one of them, by the engine and by the Ray ingress.
    The same value repeated is that value. Both adapters answer a name with a 400."""
    wanted = frozenset(names)
    seen: dict[str, bytes] = {}
    for k, v in raw_headers:
        name = k.decode("latin-1").lower()
        if name in wanted and seen.setdefault(name, v) != v:
            return name
    return None


def repeated_param(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The first query parameter of `pairs` given more than once (any values), or None: one of them would be used
    unsaid (found by review: `?limit=1&limit=2` took the last). The engine and the Ray ingress answer it with a 400."""
    names = [name for name, _ in pairs]
    return next((name for name in names if names.count(name) > 1), None)


def raw_path_is_utf8(raw_path: object) -> bool:
    """Whether a request's raw path (the ASGI scope's `raw_path`, escapes not decoded) decodes as UTF-8. The server
    decodes `%ff` to U+FFFD: found by probing, DELETE /kvsched/sessions/%ff ended the session named "\ufffd". True
    when the server gives no raw path."""
    if not isinstance(raw_path, bytes):
        return True
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
