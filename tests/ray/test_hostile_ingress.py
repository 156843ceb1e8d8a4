"""A hostile but plausible client against kvsched's Ray Serve ingress and router on a real cluster on loopback
(`kvsched ray-serve` as `build_app` wires it, stand-in engine replicas: what is probed is Ray's side). Each probe is
followed by the checks the brief asks for: a normal turn of a session goes to the session's replica and succeeds,
the router's in-flight counts return to zero once idle, and no 500 reached the client.

Raw HTTP (`raw`) where a client library would tidy the request up: a header sent twice, header bytes that are not
UTF-8, a path with an undecodable escape."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.ray.standin_engine import StandInEngine

pytestmark = pytest.mark.integration
SLOW = 777  # `max_tokens` that makes a stand-in engine stream slowly (or answer slowly): a client can go away midway


class SlowStandIn(StandInEngine):
    """A stand-in engine that streams one chunk every 0.1 s for ~30 s (or answers after 30 s) when the request asks
    for `max_tokens: SLOW`: a client can leave midway. Counts the generations still running (`running`)."""

    running = 0

    async def complete(self, path: str, body: bytes, headers: dict[str, str], route: Any = None) -> dict[str, Any]:
        if b'"max_tokens": %d' % SLOW not in body:
            return await super().complete(path, body, headers, route=route)
        type(self).running += 1
        try:
            await asyncio.sleep(30)
        finally:
            type(self).running -= 1
        return await super().complete(path, body, headers, route=route)

    async def stream(self, path: str, body: bytes, headers: dict[str, str], route: Any = None) -> AsyncIterator[Any]:
        slow = b'"max_tokens": %d' % SLOW in body
        if not slow:  # (the stand-in's vLLM answers at once: httpx's mock transport cannot stream it)
            answer = await super().complete(path, body, headers, route=route)
            yield {k: v for k, v in answer.items() if k != "body"} | {"content_type": "text/event-stream"}
            yield b"data: " + answer["body"] + b"\n\ndata: [DONE]\n\n"
            return
        type(self).running += 1
        try:
            yield {"status": 200, "content_type": "text/event-stream", "slot": self.served_slot(route),
                   "replica_id": self.replica_id, "headers": {}}
            for i in range(300):
                yield b'data: {"i": %d}\n\n' % i
                await asyncio.sleep(0.1)
        finally:
            type(self).running -= 1

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"running": type(self).running}


def router_state(engines: dict[str, Any]) -> dict[str, Any]:
    """Each pool's router's counts (Ray's router of the handle, run in a thread of its own: read, not changed)."""
    out: dict[str, Any] = {}
    for name, handle in engines.items():
        outer = getattr(handle, "_router", None)
        inner = getattr(outer, "_asyncio_router", outer)
        r = getattr(inner, "_request_router", None)
        if r is None or not hasattr(r, "_core"):
            out[name] = None
            continue
        out[name] = {"loads": {str(k): v for k, v in dict(r._loads).items() if v},
                     "in_flight": len(r._in_flight), "reserved": len(r._reserved),
                     "reserved_load": sum(r._reserved_load.values()), "ending": len(r._ending),
                     "decisions": len(r._decisions), "attempts": len(r._attempts)}
    return out


def probed_ingress() -> Any:
    """kvsched's ingress with one method more, for the tests: its routers' counts and its own."""
    from kvsched.adapters.ray.ingress import OpenAIIngress

    class ProbedIngress(OpenAIIngress):  # type: ignore[misc, valid-type]
        def state(self) -> dict[str, Any]:
            return {"routers": router_state(self.engines), "openings": len(self.openings.in_flight)}

    return ProbedIngress


@pytest.fixture(scope="module")
def app(serve_cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Pool `w`: two slow-capable stand-in replicas. The app's handle reads the routers' counts."""
    from ray import serve

    from kvsched.adapters.ray.app import engine_options
    from kvsched.adapters.ray.config import parse_config
    from tests.ray.shared_cluster import QUICK_DRAIN, deployed

    cfg = parse_config({"http": {"host": "127.0.0.1", "port": serve_cluster["port"]}, "router": {"stats_period_s": 1},
                        "request_deadline_s": 30, "max_body_bytes": 1 << 20,
                        "pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 2, "num_cpus": 0}]})
    engines = {p.name: serve.deployment(SlowStandIn).options(**{**engine_options(p, cfg), **QUICK_DRAIN}).bind(
        p.name, p.engine.model_dump()) for p in cfg.pools}
    ingress = serve.deployment(probed_ingress()).options(name="ingress", num_replicas=1,
                                                         ray_actor_options={"num_cpus": 0}, **QUICK_DRAIN)
    with deployed(ingress.bind(cfg.to_dict(), engines), name="hostile"):
        yield {"port": serve_cluster["port"], "handle": serve.get_app_handle("hostile"),
               "logs": serve_cluster["logs"], "500s": server_errors(serve_cluster["logs"])}


def raw(port: int, method: str, path: bytes | str, headers: list[tuple[bytes | str, bytes | str]] = (),
        body: bytes = b"", read: bool = True, timeout_s: float = 30.0, leave_after_s: float | None = None,
        length: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request as written, (status, headers, body); `read=False` returns after the status line and
    closes the connection (a client gone mid-answer); `leave_after_s`: closes it then, answered or not (status 0);
    `length`: the content-length declared, if not the body's."""
    def b(x: bytes | str) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    lines = [b"%s %s HTTP/1.1" % (b(method), b(path)), b"host: 127.0.0.1", b"connection: close"]
    lines += [b(k) + b": " + b(v) for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(b"content-length: %d" % (len(body) if length is None else length))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        if leave_after_s is not None:
            time.sleep(leave_after_s)
            return 0, {}, b""
        answer = s.makefile("rb")  # the status line and headers line by line, then (if read) the rest to the close
        status = int(answer.readline().split(b" ", 2)[1])
        hdrs: dict[str, str] = {}
        for line in iter(answer.readline, b"\r\n"):
            if not line:
                break
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        return status, hdrs, answer.read() if read else b""


def chat(sid: str | None = None, **fields: Any) -> bytes:
    return json.dumps({"model": "w", "messages": [{"role": "user", "content": "hi"}], **fields}
                      | ({"session_id": sid} if sid is not None else {})).encode()


JSON_TYPE = ("content-type", "application/json")


def settled(app: dict[str, Any], timeout_s: float = 20.0) -> dict[str, Any]:
    """The routers' and the ingress's counts once every one of them is back to zero (or as they stand at
    `timeout_s`, for the assert to show)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = app["handle"].state.remote().result()
        busy = [r for r in state["routers"].values() if r and (r["loads"] or r["in_flight"] or r["reserved"]
                                                               or r["reserved_load"] or r["ending"])]
        if (not busy and not state["openings"]) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def server_errors(logs: Any) -> int:
    """Answers of status 500 Ray's proxy logged so far (every app of the cluster)."""
    return sum(len(re.findall(r" -- \S+ \S+ 5\d\d ", p.read_text(errors="replace"))) for p in logs.glob("proxy_*.log"))


def replicas(app: dict[str, Any]) -> list[dict[str, Any]]:
    status, _, body = raw(app["port"], "GET", "/kvsched/replicas")
    assert status == 200, body
    return list(json.loads(body)["replicas"])


def turn(app: dict[str, Any], sid: str, headers: list[tuple[bytes | str, bytes | str]] = ()) -> tuple[int, str]:
    """A normal turn of session `sid`: (status, the replica that served it)."""
    status, head, body = raw(app["port"], "POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-id", sid),
                                                                           *headers], chat())
    return status, head.get("x-kvsched-replica-id", body.decode(errors="replace"))


def still_sound(app: dict[str, Any], homes: dict[str, str]) -> None:
    """After a probe: each session's normal turn goes to its replica and succeeds, the routers' and the ingress's
    counts are back to zero, no engine generation is left running, and Ray's proxy logged no 5xx."""
    for sid, home in homes.items():
        assert turn(app, sid) == (200, home), sid
    state = settled(app)
    assert state == {"routers": {"w": {"loads": {}, "in_flight": 0, "reserved": 0, "reserved_load": 0, "ending": 0,
                                       "decisions": 0, "attempts": 0}}, "openings": 0}, state
    assert wait_for(lambda: all(r["running"] == 0 for r in replicas(app))), replicas(app)
    assert server_errors(app["logs"]) == app["500s"]


def wait_for(check: Any, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def homes(app: dict[str, Any]) -> dict[str, str]:
    """Sessions placed before the probes, by the replica that served their first turn: at least one on each."""
    out: dict[str, str] = {}
    for i in range(40):
        status, home = turn(app, f"home-{i}")
        assert status == 200, home
        if home not in out.values():
            out[f"home-{i}"] = home
        if len(out) == 2:
            return out
    raise AssertionError(f"no session reached a second replica: {out}")


def test_a_kvsched_header_sent_twice_with_different_values_is_a_400_naming_it(app: dict[str, Any],
                                                                             homes: dict[str, str]) -> None:
    """Found by probing: through Ray's proxy the ingress took the last of two X-Session-Id (X-Agent-Role,
    X-Session-End, ...) headers and served 200 under it; two salt headers listed and ended sessions under the last.
    kvsched's engine refuses them (400 naming the header); so does the ingress now. The same value twice is one."""
    sid, home = next(iter(homes.items()))
    for name, first, second in (("x-session-id", "a1", sid), ("x-agent-role", "worker", "critic"),
                                ("x-session-end", "0", "1"), ("x-session-ttl", "5", "50")):
        extra = [] if name == "x-session-id" else [("x-session-id", sid)]
        status, _, body = raw(app["port"], "POST", "/v1/chat/completions",
                              [JSON_TYPE, *extra, (name, first), (name, second)], chat())
        assert status == 400 and json.loads(body)["error"]["param"] == name, body
    assert turn(app, sid, [("x-session-id", sid)]) == (200, home)  # the same value twice
    salts = [("x-kvsched-cache-salt", "a"), ("x-kvsched-cache-salt", "b")]
    for method, path in (("GET", "/kvsched/sessions"), ("DELETE", f"/kvsched/sessions/{sid}")):
        status, _, body = raw(app["port"], method, path, salts)
        assert status == 400 and json.loads(body)["error"]["param"] == "x-kvsched-cache-salt", body
    still_sound(app, homes)  # the session was not ended by the refused DELETE nor by the refused X-Session-End


def test_session_headers_are_read_as_utf8_and_a_path_that_is_not_is_a_400(app: dict[str, Any],
                                                                         homes: dict[str, str]) -> None:
    """Found by probing: X-Session-Id "日本" was refused (read as latin-1: U+0097, "a control character") and "café"
    by header and body conflicted (400), where kvsched's engine takes both; DELETE /kvsched/sessions/%ff ended the
    session named U+FFFD (404 naming it, when none was). A header that is no UTF-8 is a 400 naming it."""
    for sid in ("日本/worker", "café"):
        status, by_header = turn(app, sid.encode("utf-8").decode("latin-1"))
        assert status == 200, by_header
        status, _, body = raw(app["port"], "POST", "/v1/chat/completions",
                              [JSON_TYPE, ("x-session-id", sid.encode("utf-8"))], chat(sid))
        assert status == 200, body  # header and body name one session
        assert turn(app, sid.encode("utf-8").decode("latin-1"))[1] == by_header
    status, _, body = raw(app["port"], "DELETE", "/kvsched/sessions/%ff")
    assert status == 400 and "UTF-8" in json.loads(body)["error"]["message"], body
    status, _, body = raw(app["port"], "POST", "/v1/chat/completions",
                          [JSON_TYPE, ("x-session-id", "s"), ("x-agent-role", b"\xff")], chat())
    assert status == 400 and json.loads(body)["error"]["param"] == "x-agent-role", body
    still_sound(app, homes)


def test_an_x_session_id_that_is_no_utf8_is_kvscheds_400_not_rays_500(app: dict[str, Any],
                                                                     homes: dict[str, str]) -> None:
    """Found by probing: Ray 2.60's HTTP proxy decodes the header it routes sessions by (`x-session-id` by default,
    `_` alike) as UTF-8 for itself, and answered 500 before kvsched's ingress saw the request. Serve started as
    `kvsched ray-serve` starts it (kvsched/adapters/ray/proxy.py, here by the package's cluster) reads no such header:
    the ingress answers 400 naming X-Session-Id, as kvsched's engine does, and `x_session_id`, which is no header of
    kvsched's, is served as any other."""
    for name, value in (("x-session-id", b"\xff"), ("X-Session-Id", b"caf\xe9"), ("x-session-id", b"a\x80b")):
        status, _, body = raw(app["port"], "POST", "/v1/chat/completions", [JSON_TYPE, (name, value)], chat())
        assert status == 400, (name, value, status, body[:300])
        error = json.loads(body)["error"]
        assert error["param"] == "x-session-id" and "UTF-8" in error["message"], error
    status, _, body = raw(app["port"], "POST", "/v1/chat/completions", [JSON_TYPE, ("x_session_id", b"\xff")], chat())
    assert status == 200, body[:300]
    still_sound(app, homes)


RAYS_OWN = [("x-request-id", b"\xff"), ("X-Request-ID", b"caf\xe9"), ("serve_multiplexed_model_id", b"\xff"),
            ("Serve-Multiplexed-Model-Id", b"a\x80b"), ("x-request-timeout-seconds", b"\xff"),
            ("x-request-disconnect-disabled", b"\xe9")]


def test_a_header_rays_proxy_reads_that_is_no_utf8_is_kvscheds_400_not_rays_500(app: dict[str, Any],
                                                                                homes: dict[str, str]) -> None:
    """Found by probing: Ray 2.60's HTTP proxy decodes X-Request-Id, serve_multiplexed_model_id (any case, `-` as
    `_`), X-Request-Timeout-Seconds and X-Request-Disconnect-Disabled as UTF-8 for itself, and answered 500 before
    kvsched's ingress saw the request (no variable renames them). kvsched's middleware in Ray's proxy
    (kvsched/adapters/ray/proxy_headers.py, named by the options `kvsched ray-serve` and the package's cluster start
    Serve with) answers 400 naming the header, on every route, a valid one sent before it or not; a UTF-8
    X-Request-Id is served, and the sessions stay where they were."""
    sid, home = next(iter(homes.items()))
    for name, value in RAYS_OWN:
        for method, path, headers, body in (
                ("POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-id", sid), (name, value)], chat()),
                ("GET", "/kvsched/replicas", [("x-request-id", "fine"), (name, value)], b"")):
            status, _, answer = raw(app["port"], method, path, headers, body)
            assert status == 400, (name, value, path, status, answer[:300])
            error = json.loads(answer)["error"]
            assert error["param"] == name.lower() and "UTF-8" in error["message"], error
    assert turn(app, sid, [("x-request-id", "日本/1".encode())]) == (200, home)
    still_sound(app, homes)


