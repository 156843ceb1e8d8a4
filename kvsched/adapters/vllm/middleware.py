"""kvsched's ASGI middleware for vLLM's OpenAI API server.

Added by the plugin to a `vllm serve` that runs kvsched's scheduler (and a strict pass-through on any other). With it:
- **authentication first** (`auth.py`): vLLM puts plugin middleware outside its own key check, so kvsched checks the
  key itself before doing anything; a request vLLM will refuse is passed on untouched (vLLM answers 401);
- generation requests (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/messages`) get their session
  fields validated (HTTP 400 naming the field) and written canonically into `vllm_xargs`, which is how they reach the
  engine-core scheduler (`request_fields.py`; precedence in `kvsched.core.client_fields`), plus the caller's tenant;
  bodies over 64 MiB get 413, JSON nested too deep 400, a body not all arrived within 60 s (KVSCHED_BODY_TIMEOUT_S)
  408 and a compressed one 415 (`http_io.py`); a refused body is drained before the answer on a closing connection
  (`adapters/http_body.py`);
- chat requests may be compacted (`compaction.py`), as the operator's settings allow; one that vLLM refuses for
  what the rewrite may have caused is sent again as the client sent it (`compaction_outcome.py`);
- `GET /kvsched/sessions` and `DELETE /kvsched/sessions[/{id}]` are served, scoped to the caller (`admin_routes.py`);
- `/metrics` gains the `kvsched_*` metrics, read from the scheduler at scrape time (`kvsched_stats_up 0` and the API
  server's own counters only, if the engine core does not answer within STATS_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any
from urllib.parse import parse_qs

from kvsched.adapters.http_body import BODY_TIMEOUT_S
from kvsched.adapters.vllm import admin_routes, compat
from kvsched.adapters.vllm.auth import Auth
from kvsched.adapters.vllm.compaction import STRATEGY_HEADER, Compactor
from kvsched.adapters.vllm.compaction_outcome import UNCHANGED
from kvsched.adapters.vllm.http_io import (
    MAX_JSON_CONTAINERS,
    SCAN_BODY_BYTES,
    Disconnected,
    HttpError,
    Scope,
    body_kind,
    check_content_encoding,
    error_body,
    first_headers,
    form_fields,
    parse_json,
    read_body,
    refuse,
    refuse_repeated,
    replace_header,
    replay,
    route_path,
    send_json,
    utf8_headers,
    with_request_id,
)
from kvsched.adapters.vllm.metrics import render_metrics
from kvsched.adapters.vllm.request_fields import (
    SESSION_HEADERS,
    SESSION_ROUTES,
    XARGS_ONLY_ROUTES,
    ResponseSessions,
    apply_session_fields,
    check_unhandled_body,
    needs_scan,
)
from kvsched.adapters.vllm.settings_check import body_timeout_s
from kvsched.core.sessions import InvalidSessionInput

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
ADMIN_PREFIX = admin_routes.ADMIN_PREFIX
STATS_TIMEOUT_S = 2.0  # a scrape waits this long for the engine core's stats, then reports kvsched_stats_up 0


class KVSchedMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._active: bool | None = None
        self.rejected = 0  # requests refused for malformed session input (exported as a metric)
        try:  # a generation request's body not all arrived by then: 408 (http_io.py); KVSCHED_BODY_TIMEOUT_S
            self.body_timeout_s = body_timeout_s()
        except ValueError:  # refused at start by kvsched's server; a stock one (all passed on) reads no body
            self.body_timeout_s = BODY_TIMEOUT_S
        self.auth = Auth()
        self.responses = ResponseSessions()  # /v1/responses ids -> sessions, for previous_response_id
        self.compaction = Compactor(app)  # context compaction (KVSCHED_COMPACTION*), see compaction.py
        self.session_calls = admin_routes.EngineCalls()  # bounded, shared: see admin_routes
        self._cors: Any = None  # vLLM's CORS settings, for the answers kvsched makes itself (`_reply`)
        self._request_ids: bool | None = None  # vLLM's --enable-request-id-headers, for the same answers

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
        path, method = route_path(scope), scope.get("method", "GET")
        is_admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        if not is_admin and not (method == "POST" and path in GENERATE_PATHS):
            if (path == "/metrics" or path.startswith("/metrics/")) and method == "GET":  # vLLM serves both
                await self._metrics(scope, receive, send)
            elif method in ("GET", "HEAD", "OPTIONS"):
                await self.app(scope, receive, send)
            else:
                await self._unhandled(scope, receive, send, path)
            return
        if is_admin and method == "OPTIONS":  # as vLLM's authentication does (CORS preflights): vLLM answers it
            await self.app(scope, receive, send)
            return
        raw = first_headers(scope)
        ident = self.auth.identify(scope["app"], raw.get("authorization"))
        if is_admin:
            if not (ident.authenticated or ident.admin):
                await send_json(self._reply(scope, raw, send), 401, {"error": "Unauthorized"})
            else:
                await admin_routes.handle(scope["app"], scope, self._reply(scope, raw, send), path, ident, raw,
                                          self.session_calls)
        elif not ident.authenticated:  # vLLM refuses it: nothing of kvsched runs for it
            await self.app(scope, receive, send)
        else:
            await self._generate(scope, receive, send, path, raw, ident.tenant)

    def _reply(self, scope: Scope, raw: dict[str, bytes], send: Any) -> Any:
        """`send` for an answer kvsched makes itself, with the headers vLLM's own middleware gives its answers: vLLM
        adds kvsched's middleware outside its own, so kvsched's answers never passed through them. The CORS headers of
        vLLM's CORSMiddleware (`--allowed-origins` and its siblings; found by review: a browser UI of an allowed origin
        could read neither a session page nor kvsched's 400 naming a bad field), then, as vLLM's stack orders them,
        the X-Request-Id of its XRequestIdMiddleware (`--enable-request-id-headers`; an operator's logs and clients
        matched every answer by it but kvsched's). Answers vLLM makes, passed through, already carry them."""
        if self._request_ids is None:
            args = compat.server_args(scope["app"])
            self._request_ids = bool(getattr(args, "enable_request_id_headers", False))
        if self._request_ids:
            send = with_request_id(send, raw.get("x-request-id"))
        if "origin" not in raw:
            return send
        from starlette.datastructures import Headers
        from starlette.middleware.cors import CORSMiddleware

        if self._cors is None:
            args = compat.server_args(scope["app"])
            self._cors = CORSMiddleware(self.app, allow_origins=getattr(args, "allowed_origins", None) or (),
                                        allow_methods=getattr(args, "allowed_methods", None) or ("GET",),
                                        allow_headers=getattr(args, "allowed_headers", None) or (),
                                        allow_credentials=bool(getattr(args, "allow_credentials", False)))
        return functools.partial(self._cors.send, send=send, request_headers=Headers(scope=scope))

    # ---- generation requests ------------------------------------------------------------------------------------
    async def _generate(self, scope: Scope, receive: Any, send: Any, path: str, raw: dict[str, bytes],
                        tenant: str | None) -> None:
        outcome, reply = UNCHANGED, self._reply(scope, raw, send)
        try:
            check_content_encoding(raw)
            body = await read_body(scope, receive, timeout_s=self.body_timeout_s)
            payload = parse_json(body, MAX_JSON_CONTAINERS)
            if isinstance(payload, dict):  # anything else is not ours to judge: vLLM answers malformed JSON itself
                refuse_repeated(scope, (*SESSION_HEADERS, STRATEGY_HEADER))
                headers = utf8_headers(raw, (*SESSION_HEADERS, STRATEGY_HEADER))
                try:
                    changed = apply_session_fields(payload, headers, tenant, path, self.responses)
                except InvalidSessionInput as exc:
                    self.rejected += 1
                    raise HttpError(400, str(exc), param=exc.field or "session") from None
                outcome = await self.compaction.prepare(scope, payload, headers, tenant)
                if outcome.error is not None:
                    await send_json(reply, outcome.status, outcome.error)
                    return
                if changed or outcome.changed:
                    body = json.dumps(payload).encode()
                    scope = dict(scope, headers=replace_header(scope["headers"], b"content-length",
                                                               str(len(body)).encode()))
        except Disconnected:
            return
        except HttpError as exc:
            # Anthropic's clients read {"type": "error", "error": {...}}; the OpenAI shape otherwise.
            content = {"type": "error", **exc.body} if path == "/v1/messages" else exc.body
            await refuse(scope, receive, reply, exc, content)
            return
        await outcome.forward(self.app, scope, body, receive, send)  # a refused rewrite is sent again as sent

    async def _unhandled(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        """Any other request with a JSON body that vLLM will serve: kvsched's marks and (for a keyed caller) session
        ids are refused there (`check_unhandled_body`); everything else passes on byte for byte."""
        raw = first_headers(scope)
        kind = body_kind(raw.get("content-type", b""))
        if kind is None or not compat.serves_route(scope["app"], scope):
            await self.app(scope, receive, send)  # vLLM reads no vllm_xargs from it, or answers 404/405 unread
            return
        ident = self.auth.identify(scope["app"], raw.get("authorization"))
        if not ident.authenticated and path.startswith(compat.auth_guarded_prefixes()):
            await self.app(scope, receive, send)  # vLLM answers 401
            return
        try:
            body = await self._checked_body(scope, receive, raw, kind, path, ident.tenant)
        except Disconnected:
            return
        except InvalidSessionInput as exc:
            self.rejected += 1
            await send_json(self._reply(scope, raw, send), 400, error_body(str(exc), param=exc.field or "session"))
            return
        except HttpError as exc:
            await refuse(scope, receive, self._reply(scope, raw, send), exc, exc.body)
            return
        await self.app(scope, replay(body, receive), send)  # what was parsed for the check is gone by now

    @staticmethod
    async def _checked_body(scope: Scope, receive: Any, raw: dict[str, bytes], kind: str, path: str,
                            tenant: str | None) -> bytes:
        """The body, once `check_unhandled_body` has passed it. Read up to vLLM's own limit, parsed only when it may
        hold kvsched's fields, and then taken at any size vLLM takes: whether a request is served must not depend on
        the words of its prompt (found by review: such bodies met the generation routes' 64 MiB and 1,000,000
        containers, 413, when a prompt merely said "session"). The walk costs no step or allocation per scalar (a
        review found ~130 bytes of memory per byte of body and seconds of stall); the parse is what vLLM's own costs."""
        if path in SESSION_ROUTES and path not in XARGS_ONLY_ROUTES:  # vLLM reads the first X-Session-Id there
            refuse_repeated(scope, ("x-session-id",))
        # a route kvsched does not limit, in size or time (vLLM's own, up to a GiB: its audio forms, say)
        body = await read_body(scope, receive, limit=SCAN_BODY_BYTES, timeout_s=None)
        if kind == "json" and not needs_scan(body, tenant, path, "x-session-id" in raw):
            return body  # nothing of kvsched's can be in it: vLLM parses it once
        fields = [parse_json(body)] if kind == "json" else await form_fields(scope, body) or []
        for payload in fields:  # a form's fields one by one: an error names the field as sent
            check_unhandled_body(payload, raw, tenant, path)
        return body

    # ---- metrics ------------------------------------------------------------------------------------------------
    async def _engine_stats(self, app: Any) -> dict[str, Any] | None:
        """The scheduler's stats, or None if the engine core does not answer within STATS_TIMEOUT_S: found by review,
        a stuck engine core hung every scrape, vLLM's own metrics with it. Through the session routes' engine calls
        (`admin_routes.EngineCalls`): one call in flight that concurrent scrapes share, counted in the same bound."""
        try:
            stats = await asyncio.wait_for(self.session_calls.call(app, "stats", shared=True), STATS_TIMEOUT_S)
        except Exception:  # the engine is stuck, gone or shutting down
            return None
        return stats if isinstance(stats, dict) else None

    async def _metrics(self, scope: Scope, receive: Any, send: Any) -> None:
        stats = await self._engine_stats(scope["app"])
        api_side = {"rejected_requests": self.rejected}
        # `?name[]=...` narrows kvsched's series as prometheus_client narrows vLLM's (it parses the query the same way)
        names = parse_qs(scope.get("query_string", b"").decode("utf-8", "replace")).get("name[]")
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
                    # Any case: prometheus_client (vLLM's /metrics app) sends `Content-Type` (found by review: read
                    # as lower case only, OpenMetrics bodies got text-format kvsched lines and failed to parse).
                    content_type = first_headers(start).get("content-type", b"").decode("latin-1")
                    openmetrics = "openmetrics" in content_type.lower()
                    body = append_metrics(body, render_metrics(stats, openmetrics, api_side, names)
                                          + self.compaction.render_metrics(openmetrics, names))
                    hdrs = replace_header(start.get("headers", []), b"content-length", str(len(body)).encode())
                    await send(dict(start, headers=hdrs))
                    await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def append_metrics(body: bytes, extra: bytes) -> bytes:
    eof = b"# EOF\n"
    if body.endswith(eof):
        return body[: -len(eof)] + extra + eof
    return body + (b"" if body.endswith(b"\n") or not body else b"\n") + extra


__all__ = ["KVSchedMiddleware", "append_metrics", "apply_session_fields", "error_body"]
