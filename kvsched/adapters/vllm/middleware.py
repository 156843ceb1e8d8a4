"""kvsched's ASGI middleware for vLLM's OpenAI API server.

Added to every `vllm serve` by the plugin; a strict pass-through unless the server runs kvsched's scheduler. With it:
- generation requests get their session fields validated (HTTP 400 with a message for a malformed id, role, TTL or end
  flag) and the session headers (`X-Session-Id`, `X-Agent-Role`, `X-Session-TTL`, `X-Session-End`) copied into
  `vllm_xargs`, which is how they reach the engine-core scheduler;
- `GET /kvsched/sessions` and `DELETE /kvsched/sessions/{id}` are served (honouring `--api-key`);
- `/metrics` gains the `kvsched_*` metrics, read from the scheduler at scrape time.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any
from urllib.parse import unquote

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.compaction import Compactor
from kvsched.adapters.vllm.metrics import render_metrics
from kvsched.core.sessions import (
    InvalidSessionInput,
    validate_end_flag,
    validate_role,
    validate_session_id,
    validate_ttl,
)

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
ADMIN_PREFIX = "/kvsched/sessions"
MAX_BODY_BYTES = 64 * 1024 * 1024

Scope = dict[str, Any]


class KVSchedMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._active: bool | None = None
        self.rejected = 0  # requests refused for malformed session input (exported as a metric)
        self.compaction = Compactor(app)  # context compaction (KVSCHED_COMPACTION*), see compaction.py

    def _is_active(self, scope: Scope) -> bool:
        if self._active is None:
            args = compat.server_args(scope["app"]) if "app" in scope else None
            if args is None:
                return False
            self._active = compat.is_kvsched_scheduler(getattr(args, "scheduler_cls", None))
        return self._active

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._is_active(scope):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope.get("method", "GET")
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            await self._admin(scope, receive, send, path, method)
        elif path == "/metrics" and method == "GET":
            await self._metrics(scope, receive, send)
        elif method == "POST" and path in GENERATE_PATHS:
            await self._generate(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # ---- generation requests ------------------------------------------------------------------------------------
    async def _generate(self, scope: Scope, receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        headers = _headers(scope)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # not ours to judge: vLLM answers malformed JSON itself
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            changed = apply_session_fields(payload, headers)
        except InvalidSessionInput as exc:
            self.rejected += 1
            await _json(send, 400, _error(str(exc), param="session"))
            return
        compacted = await self.compaction.prepare(scope, payload, headers)
        if compacted.error is not None:
            await _json(send, compacted.status, compacted.error)
            return
        if changed or compacted.changed:
            body = json.dumps(payload).encode()
            scope = dict(scope, headers=_replace_header(scope["headers"], b"content-length", str(len(body)).encode()))
        await self.app(scope, _replay(body, receive), compacted.wrap(send))

    # ---- admin routes -------------------------------------------------------------------------------------------
    async def _admin(self, scope: Scope, receive: Any, send: Any, path: str, method: str) -> None:
        app = scope["app"]
        if not _authorized(app, _headers(scope)):
            await _json(send, 401, {"error": "Unauthorized"})
            return
        rest = path[len(ADMIN_PREFIX):].lstrip("/")
        try:
            if not rest and method == "GET":
                sessions = await compat.call_scheduler(app, "list")
                stats = await compat.call_scheduler(app, "stats")
                await _json(send, 200, {"sessions": sessions, "stats": stats})
            elif rest and method == "DELETE":
                try:
                    sid = validate_session_id(unquote(rest))
                except InvalidSessionInput as exc:
                    await _json(send, 400, _error(str(exc), param="session_id"))
                    return
                result = await compat.call_scheduler(app, "end", sid)
                if result.get("ended"):
                    await _json(send, 200, {"session_id": sid, "ended": True})
                else:
                    await _json(send, 404, _error(f"no session {sid!r}", param="session_id", code=404))
            else:
                await _json(send, 405, _error(f"{method} {path} is not supported; use GET {ADMIN_PREFIX} or "
                                              f"DELETE {ADMIN_PREFIX}/{{id}}", code=405))
        except Exception as exc:  # the engine is gone or busy shutting down
            await _json(send, 503, _error(f"scheduler unavailable: {exc}", code=503))

    # ---- metrics ------------------------------------------------------------------------------------------------
    async def _metrics(self, scope: Scope, receive: Any, send: Any) -> None:
        try:
            stats = await compat.call_scheduler(scope["app"], "stats")
        except Exception:
            stats = None
        if stats is None:
            await self.app(scope, receive, send)
            return
        stats = dict(stats, rejected_requests=self.rejected)
        # Ask for an uncompressed body so the kvsched lines can be appended.
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"])
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    content_type = dict(start.get("headers", [])).get(b"content-type", b"").decode()
                    openmetrics = "openmetrics" in content_type
                    body = append_metrics(body, render_metrics(stats, openmetrics=openmetrics)
                                          + self.compaction.render_metrics(openmetrics=openmetrics))
                    hdrs = _replace_header(start.get("headers", []), b"content-length", str(len(body)).encode())
                    await send(dict(start, headers=hdrs))
                    await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def apply_session_fields(payload: dict[str, Any], headers: dict[str, str]) -> bool:
    """Validate the session fields of a request body + headers and copy them into `vllm_xargs`.

    Returns True if the payload changed. Raises InvalidSessionInput for any malformed field."""
    xargs = payload.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return False  # vLLM rejects a non-dict vllm_xargs with its own 400
    xargs = dict(xargs or {})
    before = dict(xargs)
    sources = [("session_id" in payload, payload.get("session_id")),
               ("x-session-id" in headers, headers.get("x-session-id")),
               (compat.XARG_SESSION_ID in xargs, xargs.get(compat.XARG_SESSION_ID))]
    ids = {validate_session_id(v) for present, v in sources if present and v is not None}
    if len(ids) > 1:
        raise InvalidSessionInput(f"conflicting session ids in one request: {sorted(ids)}")
    if ids:
        xargs[compat.XARG_SESSION_ID] = ids.pop()
    for header, key, check in (("x-agent-role", compat.XARG_ROLE, validate_role),
                               ("x-session-ttl", compat.XARG_TTL, validate_ttl),
                               ("x-session-end", compat.XARG_END, validate_end_flag)):
        raw = headers[header] if header in headers else xargs.get(key)
        if raw is None:
            continue
        value = check(raw)
        xargs[key] = int(value) if isinstance(value, bool) else value
    if xargs.get(compat.XARG_SESSION_ID) is None and any(k in xargs for k in (compat.XARG_TTL, compat.XARG_END)):
        raise InvalidSessionInput("ttl_s / session_end need a session id (X-Session-Id or vllm_xargs.session_id)")
    if xargs == before:
        return False
    payload["vllm_xargs"] = xargs
    return True


def append_metrics(body: bytes, extra: bytes) -> bytes:
    eof = b"# EOF\n"
    if body.endswith(eof):
        return body[: -len(eof)] + extra + eof
    return body + (b"" if body.endswith(b"\n") or not body else b"\n") + extra


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _replace_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != name]
    out.append((name, value))
    return out


def _authorized(app: Any, headers: dict[str, str]) -> bool:
    keys = compat.api_keys(app)
    if not keys:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.encode()).digest()
    return any(secrets.compare_digest(digest, hashlib.sha256(k.encode()).digest()) for k in keys)


def _error(message: str, param: str | None = None, code: int = 400) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed"}.get(code, "ServiceUnavailable")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _read_body(receive: Any) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive channel that yields the already-read body, then defers to the client's (disconnect detection)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json(send: Any, status: int, content: Any) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