BAD = [  # (method, path, headers, body, status): bad input that was answered well before this module too
    ("POST", "/v1/chat/completions", [JSON_TYPE], b"not json", 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], b"[1, 2]", 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], b"", 400),
    ("POST", "/v1/completions", [JSON_TYPE], b"\xff\xfe", 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], b"[" * 3000 + b"]" * 3000, 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], b'{"x": "' + b"a" * (2 << 20) + b'"}', 413),
    ("POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-id", "")], chat(), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-id", "x" * 10_000)], chat(), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-id", "a")], chat("b"), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE, ("x-session-end", "1")], chat(), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], chat("s", stream="maybe"), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], chat("s", model=["w"]), 400),
    ("POST", "/v1/chat/completions", [JSON_TYPE], chat("s", model="nope"), 404),
    ("POST", "/v1/chat/completions", [("content-type", "text/plain")], chat(), 415),  # 200 before: vLLM's 422
    ("POST", "/v1/nope", [JSON_TYPE], b"{}", 404),
    ("GET", "/v1/chat/completions", [], b"", 405),
    ("DELETE", "/kvsched/sessions/", [], b"", 400),
    ("DELETE", "/kvsched/sessions/%00", [], b"", 400),
    ("DELETE", "/kvsched/sessions/" + "x" * 5000, [], b"", 400),
    ("GET", "/kvsched/sessions?cursor=junk", [], b"", 400),
    ("GET", "/kvsched/sessions?limit=x", [], b"", 400),
    ("GET", "/kvsched/sessions?" + "&".join(f"a{i}=1" for i in range(9)), [], b"", 400),
    ("GET", "/kvsched/sessions?nope=1", [], b"", 400),
]


