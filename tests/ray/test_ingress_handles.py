"""The OpenAI ingress driven with fake engine deployment handles (no cluster): which engine method a request reaches
and with what (streaming as vLLM reads `stream`, a DELETE on every replica, the caller's key and salt), and the
engine replica's proxy passing the caller's key on."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from kvsched.adapters.ray.config import parse_config
from kvsched.adapters.ray.hints import RouteHints, plain_session

POOL = {"name": "w", "model": "/m"}


class FakeHandle:
    """One pool's DeploymentHandle. `replicas`: each replica's answer to the session admin route, by replica id; a
    routed call (`.method.remote`) goes to `routed_to`; every call is logged in `calls`."""

    def __init__(self, replicas: dict[str, dict[str, Any]], routed_to: str, opts: dict | None = None,
                 calls: list | None = None) -> None:
        self.replicas, self.routed_to, self.opts = replicas, routed_to, opts or {}
        self.calls: list[tuple[str, str, tuple, dict, dict]] = [] if calls is None else calls

    def options(self, **kw: Any) -> FakeHandle:
        return FakeHandle(self.replicas, self.routed_to, self.opts | kw, self.calls)

    def _answer(self, replica: str) -> dict[str, Any]:
        return {"status": 200, "body": b"{}", "content_type": "application/json", "headers": {}, "slot": 0,
                **self.replicas.get(replica, {}), "replica_id": replica}

    def broadcast(self, method: str, *args: Any, **kw: Any) -> Any:
        self.calls.append(("broadcast", method, args, kw, self.opts))

        async def results_async(return_exceptions: bool = False) -> list:
            return [self._answer(name) for name in self.replicas]

        return SimpleNamespace(results_async=results_async)

    def __getattr__(self, method: str) -> Any:
        def remote(*args: Any, **kw: Any) -> Any:
            self.calls.append(("remote", method, args, kw, self.opts))
            if method == "stream":
                return FakeStream([{**self._answer(self.routed_to), "content_type": "text/event-stream"},
                                   b"data: [DONE]\n\n"])

            async def answer() -> dict[str, Any]:
                return self._answer(self.routed_to)

            return answer()

        return SimpleNamespace(remote=remote)


class FakeStream:
    def __init__(self, items: list) -> None:
        self.items = items

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        pass


def make_ingress(handles: dict[str, FakeHandle], pools: list[dict] | None = None) -> Any:
    from kvsched.adapters.ray.ingress import OpenAIIngress

    inner = OpenAIIngress.__mro__[1]  # the class under Ray's ASGI wrapper
    assert inner.__name__ == "OpenAIIngress"
    ing = inner.__new__(inner)
    inner.__init__(ing, parse_config({"pools": pools or [POOL]}).to_dict(), handles)
    return ing


def request(headers: dict[str, str], body: bytes = b"", method: str = "POST", path: str = "/") -> Request:
    sent = [False]

    async def receive() -> dict:
        if sent[0]:
            await asyncio.sleep(3600)
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    return Request(scope, receive)


def chat(ing: Any, headers: dict[str, str], **fields: Any) -> Any:
    body = json.dumps({"model": "w", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()
    return asyncio.run(ing.generate(request(headers, body), "/v1/chat/completions"))


# ---- streaming, as vLLM reads `stream` ------------------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "method"), [
    (True, "stream"), ("true", "stream"), (1, "stream"), ("YES", "stream"), ("on", "stream"), ("1", "stream"),
    (False, "complete"), ("false", "complete"), (0, "complete"), ("off", "complete"), (None, "complete")])
def test_stream_is_read_as_vllm_reads_it(flag: Any, method: str) -> None:
    """Found by review: `"stream": "true"` (or 1) streams on vLLM, but only `true` took the ingress's streaming path:
    the whole SSE answer was buffered, and bounded by the request deadline."""
    handle = FakeHandle({"r0": {}}, "r0")
    res = chat(make_ingress({"w": handle}), {}, stream=flag)
    assert res.status_code == 200
    (_, called, args, _, _), = [c for c in handle.calls if c[0] == "remote"]
    assert called == method  # and vLLM gets a JSON boolean
    assert json.loads(args[1])["stream"] is (None if flag is None else method == "stream")


@pytest.mark.parametrize("flag", ["maybe", 2, [], {"on": True}])
def test_a_stream_flag_vllm_would_refuse_is_a_400_naming_it(flag: Any) -> None:
    handle = FakeHandle({"r0": {}}, "r0")
    res = chat(make_ingress({"w": handle}), {}, stream=flag)
    assert res.status_code == 400 and json.loads(res.body)["error"]["param"] == "stream" and not handle.calls


# ---- the session as the engines read it --------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [{"prompt_cache_key": "conv-42"}, {"user": "alice"}, {"metadata": {"user_id": "bob"}},
                                    {"user": "x" * 300}, {"session_id": "s1", "user": "alice"}])
@pytest.mark.parametrize("key", [None, "Bearer k1"])
def test_the_router_keys_a_turn_by_the_session_the_engine_reads(fields: dict, key: str | None) -> None:
    """Found by review: the ingress read kvsched's own session fields only, so a turn naming its session by
    `prompt_cache_key`, `user` or `metadata.user_id` (which the engines honour) was routed least loaded and lost its KV
    on every turn."""
    from kvsched.adapters.ray.owners import session_key
    from kvsched.core.client_fields import read_session_fields

    handle = FakeHandle({"r0": {}}, "r0")
    pool = dict(POOL, vllm_args=["--api-key", "k1"]) if key else POOL
    headers = {"authorization": key} if key else {}
    assert chat(make_ingress({"w": handle}, [pool]), headers, **fields).status_code == 200
    (_, _, (_, body, sent), _, opts), = handle.calls
    engine = read_session_fields(json.loads(body), sent).session_id
    assert engine is not None and opts["session_id"] == session_key(engine, headers, None, keyed=key is not None)


def test_a_role_in_vllm_xargs_picks_the_pool_as_the_header_does() -> None:
    orch, work = FakeHandle({"o0": {}}, "o0"), FakeHandle({"w0": {}}, "w0")
    pools = [dict(POOL, name="workers", models=["m"], roles=["worker"]),
             dict(POOL, name="orch", models=["m"], roles=["orchestrator"])]
    ing = make_ingress({"workers": work, "orch": orch}, pools)
    by_header = chat(ing, {"x-agent-role": "orchestrator"}, model="m")
    by_xargs = chat(ing, {}, model="m", vllm_xargs={"agent_role": "orchestrator", "session_id": "s1"})
    assert by_header.headers["x-kvsched-pool"] == by_xargs.headers["x-kvsched-pool"] == "orch"


# ---- DELETE /kvsched/sessions/{id} --------------------------------------------------------------------------------
def end(ing: Any, sid: str, headers: dict[str, str] | None = None) -> Any:
    return asyncio.run(ing.end_session(sid, request(headers or {}, method="DELETE")))


def forgotten(handle: FakeHandle) -> list[str]:
    """The session keys the pool's router was told ended (a routed call carrying the end_session hint)."""
    return [c[4]["session_id"] for c in handle.calls if c[0] == "remote" and c[3].get("route") == RouteHints(
        end_session=True)]


