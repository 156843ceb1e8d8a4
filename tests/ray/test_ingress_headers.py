"""kvsched's headers at the OpenAI ingress read as its engines read them (no cluster): sent twice with different values
is a 400 naming the header, their bytes are UTF-8 (a session id by header is the id the engine files, the router
keys and a DELETE names), a session id goes on to the engine as the bytes the engine reads back as that id, and a
session path that is not UTF-8 is a 400. Each found by probing the Ray Serve app with raw HTTP
(tests/ray/test_hostile_ingress.py runs them through Ray's proxy)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from tests.ray.test_ingress_handles import FakeHandle, make_ingress

CHAT = json.dumps({"model": "w", "messages": [{"role": "user", "content": "hi"}]}).encode()


def raw_request(headers: list[tuple[bytes, bytes]], body: bytes = b"", method: str = "POST", path: str = "/",
                raw_path: bytes | None = None) -> Request:
    """A request with header bytes as sent (a name may repeat), as the server hands them to Starlette."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": headers}
    if raw_path is not None:
        scope["raw_path"] = raw_path
    return Request(scope, receive)


def generate(ing: Any, headers: list[tuple[bytes, bytes]], body: bytes = CHAT) -> tuple[int, dict]:
    res = asyncio.run(ing.generate(raw_request(headers, body), "/v1/chat/completions"))
    return res.status_code, json.loads(res.body)


def engine_reads(handle: FakeHandle) -> dict[str, str]:
    """kvsched's headers of the one routed call, as the engine replica sends them on (`engine._forward`) and
    kvsched's engine reads them (`adapters.vllm.http_io.utf8_headers`: a 400 if they are no UTF-8)."""
    from kvsched.adapters.ray.engine import _forward
    from kvsched.adapters.vllm.http_io import utf8_headers
    from kvsched.adapters.vllm.request_fields import SESSION_HEADERS

    (_, _, (_, _, sent), _, _), = [c for c in handle.calls if c[0] == "remote"]
    return utf8_headers(_forward(sent), SESSION_HEADERS)


@pytest.mark.parametrize(("name", "first", "second"), [
    ("X-Session-Id", b"mine", b"theirs"), ("X-Agent-Role", b"worker", b"critic"), ("X-Session-TTL", b"5", b"50"),
    ("X-Session-End", b"0", b"1"), ("X-KVSched-Compaction", b"off", b"summarize")])
def test_a_kvsched_header_twice_with_different_values_is_a_400_naming_it(name: str, first: bytes,
                                                                         second: bytes) -> None:
    """Found by probing: the ingress read the last of the two (a dict of Starlette's header items), routed by it
    and forwarded it alone (200), where kvsched's engine, sent both, answers 400. The same value twice is one."""
    base = [(b"content-type", b"application/json")] + ([] if name == "X-Session-Id" else [(b"x-session-id", b"s")])
    handle = FakeHandle({"r0": {}}, "r0")
    status, body = generate(make_ingress({"w": handle}), [*base, (name.encode(), first), (name.encode(), second)])
    assert (status, body["error"]["param"]) == (400, name.lower()) and "more than once" in body["error"]["message"]
    assert handle.calls == []
    status, _ = generate(make_ingress({"w": handle}), [*base, (name.encode(), first), (name.encode(), first)])
    assert status == 200


@pytest.mark.parametrize("route", ["GET", "DELETE"])
def test_the_session_routes_refuse_two_different_salt_headers(route: str) -> None:
    """Found by probing: two X-KVSched-Cache-Salt headers listed (or ended) the caller's sessions under the last."""
    handle = FakeHandle({"r0": {}}, "r0")
    ing = make_ingress({"w": handle})
    req = raw_request([(b"x-kvsched-cache-salt", b"a"), (b"x-kvsched-cache-salt", b"b")], method=route)
    res = asyncio.run(ing.sessions(req) if route == "GET" else ing.end_session("s", req))
    assert res.status_code == 400 and json.loads(res.body)["error"]["param"] == "x-kvsched-cache-salt"
    assert handle.calls == []


