"""API-server side of the session fields: reads them from a generation request (`kvsched.core.client_fields` holds
the precedence) and writes the canonical values into `vllm_xargs`, which is how they reach the engine-core scheduler.

The server's own values are authoritative: `kvsched_tenant` is always set from the authenticated key (a client's
value is dropped), and on `/v1/responses` the response id is fixed before the request runs so that a later
`previous_response_id` finds this request's session.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.http_io import container_items, containers
from kvsched.core import sessions
from kvsched.core.client_fields import SessionFields, read_session_fields, validate_infer
from kvsched.core.sessions import InvalidSessionInput, SessionId

RESPONSES_PATH = "/v1/responses"
SESSION_HEADERS = ("x-session-id", "x-agent-role", "x-session-ttl", "x-session-end")


class ResponseSessions:
    """(tenant, cache_salt, response id) -> session id of the `/v1/responses` requests this server ran; bounded,
    oldest first. Scoped so that naming another tenant's response id finds nothing. Salt and response id are the
    client's strings of any length: the table keeps a digest of each, so an entry costs the same whatever was sent.
    A full table evicts the oldest entry of the tenant holding the most (found by review: one LRU for all, filled
    before vLLM checks a request, let one key's cheap requests push out every other key's entries). Tenants are the
    server's API keys, so the scan for the largest is over a handful."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._maps: dict[str | None, OrderedDict[tuple[bytes, bytes], SessionId]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @staticmethod
    def _key(salt: str | None, response_id: str) -> tuple[bytes, bytes]:
        def digest(text: str) -> bytes:
            return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

        return b"" if salt is None else b"s" + digest(salt), digest(response_id)

    def get(self, tenant: str | None, salt: str | None, response_id: str) -> SessionId | None:
        entries = self._maps.get(tenant)
        return None if entries is None else entries.get(self._key(salt, response_id))

    def put(self, tenant: str | None, salt: str | None, response_id: str, session: SessionId) -> None:
        entries = self._maps.setdefault(tenant, OrderedDict())
        key = self._key(salt, response_id)
        self._size += key not in entries
        entries[key] = session
        entries.move_to_end(key)
        while self._size > self.capacity:
            largest = max(self._maps, key=lambda t: len(self._maps[t]))
            self._maps[largest].popitem(last=False)
            self._size -= 1
            if not self._maps[largest]:
                del self._maps[largest]


def apply_session_fields(payload: dict[str, Any], headers: Mapping[str, str], tenant: str | None = None,
                         path: str = "", responses: ResponseSessions | None = None) -> bool:
    """Validate every session field of a request body + (UTF-8 decoded, lower-cased) headers and write the canonical
    values into `vllm_xargs`. Returns True if the payload changed. Raises InvalidSessionInput (with the field)."""
    xargs = payload.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return False  # vLLM rejects a non-dict vllm_xargs with its own 400
    salt = payload.get("cache_salt") if isinstance(payload.get("cache_salt"), str) else None

    def previous(response_id: str) -> SessionId | None:
        return responses.get(tenant, salt, response_id) if responses is not None else None

    fields = read_session_fields(payload, headers, previous if path == RESPONSES_PATH else lambda _r: None)
    before = dict(xargs or {})
    out = dict(before)
    out.pop(compat.XARG_TENANT, None)
    out.pop(compat.XARG_COMPACTED, None)  # only kvsched's compaction sets these two (compaction.py)
    out.pop(compat.XARG_CONVERSATION, None)
    _write(out, fields, tenant)
    changed = out != before
    if changed:
        payload["vllm_xargs"] = out
    rid = payload.get("request_id")
    # a request id of another type is left for vLLM to refuse (found by probing: it was replaced, and served 200)
    if path == RESPONSES_PATH and fields.session_id is not None and responses is not None \
            and (rid is None or isinstance(rid, str)):
        if not rid:
            rid = payload["request_id"] = f"resp_{uuid.uuid4().hex}"
            changed = True
        responses.put(tenant, salt, rid, fields.session_id)
    return changed


