"""The ingress's session and replica routes on a real Ray Serve cluster on loopback: kvsched's ingress, router and
autoscaling policy as `build_app` wires them, with stand-in engine replicas (`standin_engine.py`, no vLLM: what is
tested is Ray's side). Pools: `w` (two replicas), `k` (one, checking API keys, as `--api-key` makes vLLM) and `z`
(autoscaled, `min_replicas: 0`: no replica running)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def base(serve_cluster: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    from kvsched.adapters.ray.app import engine_options
    from kvsched.adapters.ray.config import parse_config
    from kvsched.adapters.ray.ingress import OpenAIIngress
    from tests.ray.shared_cluster import QUICK_DRAIN, deployed
    from tests.ray.standin_engine import StandInEngine

    pool = {"model": "/m", "num_cpus": 0}
    cfg = parse_config({"http": {"host": "127.0.0.1", "port": serve_cluster["port"]}, "router": {"stats_period_s": 1},
                        "request_deadline_s": 30, "pools": [
                            dict(pool, name="w", models=["w"], replicas=2),
                            dict(pool, name="k", models=["k"], replicas=1, vllm_args=["--api-key", "k1", "k2"],
                                 env={"KVSCHED_ADMIN_KEYS": "adm"}),
                            dict(pool, name="z", models=["z"], autoscaling={"min_replicas": 0, "max_replicas": 1})]})
    engines = {p.name: serve.deployment(StandInEngine).options(**{**engine_options(p, cfg), **QUICK_DRAIN}).bind(
        p.name, p.engine.model_dump()) for p in cfg.pools}
    ingress = serve.deployment(OpenAIIngress).options(name="ingress", num_replicas=1,
                                                      ray_actor_options={"num_cpus": 0}, **QUICK_DRAIN)
    with deployed(ingress.bind(cfg.to_dict(), engines)):
        yield serve_cluster["base"]


def http(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, exc.headers, exc.read()
    try:
        answer = json.loads(raw or b"null")
    except ValueError:
        answer = raw.decode(errors="replace")  # Ray's own error pages are plain text
    return status, {k.lower(): v for k, v in head.items()}, answer


def turn(base: str, model: str, sid: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return http(base, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                {"X-Session-Id": sid, **(headers or {})})


def replicas(base: str) -> list[dict[str, Any]]:
    status, _, body = http(base, "GET", "/kvsched/replicas", headers=ADMIN)
    assert status == 200, body
    return body["replicas"]


def test_a_pool_scaled_to_zero_has_no_replicas_to_the_admin_routes(base: str) -> None:
    """Found by review (e2e/run3.py): Ray's broadcast raises DeploymentUnavailableError for a deployment without
    replicas; every admin route answered 503 for every pool, and the router never forgot a deleted session."""
    assert turn(base, "w", "s1")[0] == 200
    assert {(r["pool"]) for r in replicas(base)} == {"w", "k"}
    assert len(replicas(base)) == 3
    status, _, body = http(base, "GET", "/kvsched/sessions")
    assert status == 200 and [r["session_id"] for r in body["sessions"]] == ["s1"]
    status, _, body = http(base, "DELETE", "/kvsched/sessions/s1")
    assert (status, body["pools"]) == (200, ["w"])
    assert sum(r["ended_routes"] for r in replicas(base) if r["pool"] == "w") == 1  # w's router was told
    assert http(base, "DELETE", "/kvsched/sessions/s1", headers={"Authorization": "Bearer k1"})[0] == 404


def test_the_sessions_listing_pages_across_the_replicas_and_names_a_pool_that_refused_the_caller(base: str) -> None:
    """Found by review (test_list_sessions.py): `limit`, `cursor` and `summary` never reached the engines and
    `next_cursor` was dropped; a refusal (401 of a pool checking keys) read as an empty list."""
    made = {f"list{i}" for i in range(8)}
    for sid in made:
        assert turn(base, "w", sid)[0] == 200
    where = {r["replica_id"]: r for r in replicas(base) if r["pool"] == "w"}
    assert len(where) == 2
    seen: list[tuple[str, str]] = []
    cursor, pages = None, 0
    while pages < 20:
        status, _, body = http(base, "GET", "/kvsched/sessions?limit=1" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        assert len(body["sessions"]) <= 2 and [(e["pool"], e["status"]) for e in body["errors"]] == [("k", 401)]
        seen += [(r["pool"], r["session_id"]) for r in body["sessions"]]
        pages, cursor = pages + 1, body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(("w", s) for s in made) and 4 <= pages <= 8
    status, _, body = http(base, "GET", "/kvsched/sessions?summary=1")
    assert status == 200 and body["summary"] == {"sessions": 8} and len(body["replicas"]) == 2
    status, _, body = http(base, "GET", "/kvsched/sessions", headers={"Authorization": "Bearer k2"})
    assert status == 200 and body["sessions"] == [] and body["errors"] == []


def test_an_answer_names_the_slot_the_router_chose_for_its_replica(base: str) -> None:
    """Found by review (test_header_slot.py): X-KVSched-Replica named the replica's Ray rank, which differs from the
    router's slot for it once Ray renumbered ranks. The router's slot reaches the replica with the request, through
    Ray's own routing loop (the stand-in echoes what arrived in X-KVSched-Test-Route-Slot)."""
    served = {}
    for i in range(6):
        status, head, _ = turn(base, "w", f"slot{i}")
        assert status == 200 and head["x-kvsched-test-route-slot"] != "None"
        assert head["x-kvsched-replica"] == f"slot-{head['x-kvsched-test-route-slot']}"
        served[head["x-kvsched-replica-id"]] = head["x-kvsched-replica"]
    described = {r["replica_id"]: f"slot-{r['slot']}" for r in replicas(base) if r["pool"] == "w"}
    assert served.items() <= described.items()


def test_an_unnamed_conversations_turns_stay_on_one_replica_and_conversations_spread(base: str) -> None:
    """Requests naming no session are routed by their conversation's opening (kvsched.adapters.ray.opening): each
    conversation's turns reach one replica, and different conversations are placed over the ring with bounded load.
    Before, every unnamed request went to the least-loaded replica (slot-0 on ties): a conversation's turns followed
    the load, not their KV."""
    served: dict[int, set[str]] = {}
    for c in range(8):
        messages = [{"role": "system", "content": "agent"}, {"role": "user", "content": f"task {c}"}]
        for t in range(3):
            status, head, _ = http(base, "POST", "/v1/chat/completions", {"model": "w", "messages": messages})
            assert status == 200
            served.setdefault(c, set()).add(head["x-kvsched-replica-id"])
            messages = messages + [{"role": "assistant", "content": f"step {t}"}, {"role": "user", "content": "go"}]
    assert all(len(r) == 1 for r in served.values()), served
    assert len(set().union(*served.values())) == 2, served
