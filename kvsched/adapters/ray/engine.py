"""One engine replica: a real `vllm serve --scheduler kvsched` child on a free loopback port, proxied over HTTP.

Running vLLM as a child process (not in the Ray worker) keeps vLLM's own process tree, signal handling and
OpenAI server exactly as in a plain deployment; the replica only forwards requests, reports its stats and owns the
child's life: `__del__` stops its whole process group on graceful shutdown, a detached reaper stops the group if the
replica is killed outright, a watcher thread kills what is left of the group the moment the server process dies (its
engine core would otherwise live on, orphaned), and `check_health` fails then so Ray replaces the replica.

The child leads a process group of its own but stays in the replica's session, and so in its CPU scheduling group:
found by a flaky kill test, a child in a session of its own had, under Linux's autogroup scheduler (on by default), a
CPU share of its own as large as that of the whole session running Ray. On 2 loaded cores its busy engine kept its
pace while the Ray processes relaying to it (proxy, ingress, this replica, all at Ray's worker niceness) crawled: a
stream's first chunk took up to 10 s to come through while the engine generated (19 s with a CPU hog in Ray's
session), against at most 0.12 s with the child in the replica's session.

A request the engine cannot take or finish before any byte of the answer left raises `EngineUnavailable` (naming
this replica, and whether its engine is gone), so the ingress retries it on another replica.

Reported to the router: `slot` (the replica's Ray Serve rank, reused by a replacement), `kv_sessions` (sessions
kvsched keeps pinned blocks for), queue depth and recent P95 TTFT; the same numbers feed autoscaling, with the TTFT
histogram's bucket counts (the policy merges them across replicas into the fleet's P95). Answers name
the router's slot for the replica (`served_slot`), which can differ from its rank once Ray renumbers ranks.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
from pydantic import ValidationError
from ray import serve

from kvsched.adapters.ray.autoscaling import FRESH_TTFT, HELD_TTFT
from kvsched.adapters.ray.config import ConfigError, EngineConfig, validation_message
from kvsched.adapters.ray.fleet_ttft import UNREAD_TTFT, bucket_stats
from kvsched.adapters.ray.hints import EngineUnavailable, RouteHints
from kvsched.adapters.ray.owners import AUTH_HEADERS
from kvsched.adapters.ray.poll_settings import POLL_DEADLINE_S, ROUTING_WAIT_S
from kvsched.adapters.ray.reaper import leader_alive, stop_group
from kvsched.adapters.ray.stats import ReplicaStats
from kvsched.core.ttft_histogram import TTFT_HOLD_S, UNSCRAPED_GRACE_S
from kvsched.serving import ServerSpec, VllmServer

ADMIN_KEYS_ENV = "KVSCHED_ADMIN_KEYS"

logger = logging.getLogger("ray.serve")
# The session headers kvsched reads, and the caller's key and cache salt: found by review, a pool whose vllm serve
# checks API keys (`--api-key`, VLLM_API_KEY) answered 401 to everything, as no key reached it. And the request's id
# (ingress.request_id): vLLM serves a request under its X-Request-Id (the answer's `id`, its logs), so the engine's
# id is the one Ray's proxy answers the client; without it the engine made one of its own (found by review).
FORWARD_HEADERS = ("x-session-id", "x-agent-role", "x-session-ttl", "x-session-end", "x-kvsched-compaction", "accept",
                   "x-request-id", *AUTH_HEADERS)


def replica_rank() -> int:
    """This replica's rank (Ray hands a dead replica's rank to its replacement); 0 outside Serve."""
    try:
        rank: Any = serve.get_replica_context().rank
    except Exception:
        return 0
    value = getattr(rank, "rank", rank)
    return int(value) if isinstance(value, int) else 0


def replica_unique_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return ""


def server_spec(cfg: EngineConfig) -> ServerSpec:
    return ServerSpec(model=cfg.model_path(), scheduler=cfg.scheduler, max_model_len=cfg.max_model_len,
                      block_size=cfg.block_size, num_blocks=cfg.num_blocks, kv_cache_gib=cfg.kv_cache_gib,
                      extra_args=list(cfg.vllm_args), env=dict(cfg.env), served_model_name=cfg.served_model_name,
                      own_session=False, worker=cfg.worker)


def replica_spec(pool: str, engine: dict[str, Any]) -> tuple[EngineConfig, ServerSpec]:
    """The pool's engine, read again on the replica's machine, and its `vllm serve`: before its engine starts, and
    where a `--config FILE` among its vllm_args is, the file's path being one on the replicas' machines. The driver's
    check of the config leaves a file it cannot read to this one (config.EngineConfig._layout): `worker: in_engine`
    with options it cannot honour, the file's or the command line's, is a ConfigError naming the pool and the option,
    not a replica whose start-up waits for ranks that never come."""
    where = f"pool {pool}, on this replica's machine"
    try:
        cfg = EngineConfig.model_validate(engine, strict=False)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_message(exc)}") from None
    try:
        return cfg, server_spec(cfg)
    except ValueError as exc:  # ServerSpec's own check: a --config file this machine cannot read either
        raise ConfigError(f"{where}: {exc}") from None


def start_with_reaper(server: VllmServer) -> None:
    """Start `server` (blocking until healthy) with a detached reaper watching this process for the child's group."""
    error: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    t = threading.Thread(target=start, name="vllm-start", daemon=True)
    t.start()
    while t.is_alive() and server.proc is None:
        time.sleep(0.05)
    if server.proc is not None:  # the reaper forks away and its first process exits at once
        subprocess.run([sys.executable, "-m", "kvsched.adapters.ray.reaper", str(server.proc.pid), str(os.getpid())],
                       start_new_session=True, stdin=subprocess.DEVNULL, check=False, timeout=30)
    t.join()
    if error:
        raise error[0]