def _write(xargs: dict[str, Any], fields: SessionFields, tenant: str | None) -> None:
    if fields.session_id is not None:
        xargs[compat.XARG_SESSION_ID] = fields.session_id
    if fields.ttl_s is not None:
        xargs[compat.XARG_TTL] = fields.ttl_s
    if fields.role is not None:
        xargs[compat.XARG_ROLE] = fields.role
    if fields.end is not None:
        xargs[compat.XARG_END] = int(fields.end)
    if tenant is not None:
        xargs[compat.XARG_TENANT] = tenant


RESERVED_XARGS = (compat.XARG_TENANT, compat.XARG_COMPACTED, compat.XARG_CONVERSATION)  # the middleware's own
_XARGS_NAMES = ("vllm_xargs", "extra_args")  # where a request body carries SamplingParams.extra_args
# Routes besides the four kvsched rewrites that run engine requests with a session id (vLLM's `_get_session_id`: the
# body's `session_id`, the X-Session-ID header, `vllm_xargs.session_id`). Exact paths: render, count_tokens or abort
# routes run nothing, and an SDK sending the header everywhere must not be refused there.
# The audio routes carry `vllm_xargs` only (a form field vLLM copies into the extra args): no `session_id` field, and
# vLLM reads no X-Session-ID header there (found by review: they were missing, their sessions shared by every key).
XARGS_ONLY_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
SESSION_ROUTES = frozenset({"/v1/chat/completions/batch", "/inference/v1/generate", "/invocations", "/cohere/v2/chat",
                            *XARGS_ONLY_ROUTES})


SESSION_KEYS = (b"session", b"ttl_s", b"agent_role")  # in a body that may name a session's fields (session_id, _end)
# A `\\u` escape of a lowercase letter or `_`, the only characters of those names and of kvsched's marks: other escapes
# (any non-ASCII text under `ensure_ascii`, HTML-safe `\\u003c`) cannot spell one.
_ESCAPED_NAME_CHAR = re.compile(rb"\\u00(?:5[fF]|6[1-9a-fA-F]|7[0-9aA])")