def test_a_delete_reaches_every_replica_and_ends_the_session_where_it_is() -> None:
    """Found by review: the DELETE was routed like a turn; with the session's replica busy it reached another one,
    got 404, answered 404 and left the KV pinned on the busy replica (while the router forgot the session)."""
    handle = FakeHandle({"idle": {"status": 404, "body": b'{"error": "no session"}'}, "busy": {"status": 200}},
                        routed_to="idle")
    asleep = FakeHandle({}, routed_to="none")  # a pool scaled to zero: no replica to ask, no router call to wake it
    res = end(make_ingress({"w": handle, "x": asleep}, [POOL, dict(POOL, name="x")]), "conv-7")
    assert res.status_code == 200 and json.loads(res.body)["pools"] == ["w"]
    assert res.headers["x-kvsched-replica-id"] == "busy"
    assert [c[1:3] for c in handle.calls if c[0] == "broadcast"] == [("admin", ("DELETE", "/kvsched/sessions/conv-7",
                                                                                {}))]
    assert forgotten(handle) == ["conv-7"] and forgotten(asleep) == []


def test_a_delete_no_replica_holds_is_404_and_a_refused_one_is_passed_on_and_not_forgotten() -> None:
    nowhere = FakeHandle({"r0": {"status": 404}, "r1": {"status": 404}}, "r0")
    assert end(make_ingress({"w": nowhere}), "conv-7").status_code == 404 and forgotten(nowhere) == ["conv-7"]
    refused = FakeHandle({"r0": {"status": 401, "body": b'{"error": "Unauthorized"}'}, "r1": {"status": 404}}, "r0")
    assert end(make_ingress({"w": refused}), "conv-7").status_code == 401 and forgotten(refused) == []