@pytest.mark.parametrize("sid", ["café", "日本/worker", "¡"])
def test_a_utf8_session_header_is_the_session_the_engine_reads_and_keys_the_router_alike(sid: str) -> None:
    """Found by probing: read as latin-1, X-Session-Id "café" keyed the router under "cafÃ©" (so the engines' KV
    reports and a DELETE of "café" missed it) and conflicted with the body's "café" (400); "日本" was refused as
    holding U+0097. kvsched's engine reads the header as UTF-8 and takes all of them."""
    for body in (CHAT, json.dumps({**json.loads(CHAT), "session_id": sid}).encode()):
        handle = FakeHandle({"r0": {}}, "r0")
        status, answer = generate(make_ingress({"w": handle}), [(b"x-session-id", sid.encode())], body)
        assert status == 200, answer
        assert [c[4]["session_id"] for c in handle.calls] == [sid] and engine_reads(handle)["x-session-id"] == sid


@pytest.mark.parametrize("sid", ["café", "¡", "日本"])
def test_a_body_session_id_reaches_the_engine_as_the_id_it_names(sid: str) -> None:
    """Found by probing: a body `session_id` "café" went on in X-Session-Id as the latin-1 byte 0xE9, which kvsched's
    engine refuses ("header x-session-id is not valid UTF-8": a header the client never sent)."""
    handle = FakeHandle({"r0": {}}, "r0")
    body = json.dumps({**json.loads(CHAT), "session_id": sid}).encode()
    assert generate(make_ingress({"w": handle}), [], body)[0] == 200
    assert engine_reads(handle)["x-session-id"] == sid


def test_a_kvsched_header_that_is_not_utf8_is_a_400_naming_it() -> None:
    """X-Session-Id too: Ray's own proxy, which decoded it for its own routing and answered 500, reads no session
    header in the Serve kvsched starts (kvsched/adapters/ray/proxy.py; on a real cluster: test_hostile_ingress.py)."""
    for name in (b"x-agent-role", b"x-session-ttl", b"x-session-end", b"x-session-id"):
        handle = FakeHandle({"r0": {}}, "r0")
        headers = [(b"x-session-id", b"s")] if name != b"x-session-id" else []
        status, body = generate(make_ingress({"w": handle}), [*headers, (name, b"\xff")])
        assert (status, body["error"]["param"]) == (400, name.decode()) and "UTF-8" in body["error"]["message"]
        assert handle.calls == []


def test_a_session_path_that_is_not_utf8_is_a_400_not_the_replacement_character() -> None:
    """Found by probing: the server decodes `%ff` to U+FFFD, so DELETE /kvsched/sessions/%ff ended the session named
    "\\ufffd" on every replica (the ingress sent the engines its UTF-8 escapes, which they take)."""
    handle = FakeHandle({"r0": {"status": 404}}, "r0")
    ing = make_ingress({"w": handle})
    req = raw_request([], method="DELETE", path="/kvsched/sessions/\ufffd", raw_path=b"/kvsched/sessions/%ff")
    res = asyncio.run(ing.end_session("\ufffd", req))
    assert res.status_code == 400 and "UTF-8" in json.loads(res.body)["error"]["message"] and handle.calls == []
    req = raw_request([], method="DELETE", path="/kvsched/sessions/\ufffd", raw_path=b"/kvsched/sessions/%EF%BF%BD")
    assert asyncio.run(ing.end_session("\ufffd", req)).status_code == 404  # the character itself, sent right


