"""kvsched's session routes on vLLM's API server, after authentication:

- `GET /kvsched/sessions?limit=&cursor=&summary=1`: the caller's sessions, paged in a stable order (default 100, at
  most 1,000 per page; `next_cursor` continues), or counts only (a parameter given twice is a 400);
- `DELETE /kvsched/sessions/{id}`: end the caller's sessions with that id (every branch); `DELETE /kvsched/sessions`:
  end all of the caller's sessions.

The caller's scope (`kvsched.core.tenancy.Caller`) is its API key's tenant and the salt it names with the
`X-KVSched-Cache-Salt` header, or `X-KVSched-Cache-Salt-B64` for any salt (none: unsalted sessions); an admin key
(KVSCHED_ADMIN_KEYS) reaches every tenant. The path is decoded exactly once (by the server: `scope["path"]`), so `%2541`
is the id `%41`, never `A`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any
from urllib.parse import parse_qsl

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.auth import Identity
from kvsched.adapters.vllm.http_io import HttpError, Scope, error_body, refuse_repeated, send_json, utf8_headers
from kvsched.core.client_fields import raw_path_is_utf8, repeated_param
from kvsched.core.sessions import InvalidSessionInput, validate_session_id
from kvsched.core.tenancy import Caller, InvalidQuery, parse_page_query

ADMIN_PREFIX = "/kvsched/sessions"
SALT_HEADER = "x-kvsched-cache-salt"
# Any salt a body may carry, base64 of its UTF-8: found by review, a salt with edge spaces (a header's are stripped),
# over 1,024 characters or with characters a header cannot carry left its owner unable to list or end its sessions.
SALT_B64_HEADER = "x-kvsched-cache-salt-b64"
MAX_B64_SALT_CHARS = 65_536
MAX_QUERY_FIELDS = 8
# How long a session route waits for the engine core (it answers between steps): found by review, a stuck engine
# core hung these routes for good. A DELETE that times out may still apply once the engine answers.
ENGINE_TIMEOUT_S = 30.0
# Session-route calls one API server has in flight to the engine core at once; more wait here, in arrival order.
SESSION_CALLS_IN_FLIGHT = 2


class EngineCalls:
    """This API server's session-route calls to the engine core. vLLM runs queued utility calls on the engine-core
    thread before its next step, so a burst of them held decoding (found by review): at most SESSION_CALLS_IN_FLIGHT
    are in flight, the others queue here, and identical reads (same caller, same query) pending at once share one
    call. A call, queueing included, gives up after ENGINE_TIMEOUT_S (503)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(1)
        self._reads: dict[str, asyncio.Future[Any]] = {}

    async def call(self, app: Any, op: str, *args: Any, shared: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test's): nothing pending carries over
            self._loop, self._reads = loop, {}
            self._slots = asyncio.Semaphore(self.limit or SESSION_CALLS_IN_FLIGHT)
        if not shared:
            return await asyncio.wait_for(self._limited(app, op, args), ENGINE_TIMEOUT_S)
        key = json.dumps([op, *args])
        pending = self._reads.get(key)
        if pending is None:
            pending = self._reads[key] = asyncio.ensure_future(
                asyncio.wait_for(self._limited(app, op, args), ENGINE_TIMEOUT_S))
            pending.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(pending)  # a caller that leaves does not cancel the others' call

    async def _limited(self, app: Any, op: str, args: tuple[Any, ...]) -> Any:
        async with self._slots:
            return await compat.call_scheduler(app, op, *args)

    def _done(self, key: str, done: asyncio.Future[Any]) -> None:
        if self._reads.get(key) is done:
            del self._reads[key]
        if not done.cancelled():
            done.exception()  # retrieved: no "exception was never retrieved" warning when every caller left


async def handle(app: Any, scope: Scope, send: Any, path: str, ident: Identity, raw_headers: dict[str, bytes],
                 calls: EngineCalls) -> None:
    method = scope.get("method", "GET")
    try:
        refuse_repeated(scope, (SALT_HEADER, SALT_B64_HEADER))
        caller = _caller(ident, raw_headers)
        rest = _session_path(scope, path)
        if rest is None and method == "GET":
            await _list(calls, app, scope, send, caller)
        elif rest is None and method == "DELETE":
            result = await calls.call(app, "end_all", caller.as_args())
            await send_json(send, 200, {"ended": int(result.get("ended", 0))})
        elif rest is not None and method == "DELETE":
            await _end(calls, app, send, rest, caller)
        else:
            raise HttpError(405, f"{method} {path[:200]} is not supported; use GET {ADMIN_PREFIX}, DELETE "
                                 f"{ADMIN_PREFIX}/{{id}} or DELETE {ADMIN_PREFIX}")
    except HttpError as exc:
        await send_json(send, exc.status, exc.body)
    except TimeoutError:
        await send_json(send, 503, error_body(f"the engine core did not answer within {ENGINE_TIMEOUT_S:g} s (busy or "
                                              "stuck); a DELETE may still apply, retry to see", code=503))
    except Exception as exc:  # the engine is gone or busy shutting down
        await send_json(send, 503, error_body(f"scheduler unavailable: {type(exc).__name__}", code=503))


def _session_path(scope: Scope, path: str) -> str | None:
    """The `{id}` of `/kvsched/sessions/{id}` (None for the collection). The server decodes the path's escapes with
    U+FFFD for bytes that are no UTF-8 (found by probing: DELETE /kvsched/sessions/%ff ended the session named
    "\ufffd"): such a path is a 400, read from `raw_path` when the server gives it."""
    if not path.startswith(ADMIN_PREFIX + "/"):
        return None
    if "\ufffd" in path and not raw_path_is_utf8(scope.get("raw_path")):
        raise HttpError(400, "the session id in the path is not UTF-8 (percent-encode the id's UTF-8 bytes)",
                        param="session_id")
    return path[len(ADMIN_PREFIX) + 1:]


def _caller(ident: Identity, raw_headers: dict[str, bytes]) -> Caller:
    salt = utf8_headers(raw_headers, (SALT_HEADER,)).get(SALT_HEADER)
    if salt is not None and not 1 <= len(salt) <= 1024:
        raise HttpError(400, "X-KVSched-Cache-Salt must be 1 to 1024 characters", param=SALT_HEADER)
    encoded = raw_headers.get(SALT_B64_HEADER)
    if encoded is not None:
        if salt is not None:
            raise HttpError(400, "send X-KVSched-Cache-Salt or X-KVSched-Cache-Salt-B64, not both", param=SALT_HEADER)
        salt = _b64_salt(encoded)
    return Caller(admin=ident.admin, tenant=ident.tenant, cache_salt=salt, salt_given=salt is not None)


async def _list(calls: EngineCalls, app: Any, scope: Scope, send: Any, caller: Caller) -> None:
    try:
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                          max_num_fields=MAX_QUERY_FIELDS)
        params = dict(pairs)
        if (twice := repeated_param(pairs)) is not None:  # as a repeated header
            raise HttpError(400, f"query parameter {twice[:64]!r} is given more than once: give it once",
                            param=twice[:64])
        query = parse_page_query(params)
    except InvalidQuery as exc:
        raise HttpError(400, str(exc), param=exc.param) from None
    except ValueError:
        raise HttpError(400, f"at most {MAX_QUERY_FIELDS} query parameters", param="query") from None
    cursor = params.get("cursor") or None  # checked by parse_page_query; the engine decodes it again
    mode = "pinned_ids" if query.pinned_ids else query.summary
    page = not query.summary and not query.pinned_ids  # a page carries the stats, from the same engine call
    result = await calls.call(app, "list", caller.as_args(), query.limit, cursor, mode, page, shared=True)
    if "error" in result:
        raise HttpError(400, str(result["error"]), param="cursor")
    await send_json(send, 200, result)  # (shared with identical calls: read, never changed)


async def _end(calls: EngineCalls, app: Any, send: Any, raw_id: str, caller: Caller) -> None:
    try:
        sid = validate_session_id(raw_id)
    except InvalidSessionInput as exc:
        raise HttpError(400, str(exc), param="session_id") from None
    result = await calls.call(app, "end", sid, caller.as_args())
    if result.get("ended"):
        await send_json(send, 200, {"session_id": sid, "ended": True})
    else:  # none of the caller's: another tenant's session is indistinguishable from none
        raise HttpError(404, f"no session {sid!r}", param="session_id")


def _b64_salt(encoded: bytes) -> str:
    text = encoded.strip().replace(b"-", b"+").replace(b"_", b"/")  # the URL-safe alphabet too
    try:
        salt = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "X-KVSched-Cache-Salt-B64 must be base64 of the salt's UTF-8",
                        param=SALT_B64_HEADER) from None
    if not 1 <= len(salt) <= MAX_B64_SALT_CHARS:
        raise HttpError(400, f"the salt must be 1 to {MAX_B64_SALT_CHARS} characters", param=SALT_B64_HEADER)
    return salt
