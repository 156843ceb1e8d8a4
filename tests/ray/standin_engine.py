"""kvsched's `EngineReplica` over a stand-in vLLM server (no vLLM): the replica's own code (proxying, session admin
calls, answers and their slot), its HTTP client pointed at `FakeVllm` through httpx's mock transport. For tests of the
ingress and the router on a real Ray cluster (imported by Ray's workers by name, `tests.ray.standin_engine`: the
tests' PYTHONPATH reaches them) and without one.

`FakeVllm` answers a turn, remembers the session it names (per caller key) and lists and ends sessions as kvsched's
engines do (`GET /kvsched/sessions?limit=&cursor=`, `next_cursor`; `summary=1`); with `--api-key` among the pool's
`vllm_args`, a request without one of those keys is answered 401, as vLLM does."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx

from kvsched.adapters.ray.engine import EngineReplica, replica_unique_id
from kvsched.core.tenancy import bearer_token


class FakeVllm:
    def __init__(self, keys: set[str]) -> None:
        self.keys = keys
        self.sessions: dict[tuple[str | None, str], int] = {}  # (caller's token, session id) -> turns

    def handle(self, request: httpx.Request) -> httpx.Response:
        token = bearer_token(request.headers.get("authorization"))
        if self.keys and token not in self.keys:
            return httpx.Response(401, json={"error": "Unauthorized"})
        path, query = request.url.path, dict(request.url.params)
        mine = sorted(sid for t, sid in self.sessions if t == token)
        if request.method == "POST":
            sid = request.headers.get("x-session-id")
            if sid is not None:
                self.sessions[(token, sid)] = self.sessions.get((token, sid), 0) + 1
            return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}],
                                             "usage": {"total_tokens": 5}})
        if request.method == "DELETE":
            sid = path.rsplit("/", 1)[1]
            if self.sessions.pop((token, sid), None) is None:
                return httpx.Response(404, json={"error": {"message": f"no session {sid!r}"}})
            return httpx.Response(200, json={"session_id": sid, "ended": True})
        unknown = set(query) - {"limit", "cursor", "summary", "pinned_ids"}
        if unknown:
            return httpx.Response(400, json={"error": {"message": f"unknown query parameter(s) {sorted(unknown)}"}})
        if query.get("summary") == "1":
            return httpx.Response(200, json={"summary": {"sessions": len(mine)}})
        if not query.get("limit", "100").isdigit():
            return httpx.Response(400, json={"error": {"message": "limit must be an integer", "param": "limit"}})
        limit = int(query.get("limit", 100))
        after = [s for s in mine if s > query.get("cursor", "")]
        rows = [{"session_id": s, "turns": self.sessions[(token, s)]} for s in after[:limit]]
        more = len(after) > limit
        return httpx.Response(200, json={"sessions": rows, "next_cursor": rows[-1]["session_id"] if more else None,
                                         "total": len(mine)})


class StandInEngine(EngineReplica):
    def __init__(self, pool: str, engine: dict[str, Any], replica_id: str | None = None) -> None:
        self.pool = pool
        self.replica_id = replica_id if replica_id is not None else replica_unique_id()
        args = [str(a) for a in engine.get("vllm_args") or ()]
        self.vllm = FakeVllm(set(args[args.index("--api-key") + 1:]) if "--api-key" in args else set())
        self.server = SimpleNamespace(proc=None, base="http://vllm.invalid")
        self.client = httpx.AsyncClient(base_url=self.server.base, transport=httpx.MockTransport(self.vllm.handle))
        self.ended_routes = 0  # routed `session_ended` calls: this pool's router was told a session ended

    async def complete(self, path: str, body: bytes, headers: dict[str, str], route: Any = None) -> dict[str, Any]:
        answer = await super().complete(path, body, headers, route=route)
        # what reached this replica from the router, for the tests to see (X-KVSched-* headers go to the client)
        answer["headers"]["x-kvsched-test-route-slot"] = str(getattr(route, "slot", None))
        return answer

    def session_ended(self, route: Any = None) -> dict[str, Any]:
        self.ended_routes += 1
        return super().session_ended(route)

    def describe(self) -> dict[str, Any]:
        return {"pool": self.pool, "slot": self.served_slot(), "replica_id": self.replica_id, "rank": self.slot,
                "ended_routes": self.ended_routes}

    async def record_routing_stats(self) -> dict[str, Any]:
        return {"slot": self.slot, "pool": self.pool, "kv_sessions": sorted({s for _, s in self.vllm.sessions})}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {"queue_depth": 0.0}

    def check_health(self) -> None:
        pass

    def __del__(self) -> None:
        pass