class EngineReplica:
    """The Ray Serve deployment class of one engine pool (wrapped by `serve.deployment` in app.py).
    `unscraped_grace_s`: the pool's `autoscaling: {unscraped_grace_s}`, so that `describe` calls the engine's metrics
    stale when the policy leaves them out; `ttft_hold_s`: the pool's `autoscaling: {ttft_hold_s}`, how long the
    replica's own P95 is held (`ReplicaStats.hold_s`), as the policy holds the fleet's; `poll_deadline_s` and
    `routing_wait_s`: the router's (`router: {poll_deadline_s, routing_wait_s}`, poll_settings.py), the deadline of
    the replica's poll of its engine and how long Ray's routing-stats call waits for a poll in flight (within Ray's
    timeout of that call, which the poll's deadline need not be) before it answers with the last stats."""

    routing_wait_s = ROUTING_WAIT_S
    _polled_at = 0.0  # when the last stats poll ended (time.monotonic())
    _poll: asyncio.Future[None] | None = None  # the stats poll in flight

    def __init__(self, pool: str, engine: dict[str, Any], unscraped_grace_s: float = UNSCRAPED_GRACE_S,
                 ttft_hold_s: float = TTFT_HOLD_S, *, poll_deadline_s: float = POLL_DEADLINE_S,
                 routing_wait_s: float = ROUTING_WAIT_S) -> None:
        cfg, spec = replica_spec(pool, engine)  # here, before the engine starts: see replica_spec
        self.pool = pool
        self.routing_wait_s = routing_wait_s
        self.unscraped_grace_s = unscraped_grace_s
        self.replica_id = replica_unique_id()
        # The stats poll lists every session the engine holds KV for (all salts and tenants, every page): with an
        # admin key of its own, added to the operator's (KVSCHED_ADMIN_KEYS, valid on kvsched's routes only).
        stats_key = secrets.token_urlsafe(24)
        operator = spec.env.get(ADMIN_KEYS_ENV, os.environ.get(ADMIN_KEYS_ENV, ""))
        spec.env[ADMIN_KEYS_ENV] = ",".join(k for k in (*operator.split(","), stats_key) if k.strip())
        self.server = VllmServer(spec, startup_timeout_s=cfg.startup_timeout_s)
        start_with_reaper(self.server)
        self._stopping = False
        threading.Thread(target=self._watch_engine, name="vllm-watch", daemon=True).start()
        self.client = httpx.AsyncClient(base_url=self.server.base, timeout=httpx.Timeout(None, connect=10.0))
        self.stats = ReplicaStats(self.server.base, admin_key=stats_key, hold_s=ttft_hold_s,
                                  timeout_s=poll_deadline_s)
        logger.info(f"kvsched engine {pool}/slot-{self.slot} serving at {self.server.base}")

    @property
    def slot(self) -> int:
        """This replica's rank now: a replacement can start under a new rank while its predecessor still holds the
        old one, and Ray hands the old rank over once the predecessor is gone."""
        return replica_rank()

    def served_slot(self, route: RouteHints | None = None) -> int:
        """The slot this replica's answers name (`X-KVSched-Replica`, listings, `describe`): the router's slot for it,
        passed with each request it routes here (`RouteHints.slot`) and remembered for the calls that bypass the router
        (broadcasts); its rank until a routed request came. Found by review: answers named the rank, and the router
        keeps a replica in its slot when Ray renumbers ranks (after a scale-down)."""
        if route is not None and route.slot is not None:
            self._router_slot = route.slot
        named: int | None = getattr(self, "_router_slot", None)
        return self.slot if named is None else named

    def _watch_engine(self) -> None:
        proc = self.server.proc
        if proc is None:
            return
        code = proc.wait()
        if self._stopping:
            return
        logger.error(f"kvsched engine slot-{self.slot}: vllm serve exited ({code}); stopping what is left of its "
                     f"process group, failing health checks so Ray replaces this replica")
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine core and workers: useless without their API server
        except ProcessLookupError:
            pass

    def engine_alive(self) -> bool:
        """Whether `vllm serve` runs. Read from /proc: while the watcher thread waits on the process, Popen.poll()
        in another thread answers None whatever the state."""
        proc = self.server.proc
        return proc is not None and proc.returncode is None and leader_alive(proc.pid)

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        gone = not self.engine_alive()
        return EngineUnavailable(self.served_slot(), self.replica_id, gone, f"{type(exc).__name__}: {exc}"[:300])

    # ---- requests -----------------------------------------------------------------------------------------------
    async def complete(self, path: str, body: bytes, headers: dict[str, str],
                       route: RouteHints | None = None) -> dict[str, Any]:
        """A non-streaming request: status, content type and body of vLLM's answer. (`route` is for the router.)"""
        try:
            r = await self.client.post(path, content=body, headers=_forward(headers))
        except httpx.TransportError as exc:  # refused, reset or cut before the whole answer arrived
            raise self._unavailable(exc) from None
        return {"status": r.status_code, "content_type": r.headers.get("content-type", "application/json"),
                "body": r.content, "slot": self.served_slot(route), "replica_id": self.replica_id,
                "headers": _kvsched_headers(r)}

    async def stream(self, path: str, body: bytes, headers: dict[str, str],
                     route: RouteHints | None = None) -> AsyncIterator[Any]:
        """A streaming request: first a dict (status, content type, slot), then the raw SSE bytes. A failure before
        the first SSE bytes is `EngineUnavailable` (the ingress has sent nothing yet); later ones propagate."""
        sent = False
        try:
            async with self.client.stream("POST", path, content=body, headers=_forward(headers)) as r:
                yield {"status": r.status_code, "content_type": r.headers.get("content-type", "text/event-stream"),
                       "slot": self.served_slot(route), "replica_id": self.replica_id,
                       "headers": _kvsched_headers(r)}
                async for chunk in r.aiter_raw():
                    sent = True
                    yield chunk
        except httpx.TransportError as exc:
            if sent:
                raise
            raise self._unavailable(exc) from None

    async def admin(self, method: str, path: str, headers: dict[str, str] | None = None,
                    route: RouteHints | None = None, pages: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """kvsched's session admin routes of this replica's server (`GET /kvsched/sessions`, `DELETE .../{id}`), as
        the caller (its `Authorization` and cache-salt headers: the engine lists and ends only the caller's).
        `pages`: a listing paged across replicas, each replica's engine cursor by Ray replica id (`listing.py`); None
        for this one: listed to its end, so not asked again."""
        if pages is not None and self.replica_id in pages:
            cursor = pages[self.replica_id]
            if cursor is None:
                return {"status": 200, "body": b'{"sessions": [], "next_cursor": null}', "slot": self.served_slot(),
                        "replica_id": self.replica_id}
            path += ("&" if "?" in path else "?") + urlencode({"cursor": cursor})
        forward = {k.lower(): v.encode("latin-1") for k, v in (headers or {}).items() if k.lower() in AUTH_HEADERS}
        try:
            r = await self.client.request(method, path, headers=forward)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        return {"status": r.status_code, "body": r.content, "slot": self.served_slot(route),
                "replica_id": self.replica_id}

    def session_ended(self, route: RouteHints | None = None) -> dict[str, Any]:
        """Nothing here: the ingress calls it routed as a session that ended, so the router forgets the session."""
        return {"slot": self.served_slot(route), "replica_id": self.replica_id}

    def describe(self) -> dict[str, Any]:
        """Where this replica's engine runs (for operators, the benchmark's kill scenario and tests), and whether its
        engine's metrics are being read ("ok"; "failing"; past the grace "never read" or "stale": the pool's P95 TTFT
        leaves it out, and the pool does not scale down)."""
        proc = self.server.proc
        return {"pool": self.pool, "slot": self.served_slot(), "replica_id": self.replica_id,
                "replica_pid": os.getpid(), "engine_url": self.server.base,
                "engine_pid": proc.pid if proc is not None else None, "engine_alive": self.engine_alive(),
                "engine_metrics": self.stats.health.state(self.stats.clock(), self.unscraped_grace_s),
                "engine_metrics_unread_s": round(self.stats.unread_s(), 1)}

    # ---- what Ray polls -----------------------------------------------------------------------------------------
    async def _fresh_stats(self, max_age_s: float = 1.0, wait_s: float | None = None) -> dict[str, Any]:
        """The stats, polled again if the last poll ended over `max_age_s` ago. Callers share the poll in flight and
        wait for it (at most `wait_s`; None: until it ends, within its deadline), then read what it published. No
        lock is held across the read: found by review, a lock held across a /metrics that dripped bytes kept Ray's
        routing-stats calls (5-s timeout) waiting for as long as it dripped."""
        poll = self._poll
        if poll is None and time.monotonic() - self._polled_at > max_age_s:
            poll = self._poll = asyncio.ensure_future(self._poll_engine())
        if poll is not None:
            await asyncio.wait([poll], timeout=wait_s)  # (a caller timed out or cancelled leaves the poll running)
            if poll.done():
                poll.result()  # (what the poll does not catch reaches its callers, as before)
        return self.stats.snapshot()

    async def _poll_engine(self) -> None:
        try:
            await asyncio.to_thread(self.stats.poll)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # unreachable, past its deadline, cut short,
            logger.warning(f"kvsched engine slot-{self.slot}: stats poll failed: {exc!r}")  # or refused by the parser
        finally:
            self._polled_at = time.monotonic()
            self._poll = None

    async def record_routing_stats(self) -> dict[str, Any]:
        return {"slot": self.slot, "pool": self.pool, **(await self._fresh_stats(wait_s=self.routing_wait_s))}

    def record_replica_metadata(self) -> dict[str, Any]:
        return {"slot": self.slot, "pool": self.pool}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        s = await self._fresh_stats()
        out = {"queue_depth": float(s["queue_depth"])}
        # A TTFT without samples is left out: Ray averages what is reported over its window, and a marker value would
        # be averaged into real ones. The held one may only keep the pool from scaling down (autoscaling.py).
        if s["ttft_p95_s"] is not None:
            out[HELD_TTFT] = float(s["ttft_p95_s"])
        fresh = self.stats.fresh_ttft_p95()
        if fresh is not None:
            out[FRESH_TTFT] = float(fresh)
        out.update(bucket_stats(self.stats.ttft_buckets))  # cumulative: the policy merges them into the fleet's P95
        out[UNREAD_TTFT] = float(s["ttft_unread_s"])  # not current past a grace: the policy leaves them out
        return out

    def check_health(self) -> None:
        if not self.engine_alive():
            proc = self.server.proc
            raise RuntimeError(f"vllm serve for slot-{self.slot} exited ({proc.returncode if proc else None}):\n"
                               f"{self.server.log_tail(20)}")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is None or server.proc is None:
            return
        self._stopping = True
        server.stop(timeout_s=20)
        stop_group(server.proc.pid)  # the engine core and workers too, should any outlive the API server


def _forward(headers: dict[str, str]) -> dict[str, bytes]:
    """The session headers kvsched reads, the caller's key and salt, and a JSON content type (the ingress always sends JSON). As bytes in
    latin-1, the codec the ingress's server decoded them with: httpx encodes str values as ASCII, so a session id
    like "¡" in X-Session-Id made every call raise (a 500 the Ray fuzz test found)."""
    out = {k.lower(): v.encode("latin-1") for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
    out["content-type"] = b"application/json"
    return out


def _kvsched_headers(r: httpx.Response) -> dict[str, str]:
    """kvsched's own response headers from the engine (e.g. X-KVSched-Compacted), passed back to the client. Not the
    engine's X-Request-Id (`--enable-request-id-headers`): Ray's proxy appends its own to every answer (Ray 2.60's
    RequestIdMiddleware: the client's first X-Request-Id, else one it makes), which the engine was sent, so the
    engine's would be a second header with the same value."""
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-kvsched-")}