def needs_scan(body: bytes, tenant: str | None, route: str, session_header: bool = False) -> bool:
    """Whether a JSON body on a route kvsched does not rewrite can hold anything `check_unhandled_body` refuses: one of
    kvsched's marks (spelled out, or behind `\\u` escapes), or a session field on a `SESSION_ROUTES` route
    (checked for every caller).
    Found by review: every such body (up to 1 GiB: embeddings, scores) was parsed here and again by vLLM.
    The byte search reads UTF-8 only, and vLLM's parser (`json.loads(bytes)`) also reads UTF-16 and UTF-32, choosing by
    `json.detect_encoding`: a body it would read as either is always parsed and checked (found by review: a UTF-16
    body carried forged marks past the search). Checked rather than refused, so a client sending it loses nothing."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):  # json.loads' own choice; a BOM'd UTF-8 is searchable
        return True
    if route in SESSION_ROUTES and (tenant is not None or session_header or any(f in body for f in SESSION_KEYS)):
        return True
    return b"kvsched" in body or _ESCAPED_NAME_CHAR.search(body) is not None


_RESERVED = frozenset(RESERVED_XARGS)


def _path_to(root: Any, target: Any) -> str:
    """Where `target` (a container) sits in `root`, as `a.b[2].c`; "" for the root. Only for an error's message, so
    the walk that finds errors builds no path per element (found by review: it built one string per element)."""
    keys: list[Any] = []
    walks: list[Iterator[tuple[Any, Any]]] = [] if root is target else [container_items(root)]
    while walks:
        for key, child in walks[-1]:
            if child is target:
                keys.append(key)
                walks = []
                break
            keys.append(key)
            walks.append(container_items(child))
            break
        else:
            walks.pop()
            if keys:
                keys.pop()
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else f".{key}" if out else str(key)
    return out


def check_unhandled_body(payload: object, headers: Mapping[str, bytes], tenant: str | None, route: str = "") -> None:
    """A body (JSON, or a form's fields) on a route whose session fields kvsched does not rewrite: vLLM passes its
    `vllm_xargs`/`extra_args` to the engine as they are. Raises InvalidSessionInput (a 400) for one of kvsched's own
    marks anywhere in it (a forged tenant reaches another key's sessions, a forged compaction mark ends a branch), and,
    for a caller with a key of its own on a route that gives requests a session (`SESSION_ROUTES`), for a
    session named there: nothing on that route scopes it to the caller's key, so two keys would share it. On those
    routes every caller's session fields are checked as on the rewritten ones (`_check_session_fields`).
    The walk costs a Python step per object and array, none per scalar, and allocates nothing per element."""
    items = payload if isinstance(payload, list) else [payload]  # a batch's requests, or the one request
    if route in XARGS_ONLY_ROUTES:
        headers = {}  # nothing but the extra args names a session there
        items = [{k: v for k, v in r.items() if k != "session_id"} if isinstance(r, dict) else r for r in items]
    named = "x-session-id" in headers or any(isinstance(r, dict) and r.get("session_id") for r in items)
    stack: list[Any] = [payload] if isinstance(payload, dict | list) else []
    while stack:
        node = stack.pop()
        if type(node) is dict:
            if not _RESERVED.isdisjoint(node):
                key = next(k for k in node if k in _RESERVED)
                where = _path_to(payload, node)
                path = f"{where}.{key}" if where else key
                raise InvalidSessionInput(f"{path} is set by kvsched's middleware only", field=path)
            for name in _XARGS_NAMES:
                xargs = node.get(name)
                if isinstance(xargs, dict) and xargs.get(compat.XARG_SESSION_ID) is not None:
                    named = True
            stack += containers(node.values())
        else:
            stack += containers(node)
    if named and tenant is not None and route in SESSION_ROUTES:
        raise InvalidSessionInput("sessions are kept per API key on /v1/chat/completions, /v1/completions, "
                                  "/v1/responses and /v1/messages only: this route cannot scope one to your key",
                                  field="session_id")
    if route in SESSION_ROUTES:
        _check_session_fields(items, headers)


def _request_xargs(item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Where a request body of these routes carries the engine request's extra args: its own `vllm_xargs` or
    `extra_args`, or its `sampling_params`' (/inference/v1/generate). Not any key of those names deeper in the body
    (found by review: a JSON schema with an `extra_args` property was refused)."""
    params = item.get("sampling_params")
    places = [(name, item.get(name)) for name in _XARGS_NAMES]
    if isinstance(params, dict):
        places += [(f"sampling_params.{name}", params.get(name)) for name in _XARGS_NAMES]
    return [(where, x) for where, x in places if isinstance(x, dict)]


def _check_session_fields(items: list[Any], headers: Mapping[str, bytes]) -> None:
    """The session fields the engine reads on a `SESSION_ROUTES` route, checked as on the four kvsched rewrites: the
    engine drops a malformed one silently (`compat.request_session`), so the caller would lose its session unawares
    (found by review: a 500-character id or a NaN TTL on /invocations was answered 200 with no session). The header
    is passed on as sent and vLLM decodes it as Latin-1, kvsched's rewritten routes as UTF-8: only ASCII ids, the same
    under both, are taken there."""
    if "x-session-id" in headers:
        if not headers["x-session-id"].isascii():  # found by review: checked as UTF-8, read by vLLM as Latin-1
            raise InvalidSessionInput("X-Session-Id: vLLM reads this header as Latin-1 on this route, so a non-ASCII "
                                      "id names another session than sent: use vllm_xargs.session_id for non-ASCII ids",
                                      field="X-Session-Id")
        try:
            sessions.validate_session_id(headers["x-session-id"].decode("utf-8"))
        except (UnicodeDecodeError, InvalidSessionInput) as exc:
            raise InvalidSessionInput(f"X-Session-Id: {exc}"[:200], field="X-Session-Id") from None
    checks: list[tuple[str, object, Any]] = [("session_id", r.get("session_id"), sessions.validate_session_id)
                                             for r in items if isinstance(r, dict)]
    for where, xargs in (x for r in items if isinstance(r, dict) for x in _request_xargs(r)):
        checks += [(f"{where}.{k}", xargs.get(k), check) for k, check in (
            (compat.XARG_SESSION_ID, sessions.validate_session_id), (compat.XARG_TTL, sessions.validate_ttl),
            (compat.XARG_ROLE, sessions.validate_role), (compat.XARG_END, sessions.validate_end_flag),
            (compat.XARG_INFER, validate_infer))]
    for field, value, check in checks:
        if value is not None:
            try:
                check(value)
            except InvalidSessionInput as exc:
                raise InvalidSessionInput(str(exc), field=field) from None