def test_hostile_bodies_routes_and_listing_parameters_get_a_4xx_with_a_message(app: dict[str, Any],
                                                                              homes: dict[str, str]) -> None:
    """Each answer a 4xx with a message, then all is as before. Sound before this module but for a JSON body sent as
    text/plain (served 200, where vLLM alone answers 422)."""
    for method, path, headers, body, want in BAD:
        # A body refused by its declared length (413) is never read: sent, its bytes left unread made the server's
        # close a reset, which could cut the answer short (ConnectionResetError once in stop 61's `make test`, the
        # machine loaded): only its length is declared, the refusal the same.
        declared = len(body) if want == 413 else None
        status, _, answer = raw(app["port"], method, path, headers, b"" if declared else body, length=declared)
        assert status == want and answer, (method, path[:60], body[:60], status, answer[:300])
    still_sound(app, homes)


def test_a_client_leaving_mid_stream_or_mid_answer_leaves_no_load_nor_generation(app: dict[str, Any],
                                                                                homes: dict[str, str]) -> None:
    """Sound before this module: a client that goes away mid-stream (after the first bytes), while a non-streamed
    answer is generated, or mid-stream on an unnamed conversation (counted under its opening), leaves no request
    counted in the router nor the ingress and no generation running on the engine."""
    sid = next(iter(homes))
    for headers, fields in (([("x-session-id", sid)], {"stream": True}), ([("x-session-id", sid)], {}),
                            ([], {"stream": True})):
        with socket.create_connection(("127.0.0.1", app["port"]), timeout=30) as s:
            body = chat(None, max_tokens=SLOW, **fields)
            head = [b"POST /v1/chat/completions HTTP/1.1", b"host: x", b"content-type: application/json",
                    b"content-length: %d" % len(body), *(f"{k}: {v}".encode() for k, v in headers)]
            s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
            assert wait_for(lambda: sum(r["running"] for r in replicas(app)) == 1), replicas(app)
            if fields:
                assert s.recv(1024).startswith(b"HTTP/1.1 200")  # the stream's first bytes came
        still_sound(app, homes)