def test_the_pure_readers_refuse_with_the_headers_name() -> None:
    from kvsched.adapters.ray.requests import BadRequest, refuse_repeated, utf8_headers

    refuse_repeated([(b"X-Session-Id", b"a"), (b"x-session-id", b"a"), (b"x-other", b"b"), (b"X-Other", b"c")])
    with pytest.raises(BadRequest) as exc:
        refuse_repeated([(b"X-Session-Id", b"a"), (b"x-session-id", b"b")])
    assert (exc.value.status, exc.value.param) == (400, "x-session-id")
    assert utf8_headers({"x-session-id": "cafÃ©", "x-other": "\xff"}) == {"x-session-id": "café"}
    with pytest.raises(BadRequest) as exc:
        utf8_headers({"x-agent-role": "\xff"})
    assert exc.value.param == "x-agent-role"


@pytest.mark.parametrize(("ctype", "status"), [
    (b"text/plain", 415), (b"application/x-www-form-urlencoded", 415), (b"multipart/form-data; boundary=x", 415),
    (b"application/json", 200), (b"Application/JSON; charset=utf-8", 200), (b"application/vnd.api+json", 200),
    (None, 200)])
def test_a_body_declared_other_than_json_is_refused_as_vllm_refuses_it(ctype: bytes | None, status: int) -> None:
    """Found by probing: a JSON body sent as text/plain (or a form) was sent on as application/json and served 200,
    where vLLM alone answers 422 (FastAPI reads its request models from JSON bodies only, or ones of no type)."""
    handle = FakeHandle({"r0": {}}, "r0")
    got, body = generate(make_ingress({"w": handle}), [] if ctype is None else [(b"content-type", ctype)])
    assert got == status, body
    assert status == 200 or (body["error"]["param"] == "content-type" and handle.calls == [])


def test_the_request_id_goes_to_the_engine_as_rays_proxy_and_vllm_read_it() -> None:
    """The engine serves a request under its X-Request-Id (vLLM: the answer's `id`, its logs), so it is sent the id
    Ray's proxy answers the client: the first of two, as Ray and vLLM read it (found by review: none was sent, and the
    engine served under an id of its own; on a real cluster: test_serve_integration.py)."""
    from ray.serve._private.constants import SERVE_HTTP_REQUEST_ID_HEADER

    from kvsched.adapters.ray.engine import _forward
    from kvsched.adapters.ray.requests import REQUEST_ID

    assert REQUEST_ID == SERVE_HTTP_REQUEST_ID_HEADER
    for sent, seen in (([(b"x-request-id", b"mine")], b"mine"), ([(b"x-request-id", b"a"), (b"x-request-id", b"b")],
                                                                  b"a"), ([], None)):
        handle = FakeHandle({"r0": {}}, "r0")
        assert generate(make_ingress({"w": handle}), sent)[0] == 200
        (_, _, (_, _, headers), _, _), = [c for c in handle.calls if c[0] == "remote"]
        assert _forward(headers).get("x-request-id") == seen


def test_a_request_id_past_the_limit_is_a_400_naming_it_and_goes_to_no_engine() -> None:
    """Found by review: neither Ray's proxy nor vLLM's server limits a header's size, and vLLM writes the request's id
    into every chunk it streams: a client's X-Request-Id of a MiB, sent on, came back a MiB a token."""
    from kvsched.adapters.ray.engine import _forward
    from kvsched.adapters.ray.requests import MAX_REQUEST_ID_BYTES

    for size in (MAX_REQUEST_ID_BYTES + 1, 2**20):
        handle = FakeHandle({"r0": {}}, "r0")
        status, body = generate(make_ingress({"w": handle}), [(b"x-request-id", b"r" * size)])
        assert status == 400 and body["error"]["param"] == "x-request-id", body
        assert f"{size} bytes" in body["error"]["message"] and handle.calls == []
    handle = FakeHandle({"r0": {}}, "r0")  # at the limit, in any bytes a header may hold: sent on as they came
    sent = ("é" * (MAX_REQUEST_ID_BYTES // 2)).encode()
    assert generate(make_ingress({"w": handle}), [(b"x-request-id", sent)])[0] == 200
    (_, _, (_, _, headers), _, _), = [c for c in handle.calls if c[0] == "remote"]
    assert _forward(headers)["x-request-id"] == sent
