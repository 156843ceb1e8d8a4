"""The OpenAI-compatible HTTP ingress: reads the body within size, time and depth limits (413/408/400: ingress_body.py),
picks the pool (model, `X-Agent-Role`, session length), hands the request to that pool's engine deployment with the
session id (so kvsched's router sees it), and ends a stream that fails midway with an OpenAI error event.

Failures: a request whose replica fails before any byte of the answer reached the client (its engine died, the replica
actor died, the connection was refused or cut) is retried on another replica: the router sends it back to one that
failed it only when every live replica did, so the session goes to its ring successor. Retries back off (0.2 s
doubling, at most 2 s) and stop at the request's deadline (`request_deadline_s` after arrival) or after
`request_retries`; a streamed answer is only committed to the client once its first bytes arrived. A stream that fails
after that ends with the OpenAI error event.

Answers carry `X-KVSched-Pool`, `X-KVSched-Replica` (the router's slot for the replica that served it:
`RouteHints.slot`), `X-KVSched-Replica-Id` (Ray's replica id, for operators) and `X-KVSched-Attempts`.
`DELETE /kvsched/sessions/{id}` ends the caller's session on every replica holding it (and in the routers' tables),
`GET /kvsched/sessions` lists the caller's pinned sessions on every replica (paged across them: `listing.py`),
`GET /kvsched/replicas` the replicas (to an admin key, where keys are in use). The caller's `Authorization` and
cache-salt headers go to the engines, which check keys and scope sessions by tenant and salt; the ingress and the
routers key sessions the same way (`owners.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from kvsched.adapters.ray.admin import broadcast_all
from kvsched.adapters.ray.config import config_from_dict
from kvsched.adapters.ray.hints import EngineUnavailable, RouteHints
from kvsched.adapters.ray.ingress_body import RequestBody
from kvsched.adapters.ray.listing import RETRY_AFTER_S, ListingError, merge, parse_listing
from kvsched.adapters.ray.opening import OpeningRoutes
from kvsched.adapters.ray.owners import (
    SALT_B64_HEADER,
    SALT_HEADER,
    admin_keys,
    body_salt,
    caller_headers,
    checks_api_keys,
    header_salt,
    is_admin,
    session_key,
)
from kvsched.adapters.ray.requests import (
    BadRequest,
    check_content_type,
    estimate_tokens,
    header_text,
    lower,
    parse_body,
    refuse_repeated,
    request_id,
    session_fields,
    stream_flag,
    utf8_headers,
)
from kvsched.core.client_fields import raw_path_is_utf8
from kvsched.core.routing_pools import PoolSelector, UnknownModel
from kvsched.core.sessions import InvalidSessionInput, validate_session_id

logger = logging.getLogger("ray.serve")
api = FastAPI(title="kvsched on Ray Serve")
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
STREAM_IDLE_TIMEOUT_S = 600.0
T = TypeVar("T")


class NoReplicaAnswered(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status, headers)


def sse_error(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "type": "server_error", "code": 503}}).encode() \
        + b"\n\n"


def failed_replica(exc: BaseException) -> tuple[str | None, bool] | None:
    """For a failure of the replica or its engine (not of the request itself): the failed replica's id (Ray
    replica unique id or actor id, None if unknown) and whether its engine is gone. None: not retryable."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, EngineUnavailable):
        return cause.replica_id or None, cause.gone
    if isinstance(cause, RayActorError | ActorUnavailableError):
        # Ray's ActorUnavailableError (a RayActorError) is a replica unreachable for now (a network blip, a restart
        # under way): avoided for this request, not written off (it stays in Ray's replica set and passes its checks)
        return getattr(cause, "actor_id", None), not isinstance(cause, ActorUnavailableError)
    return None


async def relay(gen: Any, slot: Any, first: bytes | None = None,
                idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S) -> AsyncIterator[bytes]:
    """Pass an engine replica's stream on (after `first`, already read); if the engine side fails midway (a dead
    replica's generator raises, or ends in CancelledError, or goes silent), end with an OpenAI error event instead
    of dropping the connection. If the relay itself is cancelled (the client went away), the generation on the
    engine is cancelled too."""
    done = False
    try:
        if first is not None:
            yield first
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
        done = not isinstance(exc, TimeoutError)  # a silent engine is stopped (`finally`): its slot and load go
        logger.warning(f"kvsched ingress: stream from slot-{slot} failed midway: {exc!r}")
        yield sse_error(f"the engine replica (slot-{slot}) failed during the stream "
                        f"({type(exc).__name__}); retry the turn")
    finally:
        if not done:
            gen.cancel()