# ---- the caller's key and salt ------------------------------------------------------------------------------------
KEYED = [dict(POOL, vllm_args=["--api-key", "k1", "k2"])]


def test_two_tenants_sessions_of_one_id_are_two_sessions_to_the_ingress_and_the_router() -> None:
    """Found by review: with `--api-key` on a pool the engines keep each key's sessions apart (and let a key end only
    its own); the ingress must pass the key on and key its tables and the router's the same way, so one tenant
    ending (or growing) its session does not touch another's routing."""
    handle = FakeHandle({"r0": {"status": 200}, "r1": {"status": 404}}, "r0")
    ing = make_ingress({"w": handle}, KEYED)
    for key in ("k1", "k2"):
        assert chat(ing, {"authorization": f"Bearer {key}", "x-session-id": "conv"}).status_code == 200
    salted = chat(ing, {"authorization": "Bearer k1", "x-session-id": "conv"}, cache_salt="s")
    assert salted.status_code == 200
    turns = [c for c in handle.calls if c[1] == "complete"]
    keys = [c[4]["session_id"] for c in turns]
    assert len(set(keys)) == 3 and {plain_session(k) for k in keys} == {"conv"}
    assert [c[2][2]["authorization"] for c in turns] == ["Bearer k1", "Bearer k2", "Bearer k1"]  # on to the engine
    res = end(ing, "conv", {"authorization": "Bearer k1", "x-kvsched-cache-salt": "s", "cookie": "x"})
    assert res.status_code == 200
    (_, _, args, _, _), = [c for c in handle.calls if c[0] == "broadcast"]
    assert args[2] == {"authorization": "Bearer k1", "x-kvsched-cache-salt": "s"}  # the engine ends only k1's
    assert forgotten(handle) == [keys[2]]  # the router forgets k1's salted session, not k2's nor k1's unsalted
    open_pool = FakeHandle({"r0": {}}, "r0")  # no pool checks keys: the engines see one tenant, and so does this
    ing = make_ingress({"w": open_pool})
    for key in ("k1", "k2"):
        chat(ing, {"authorization": f"Bearer {key}", "x-session-id": "conv"})
    assert [c[4]["session_id"] for c in open_pool.calls] == ["conv", "conv"]


def test_one_key_is_one_owner_whatever_the_case_of_its_bearer_scheme() -> None:
    """Found by review: the ingress keyed a session by the raw `Authorization` text while vLLM and kvsched's engines
    read the scheme case-insensitively ("bearer k1" is k1's): one tenant's session was two to the router, and a
    DELETE sent as "Bearer k1" left the "bearer k1" turns' routing behind."""
    handle = FakeHandle({"r0": {"status": 200}}, "r0")
    ing = make_ingress({"w": handle}, KEYED)
    for auth in ("Bearer k1", "bearer k1", "BEARER k1"):
        assert chat(ing, {"authorization": auth, "x-session-id": "conv"}).status_code == 200
    chat(ing, {"authorization": "Bearer k2", "x-session-id": "conv"})
    keys = [c[4]["session_id"] for c in handle.calls if c[1] == "complete"]
    assert len(set(keys[:3])) == 1 and keys[3] != keys[0]
    assert end(ing, "conv", {"authorization": "bearer k1"}).status_code == 200
    assert forgotten(handle) == [keys[0]]


def test_the_router_forgets_one_tenants_session_and_finds_kv_by_the_plain_id() -> None:
    from kvsched.adapters.ray.hints import routing_session
    from tests.ray.test_router_units import fake_replica, new_router, routed

    async def run() -> None:
        r = new_router()
        k1, k2 = routing_session("conv", "Bearer k1"), routing_session("conv", "Bearer k2")
        a, b = fake_replica("A", {"slot": 0}), fake_replica("B", {"slot": 1, "kv_sessions": ["conv"]})
        r.update_replicas([a, b])
        assert await routed(r, [a, b], k1, "t1") is b  # the engine reports KV by the session id
        await routed(r, [a, b], k2, "t2")
        r.on_request_completed(b.replica_id, "t1")
        chosen = await routed(r, [a, b], k1, "end", RouteHints(end_session=True))
        r.on_request_completed(chosen.replica_id, "end")
        assert r._core.last_slot(k1) is None and r._core.last_slot(k2) is not None

    asyncio.run(run())


