"""The OpenAI-compatible HTTP ingress: picks the pool (model, `X-Agent-Role`, session length), hands the request to
that pool's engine deployment with the session id (so kvsched's router sees it), retries requests whose replica
died before answering, and ends a stream that fails midway with an OpenAI error event instead of hanging.

Answers carry `X-KVSched-Pool`, `X-KVSched-Replica` (the slot that served it) and `X-KVSched-Replica-Id` (Ray's
replica id, for operators).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from kvsched.adapters.ray.config import config_from_dict
from kvsched.core.routing_pools import PoolSelector, UnknownModel
from kvsched.core.sessions import InvalidSessionInput, validate_role, validate_session_id

logger = logging.getLogger("ray.serve")
api = FastAPI(title="kvsched on Ray Serve")
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
STREAM_IDLE_TIMEOUT_S = 600.0
CHARS_PER_TOKEN = 4  # prompt size estimate before any usage is known
REPLICA_GONE = (RayActorError, ActorUnavailableError)


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def sse_error(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "type": "server_error", "code": 503}}).encode() \
        + b"\n\n"


def retryable(exc: BaseException) -> bool:
    """A failure of the replica or its vLLM child, not of the request itself."""
    if isinstance(exc, REPLICA_GONE):
        return True
    if isinstance(exc, RayTaskError):
        text = str(exc)
        return any(name in text for name in ("ConnectError", "RemoteProtocolError", "ReadError", "ConnectTimeout"))
    return False


async def relay(gen: Any, slot: Any, idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S) -> AsyncIterator[bytes]:
    """Pass an engine replica's stream on; if the engine side fails midway (a dead replica's generator raises, or ends
    in CancelledError, or goes silent), end with an OpenAI error event instead of dropping the connection. If the
    relay itself is cancelled (the client went away), the generation on the engine is cancelled too."""
    done = False
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(gen.__anext__(), idle_timeout_s)
            except StopAsyncIteration:
                done = True
                return
            yield chunk
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - a clear error, never a hang
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise  # this relay itself is being cancelled: `finally` stops the engine
        done = True
        logger.warning(f"kvsched ingress: stream from slot-{slot} failed midway: {exc!r}")
        yield sse_error(f"the engine replica (slot-{slot}) failed during the stream "
                        f"({type(exc).__name__}); retry the turn")
    finally:
        if not done:
            gen.cancel()


def served_by(answer: dict[str, Any]) -> dict[str, str]:
    """Response headers naming the slot and the Ray replica that served a request."""
    return dict(answer.get("headers") or {}) | {"x-kvsched-replica": f"slot-{answer['slot']}",
                                                 "x-kvsched-replica-id": str(answer.get("replica_id", ""))}


def estimate_tokens(payload: dict[str, Any]) -> int:
    text = payload.get("messages") if "messages" in payload else payload.get("prompt")
    return len(json.dumps(text)) // CHARS_PER_TOKEN if text is not None else 0


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engines: dict[str, Any]) -> None:
        self.config = config_from_dict(config)
        self.selector = PoolSelector(self.config.routing())
        self.pools = {p.name: p for p in self.config.pools}
        self.engines = engines
        self.session_tokens: OrderedDict[str, int] = OrderedDict()

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        names = sorted({m for p in self.config.pools for m in p.models})
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "kvsched"} for m in names]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "/v1/chat/completions")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "/v1/completions")

    # ---- one generation request ---------------------------------------------------------------------------------
    async def generate(self, request: Request, path: str) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return error(400, "request body is not valid JSON")
        if not isinstance(payload, dict):
            return error(400, "request body must be a JSON object")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            sid = validate_session_id(headers["x-session-id"]) if "x-session-id" in headers else None
            role = validate_role(headers["x-agent-role"]) if "x-agent-role" in headers else None
        except InvalidSessionInput as exc:
            return error(400, str(exc), param="session")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            return error(400, "model must be a string", param="model")
        tokens = max(estimate_tokens(payload), self.session_tokens.get(sid, 0) if sid else 0)
        try:
            pool = self.selector.select(model, role, sid, tokens)
        except UnknownModel as exc:
            return error(404, str(exc), kind="NotFoundError", param="model")
        payload["model"] = self.pools[pool.name].engine.served_model_name
        body = json.dumps(payload).encode()
        handle = self.engines[pool.name]
        if sid is not None:
            handle = handle.options(session_id=sid)
        extra = {"x-kvsched-pool": pool.name}
        if payload.get("stream") is True:
            return await self._stream(handle, path, body, headers, extra)
        return await self._complete(handle, path, body, headers, extra, sid)

    async def _complete(self, handle: Any, path: str, body: bytes, headers: dict[str, str], extra: dict[str, str],
                        sid: str | None) -> Response:
        last: BaseException | None = None
        for attempt in range(self.config.request_retries + 1):
            try:
                res = await handle.complete.remote(path, body, headers)
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                if not retryable(exc):
                    raise
                last = exc
                logger.warning(f"kvsched ingress: replica failed before answering ({type(exc).__name__}); "
                               f"retry {attempt + 1}/{self.config.request_retries}")
                await asyncio.sleep(0.5 * (attempt + 1))
        else:
            return error(503, f"no engine replica answered after {self.config.request_retries + 1} attempts: "
                              f"{type(last).__name__}", kind="server_error")
        if sid is not None and res["status"] == 200:
            self._remember_usage(sid, res["body"])
        return Response(res["body"], res["status"], media_type=res["content_type"],
                        headers=extra | served_by(res))

    async def _stream(self, handle: Any, path: str, body: bytes, headers: dict[str, str],
                      extra: dict[str, str]) -> Response:
        last: BaseException | None = None
        for attempt in range(self.config.request_retries + 1):
            gen = handle.options(stream=True).stream.remote(path, body, headers)
            try:
                head = await asyncio.wait_for(gen.__anext__(), STREAM_IDLE_TIMEOUT_S)
                break
            except Exception as exc:  # noqa: BLE001 - nothing was sent yet: safe to retry elsewhere
                gen.cancel()
                if not retryable(exc):
                    raise
                last = exc
                await asyncio.sleep(0.5 * (attempt + 1))
        else:
            return error(503, f"no engine replica answered after {self.config.request_retries + 1} attempts: "
                              f"{type(last).__name__}", kind="server_error")
        slot = head["slot"]

        return StreamingResponse(relay(gen, slot), head["status"], media_type=head["content_type"],
                                 headers=extra | served_by(head))

    def _remember_usage(self, sid: str, body: bytes) -> None:
        try:
            usage = json.loads(body).get("usage") or {}
            total = int(usage.get("total_tokens", 0))
        except (ValueError, TypeError, AttributeError):
            return
        self.session_tokens[sid] = total
        self.session_tokens.move_to_end(sid)
        while len(self.session_tokens) > 100_000:
            self.session_tokens.popitem(last=False)