def served_by(answer: dict[str, Any], attempts: int) -> dict[str, str]:
    """Response headers naming the slot and the Ray replica that served a request."""
    return dict(answer.get("headers") or {}) | {"x-kvsched-replica": f"slot-{answer['slot']}",
                                                 "x-kvsched-replica-id": str(answer.get("replica_id", "")),
                                                 "x-kvsched-attempts": str(attempts)}


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engines: dict[str, Any]) -> None:
        self.config = config_from_dict(config)
        self.selector = PoolSelector(self.config.routing())
        self.pools = {p.name: p for p in self.config.pools}
        self.engines = engines
        # some pool's engines check API keys: then sessions are the caller's own, here as on the engines (owners.py)
        self.keyed = any(checks_api_keys(p.engine.vllm_args, p.engine.env) for p in self.config.pools)
        self.admin_keys = admin_keys(p.engine.env for p in self.config.pools)
        self.openings = OpeningRoutes(self.config.router.unnamed == "opening")
        self.session_tokens: OrderedDict[str, int] = OrderedDict()
        self.session_ends: OrderedDict[str, int] = OrderedDict()  # sid -> times it ended (a turn's usage counts only
        # if its session did not end meanwhile: a new session under the id starts by its own size)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        names = sorted({m for p in self.config.pools for m in p.models})
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "kvsched"} for m in names]}

    @api.get("/kvsched/replicas")
    async def replicas(self, request: Request) -> Any:
        """Every engine replica of every pool: slot, Ray replica id, engine URL and pid; once a pool checks API keys or
        admin keys are set, for an admin key only (found by review: it showed the engines' addresses to anyone)."""
        if (self.keyed or self.admin_keys) and not is_admin(lower(request), self.admin_keys):
            return error(401, "listing the replicas needs an admin key (KVSCHED_ADMIN_KEYS)", "authentication_error")
        return {"replicas": sorted(await self._broadcast("describe"), key=lambda r: (r["pool"], r["slot"]))}

    @api.get("/kvsched/sessions")
    async def sessions(self, request: Request) -> Response:
        """Every replica's sessions of the caller (its key and salt), each row naming its pool and slot, paged across
        the replicas with one cursor; the caller's query (`limit`, `cursor`, `summary`, `pinned_ids`) as the engines
        read it. When no replica answered 200, an engine's answer (401, 400) is passed on, or 503 (`listing.py`)."""
        try:
            refuse_repeated(request.scope.get("headers", ()), (SALT_HEADER, SALT_B64_HEADER))
            listing = parse_listing(request.scope.get("query_string", b"").decode("latin-1"))
        except (ListingError, BadRequest) as exc:
            return error(400, str(exc), param=exc.param)
        pages = {name: {"pages": listing.positions.get(name, {})} for name in self.engines} if listing.paged else None
        try:
            answers, failed = await asyncio.wait_for(broadcast_all(
                self.engines, "admin", "GET", listing.path, caller_headers(lower(request)), per_pool=pages),
                self.config.request_deadline_s)
        except TimeoutError:
            return error(504, f"the engine replicas did not answer within the request deadline "
                              f"({self.config.request_deadline_s:g} s)", kind="server_error")
        status, answer = merge(listing, answers, failed)
        if isinstance(answer, dict):
            return JSONResponse(answer, status, headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)
        if isinstance(answer, bytes):
            return Response(answer, status, media_type="application/json")
        return error(status, str(answer), kind="server_error")

    @api.delete("/kvsched/sessions/{session_id:path}")
    async def end_session(self, session_id: str, request: Request) -> Response:
        """End the caller's session on every replica of every pool (found by review: routed like a turn, the DELETE
        could reach a replica that did not hold the session, answer 404 and leave its KV pinned on the busy one),
        then in the routers. 200 if any replica ended it, 404 if none held it (a pool with no replica running holds
        none: `admin.broadcast_all`); another answer (401, 400, 503) of a replica when none ended it is passed on, and
        503 when a replica failed to answer and none ended it (found by review: the failure was dropped unlogged and
        the caller told 404 while that replica kept the session); then the routers keep the session."""
        try:
            refuse_repeated(request.scope.get("headers", ()), (SALT_HEADER, SALT_B64_HEADER))
            sid = validate_session_id(session_id)
        except BadRequest as exc:
            return error(400, str(exc), param=exc.param)
        except InvalidSessionInput as exc:
            return error(400, str(exc), param="session_id")
        if not raw_path_is_utf8(request.scope.get("raw_path")):  # the server made U+FFFD of it
            return error(400, "the session id in the path is not UTF-8 (percent-encode the id's UTF-8 bytes)",
                         param="session_id")
        headers = lower(request)
        path = f"/kvsched/sessions/{quote(sid, safe='')}"
        try:
            answers, failed = await asyncio.wait_for(broadcast_all(
                self.engines, "admin", "DELETE", path, caller_headers(headers)), self.config.request_deadline_s)
        except TimeoutError:
            return error(504, f"the engine replicas did not answer within the request deadline "
                              f"({self.config.request_deadline_s:g} s); the session may still end", kind="server_error")
        ended = [(name, r) for name, r in answers if r["status"] == 200]
        other = [r for _, r in answers if r["status"] != 404]
        if not ended and other:
            return Response(other[0]["body"], other[0]["status"], media_type="application/json")
        if not ended and failed:
            return error(503, f"{len(failed)} engine replica(s) did not answer ({type(failed[0][1]).__name__}); the "
                              f"session may still be held there: retry", kind="server_error")
        key = session_key(sid, headers, header_salt(headers), self.keyed)
        self._ended(key)
        await self._forget(key, {name for name, _ in answers})
        if not ended:
            return error(404, f"no session {sid!r}", param="session_id")
        return JSONResponse({"session_id": sid, "ended": True, "pools": sorted({n for n, _ in ended})},
                            headers=served_by(ended[0][1], 1))

    async def _forget(self, key: str, pools: set[str]) -> None:
        """The routers of `pools` (those with replicas running: a routed call would wake a pool scaled to zero) forget
        the session: a call routed as the session's, ending it (broadcasts bypass the routers). Best effort: a router
        that misses it lets the session idle out."""
        async def one(name: str, handle: Any) -> None:
            ended = handle.options(session_id=key).session_ended
            try:
                await self._attempts(lambda h: ended.remote(route=h), RouteHints(end_session=True))
            except Exception as exc:  # noqa: BLE001 - logged; the session ended on the engines regardless
                logger.warning(f"kvsched ingress: pool {name}'s router was not told a session ended: {exc!r}")

        await asyncio.gather(*(one(name, handle) for name, handle in self.engines.items() if name in pools))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "/v1/chat/completions")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "/v1/completions")

    # ---- one generation request ---------------------------------------------------------------------------------
    async def generate(self, request: Request, path: str) -> Response:
        headers = lower(request)
        body_in = RequestBody(request)
        try:
            check_content_type(request.headers.get("content-type"))
            payload = parse_body(await body_in.read(self.config.max_body_bytes, self.config.body_timeout_s),
                                 self.config.max_body_bytes, self.config.max_json_depth)
            refuse_repeated(request.scope.get("headers", ()))  # kvsched's headers, as the engines read them
            session = session_fields(payload, headers | utf8_headers(headers))
            stream = stream_flag(payload)
            rid = request_id(request)  # the engine serves under the id Ray's proxy answers
        except BadRequest as exc:  # answered once the rest of the body is drained, if need be (ingress_body.py)
            return error(exc.status, exc.message, param=exc.param, headers=await body_in.before_refusal(exc))
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            return error(400, "model must be a string", param="model")
        sid, salt = session.session_id, body_salt(payload)
        key = session_key(sid, headers, salt, self.keyed) if sid is not None else None
        opening = None if key else self.openings.key(payload, lambda o: session_key(o, headers, salt, self.keyed))
        tokens = max(estimate_tokens(payload), self.session_tokens.get(key, 0) if key else 0)
        try:
            pool = self.selector.select(model, session.role, key, tokens)
        except UnknownModel as exc:
            return error(404, str(exc), kind="NotFoundError", param="model")
        payload["model"] = self.pools[pool.name].engine.served_model_name
        body = json.dumps(payload).encode()
        handle = self.engines[pool.name]
        if key or opening:
            handle = handle.options(session_id=key or opening.key)  # type: ignore[union-attr]
        forwarded = header_text(sid) if sid is not None else None  # as the engine reads it (requests.header_text);
        if forwarded is not None:  # an opening's key goes to no engine
            headers["x-session-id"] = forwarded
        headers.update(rid)
        if session.end and sid is not None and key is not None:  # this last turn still goes where the session lives
            self._ended(key)
        extra = {"x-kvsched-pool": pool.name}
        hints = RouteHints(end_session=session.end)
        try:
            with self.openings.sent(opening):
                if stream:
                    return await self._stream(handle, path, body, headers, extra, hints)
                return await self._complete(handle, path, body, headers, extra, key, hints)
        except NoReplicaAnswered as exc:
            return error(exc.status, str(exc), kind="server_error")

    async def _attempts(self, call: Callable[[RouteHints], Awaitable[T]], hints: RouteHints) -> tuple[T, int]:
        """`call` until it succeeds, each retry avoiding the replicas that failed before, within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_deadline_s
        exclude: list[str] = []
        gone: list[str] = []
        last: BaseException | None = None
        for attempt in range(1, self.config.request_retries + 2):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            pending = None
            try:
                h = RouteHints(tuple(exclude), tuple(gone), hints.end_session)
                pending = call(h)
                return await asyncio.wait_for(pending, remaining), attempt
            except TimeoutError:
                # Ray's DeploymentResponse does not cancel its request when its awaiting task is cancelled: cancel it,
                # or the engine keeps generating (and the router counting its load) for nobody
                cancel = getattr(pending, "cancel", None)
                if callable(cancel):
                    cancel()
                raise NoReplicaAnswered(504, f"no engine replica answered within the request deadline "
                                             f"({self.config.request_deadline_s:g} s)") from None
            except Exception as exc:  # noqa: BLE001 - classified below
                failed = failed_replica(exc)
                if failed is None:
                    raise
                last = exc
                key, is_gone = failed
                if key is not None:
                    exclude.append(key)
                    if is_gone:
                        gone.append(key)
                logger.warning(f"kvsched ingress: replica {key} failed before answering ({type(exc).__name__}"
                               f"{', engine gone' if is_gone else ''}); attempt {attempt}, retrying elsewhere")
                await asyncio.sleep(min(2.0, 0.2 * 2 ** (attempt - 1), max(0.0, deadline - loop.time())))
        raise NoReplicaAnswered(503, f"no engine replica answered after {len(exclude) or 1} failed attempt(s): "
                                     f"{type(last).__name__ if last else 'deadline passed'}")

    async def _complete(self, handle: Any, path: str, body: bytes, headers: dict[str, str], extra: dict[str, str],
                        sid: str | None, hints: RouteHints) -> Response:
        ends = self.session_ends.get(sid, 0) if sid is not None else 0
        res, attempts = await self._attempts(lambda h: handle.complete.remote(path, body, headers, route=h), hints)
        if sid is not None and res["status"] == 200 and not hints.end_session and self.session_ends.get(sid, 0) == ends:
            self._remember_usage(sid, res["body"])
        return Response(res["body"], res["status"], media_type=res["content_type"],
                        headers=extra | served_by(res, attempts))

    async def _stream(self, handle: Any, path: str, body: bytes, headers: dict[str, str], extra: dict[str, str],
                      hints: RouteHints) -> Response:
        streaming = handle.options(stream=True)

        async def start(h: RouteHints) -> tuple[Any, dict[str, Any], bytes | None]:
            gen = streaming.stream.remote(path, body, headers, route=h)
            try:  # nothing reaches the client before the head and the first bytes: until then a retry is safe
                head = await gen.__anext__()
                try:
                    first = await gen.__anext__()
                except StopAsyncIteration:
                    first = None
            except BaseException:
                gen.cancel()
                raise
            return gen, head, first

        (gen, head, first), attempts = await self._attempts(start, hints)
        return StreamingResponse(relay(gen, head["slot"], first), head["status"], media_type=head["content_type"],
                                 headers=extra | served_by(head, attempts))

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        return [r for _, r in (await broadcast_all(self.engines, method, *args))[0]]

    def _ended(self, sid: str) -> None:
        """The session ended: its size and long-context pool are forgotten, and a turn of it still in flight is not
        remembered when it answers (found by review: it put the ended session's size back for the next one)."""
        self.session_tokens.pop(sid, None)
        self.selector.forget(sid)
        self.session_ends[sid] = self.session_ends.get(sid, 0) + 1
        self.session_ends.move_to_end(sid)
        while len(self.session_ends) > 100_000:
            self.session_ends.popitem(last=False)

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