def test_the_engine_replica_passes_the_callers_key_and_salt_to_vllm() -> None:
    """Found by review: no `Authorization` reached a replica's vLLM, so a pool with `--api-key` (or VLLM_API_KEY)
    answered 401 to every request, and a DELETE read as 404. Stand-in upstream: checks the key as vLLM does."""
    import httpx

    from kvsched.adapters.ray.engine import EngineReplica

    seen: list[dict[str, str]] = []

    class Upstream(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200 if self.headers.get("Authorization") == "Bearer k1" else 401)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_DELETE = _answer  # noqa: N815 - http.server's names

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    cls = getattr(EngineReplica, "func_or_class", EngineReplica)

    async def run() -> None:
        replica = cls.__new__(cls)
        replica.replica_id, replica.server = "R", SimpleNamespace(proc=None)
        replica.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.server_address[1]}")
        try:
            who = {"authorization": "Bearer k1", "x-kvsched-cache-salt": "s", "cookie": "c"}
            assert (await replica.complete("/v1/chat/completions", b"{}", who | {"x-session-id": "s1"}))["status"] == 200
            assert seen[-1]["authorization"] == "Bearer k1" and seen[-1]["x-kvsched-cache-salt"] == "s"
            assert "cookie" not in seen[-1]
            assert (await replica.admin("DELETE", "/kvsched/sessions/s1", who))["status"] == 200
            assert seen[-1]["authorization"] == "Bearer k1" and "cookie" not in seen[-1]
        finally:
            await replica.client.aclose()

    try:
        asyncio.run(run())
    finally:
        server.shutdown()


# ---- replica failures on the admin routes, and who may list the replicas --------------------------------------------
class Failing(FakeHandle):
    """A pool whose replica `holder` fails every broadcast call (busy or partitioned) while the others answer 404."""

    def options(self, **kw: Any) -> Failing:
        return Failing(self.replicas, self.routed_to, self.opts | kw, self.calls)

    def broadcast(self, method: str, *args: Any, **kw: Any) -> Any:
        from ray.exceptions import ActorUnavailableError

        self.calls.append(("broadcast", method, args, kw, self.opts))

        async def results_async(return_exceptions: bool = False) -> list:
            return [ActorUnavailableError("busy", None) if name == "holder" else {**self._answer(name), "status": 404}
                    for name in self.replicas]

        return SimpleNamespace(results_async=results_async)


def test_a_delete_a_replica_failed_to_answer_is_503_logged_and_not_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    """Found by review: the replica holding the session failed the DELETE; the failure was dropped without a log line,
    the others' 404 answered the caller "no session" (its KV stayed pinned there) and the router forgot it anyway."""
    handle = Failing({"holder": {}, "other": {}}, "holder")
    with caplog.at_level("WARNING", logger="ray.serve"):
        res = end(make_ingress({"w": handle}), "conv-1")
    assert res.status_code == 503 and b"retry" in res.body
    assert forgotten(handle) == [] and "ActorUnavailableError" in caplog.text


def test_listing_the_replicas_needs_an_admin_key_where_keys_are_in_use() -> None:
    """Found by review: GET /kvsched/replicas (engine URLs and pids) answered without any key on a pool whose engines
    check API keys."""
    handle = FakeHandle({"r0": {"pool": "w", "engine_url": "http://127.0.0.1:41234", "engine_pid": 4242}}, "r0")

    def listing(pools: list[dict], headers: dict[str, str]) -> Any:
        return asyncio.run(make_ingress({"w": handle}, pools).replicas(request(headers, method="GET")))

    assert listing(KEYED, {}).status_code == 401
    assert listing(KEYED, {"Authorization": "Bearer k1"}).status_code == 401  # a tenant's key is not an admin's
    admin = [dict(KEYED[0], env={"KVSCHED_ADMIN_KEYS": "adm"})]
    assert listing(admin, {"Authorization": "Bearer adm"})["replicas"][0]["engine_pid"] == 4242
    assert listing([dict(POOL, env={"KVSCHED_ADMIN_KEYS": "adm"})], {}).status_code == 401
    assert len(listing([POOL], {})["replicas"]) == 1  # no keys anywhere: open, as every route of such a pool
