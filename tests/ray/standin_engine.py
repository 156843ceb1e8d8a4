"""A stand-in for `EngineReplica` without vLLM, for tests of the ingress and the router on a real Ray cluster: the same
methods and answers, the same routing stats. Each replica remembers the sessions its turns named (per caller key) and
lists them as kvsched's engines do (`GET /kvsched/sessions?limit=&cursor=`, `next_cursor`); on a pool whose
`vllm_args` hold `--api-key`, a call without one of those keys is answered 401, as vLLM does. Imported by Ray's
workers by name (`tests.ray.standin_engine`: the tests' PYTHONPATH reaches them)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kvsched.adapters.ray.engine import replica_rank, replica_unique_id
from kvsched.core.tenancy import bearer_token

UNAUTHORIZED = {"status": 401, "body": b'{"error": "Unauthorized"}'}


class StandInEngine:
    def __init__(self, pool: str, engine: dict[str, Any]) -> None:
        self.pool = pool
        self.replica_id = replica_unique_id()
        args = [str(a) for a in engine.get("vllm_args") or ()]
        self.keys = set(args[args.index("--api-key") + 1:]) if "--api-key" in args else set()
        self.sessions: dict[tuple[str | None, str], int] = {}  # (caller's token, session id) -> turns
        self.ended_routes = 0  # routed `session_ended` calls: a router was told a session ended

    @property
    def slot(self) -> int:
        return replica_rank()

    def _answer(self, status: int, body: bytes, route: Any = None) -> dict[str, Any]:
        return {"status": status, "content_type": "application/json", "body": body, "slot": self.slot,
                "replica_id": self.replica_id, "headers": {}}

    def _caller(self, headers: dict[str, str] | None) -> tuple[bool, str | None]:
        token = bearer_token((headers or {}).get("authorization"))
        return (not self.keys or token in self.keys), token

    async def complete(self, path: str, body: bytes, headers: dict[str, str], route: Any = None) -> dict[str, Any]:
        ok, token = self._caller(headers)
        if not ok:
            return self._answer(401, UNAUTHORIZED["body"], route)
        sid = headers.get("x-session-id")
        if sid is not None:
            self.sessions[(token, sid)] = self.sessions.get((token, sid), 0) + 1
        return self._answer(200, json.dumps({"usage": {"total_tokens": 5}, "rank": self.slot,
                                             "route_slot": getattr(route, "slot", None)}).encode(), route)

    async def admin(self, method: str, path: str, headers: dict[str, str] | None = None, route: Any = None,
                    **kwargs: Any) -> dict[str, Any]:
        ok, token = self._caller(headers)
        if not ok:
            return self._answer(**UNAUTHORIZED)
        url = urlsplit(path)
        mine = sorted(sid for t, sid in self.sessions if t == token)
        if method == "DELETE":
            sid = url.path.rsplit("/", 1)[1]
            if self.sessions.pop((token, sid), None) is None:
                return self._answer(404, b'{"error": "no session"}')
            return self._answer(200, json.dumps({"session_id": sid, "ended": True}).encode())
        query = dict(parse_qsl(url.query))
        if "summary" in query:
            return self._answer(200, json.dumps({"summary": {"sessions": len(mine)}}).encode())
        limit = int(query.get("limit", 100))
        after = [s for s in mine if not query.get("cursor") or s > query["cursor"]]
        rows = [{"session_id": s} for s in after[:limit]]
        more = len(after) > limit
        return self._answer(200, json.dumps({"sessions": rows, "next_cursor": rows[-1]["session_id"] if more else None,
                                             "total": len(mine)}).encode())

    def session_ended(self, route: Any = None) -> dict[str, Any]:
        self.ended_routes += 1
        return {"slot": self.slot, "replica_id": self.replica_id}

    def describe(self) -> dict[str, Any]:
        return {"pool": self.pool, "slot": self.slot, "replica_id": self.replica_id, "ended_routes": self.ended_routes,
                "sessions": len(self.sessions)}

    def record_routing_stats(self) -> dict[str, Any]:
        return {"slot": self.slot, "pool": self.pool, "kv_sessions": sorted({sid for _, sid in self.sessions})}

    def record_replica_metadata(self) -> dict[str, Any]:
        return {"slot": self.slot, "pool": self.pool}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"queue_depth": 0.0}
