"""Bad input a hostile but plausible client sends, each found by probing a real `vllm serve --scheduler kvsched`
(tests/integration/test_hostile_clients.py runs the same requests there): answered here over the fake vLLM of
test_middleware, no engine. Before the fixes each was served 200, silently taking a value the client did not mean."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from kvsched.adapters.vllm.request_fields import ResponseSessions, apply_session_fields, check_unhandled_body
from kvsched.core.sessions import InvalidSessionInput
from tests.adapters.vllm.test_middleware import FakeVllm, call

AUTH = ("Authorization", "Bearer secret")
JSON = ("Content-Type", "application/json")
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize("name, first, second", [
    ("X-Session-Id", "mine", "theirs"), ("X-Agent-Role", "worker", "critic"), ("X-Session-TTL", "5", "50"),
    ("X-Session-End", "0", "1"), ("X-KVSched-Compaction", "off", "summarize")])
def test_a_kvsched_header_sent_twice_with_different_values_is_a_400_naming_it(name, first, second):
    """Found by probing: two X-Session-Id headers (a proxy appending its own, a client library merging defaults) were
    served 200 under the first one, the second dropped unsaid. The same value twice is one value."""
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    base = [AUTH, JSON] + ([("X-Session-Id", "s")] if name not in ("X-Session-Id",) else [])
    status, body = call(mw, app, "POST", "/v1/chat/completions", CHAT, [*base, (name, first), (name, second)])
    assert status == 400 and body["error"]["param"] == name.lower(), body
    assert "more than once" in body["error"]["message"] and app.calls == []
    status, _ = call(mw, app, "POST", "/v1/chat/completions", CHAT, [*base, (name, first), (name, first)])
    assert status == 200


def test_the_admin_routes_refuse_two_different_salt_headers():
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    hdrs = [AUTH, ("X-KVSched-Cache-Salt", "a"), ("X-KVSched-Cache-Salt", "b")]
    for method, path in (("GET", "/kvsched/sessions"), ("DELETE", "/kvsched/sessions/s")):
        status, body = call(mw, app, method, path, headers=hdrs)
        assert status == 400 and body["error"]["param"] == "x-kvsched-cache-salt", body
    assert app.utility == []  # nothing reached the engine


def test_a_session_routes_session_header_twice_is_refused_too():
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    body = json.dumps({"token_ids": [1], "sampling_params": {}}).encode()
    status, err = call(mw, app, "POST", "/inference/v1/generate", body,
                       [AUTH, JSON, ("X-Session-Id", "a"), ("X-Session-Id", "b")])
    assert status == 400 and err["error"]["param"] == "x-session-id"


@pytest.mark.parametrize("value", ["maybe", "", [0], {"a": 1}, 2, 0.5, "nan"])
def test_kvsched_infer_of_the_wrong_type_or_value_is_refused_naming_it(value):
    """`vllm_xargs.kvsched_infer = 0` keeps a request out of session inference (README). Found by probing: "maybe",
    [0], 0.5 were served 200 and read by the engine as "infer"; now refused as a session end flag's values are."""
    payload = {"vllm_xargs": {"session_id": "s", compat.XARG_INFER: value}}
    with pytest.raises(InvalidSessionInput) as err:
        apply_session_fields(payload, {})
    assert err.value.field == f"vllm_xargs.{compat.XARG_INFER}"
    generate = {"token_ids": [1], "sampling_params": {"extra_args": {compat.XARG_INFER: value}}}
    with pytest.raises(InvalidSessionInput):
        check_unhandled_body(generate, {}, None, "/inference/v1/generate")


@pytest.mark.parametrize("value, infer", [(0, False), ("0", False), (False, False), ("false", False), ("no", False),
                                          (1, True), ("yes", True), (True, True), (None, True)])
def test_the_engine_reads_kvsched_infer_as_the_api_server_checks_it(value, infer):
    """Found by probing: "false" and "no" passed the check as flags but the engine read every value but 0, "0" and
    False as "infer": a client opting out with "false" was still joined to another conversation's session."""
    extra = {} if value is None else {compat.XARG_INFER: value}
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), cache_salt=None)
    assert compat.request_scope(request)[2] is infer
    if value is not None:
        assert apply_session_fields({"vllm_xargs": {compat.XARG_INFER: value}}, {}) in (True, False)


@pytest.mark.parametrize("request_id", [5, {"a": 1}, ["r"], True])
def test_a_responses_request_id_of_the_wrong_type_reaches_vllms_own_400(request_id):
    """Found by probing: with a session, a non-string `request_id` on /v1/responses was replaced by kvsched's own and
    served 200, where vLLM alone answers 400 ("Input should be a valid string")."""
    payload = {"model": "m", "input": "hi", "request_id": request_id, "session_id": "s"}
    responses = ResponseSessions()
    apply_session_fields(payload, {}, None, "/v1/responses", responses)
    assert payload["request_id"] == request_id and len(responses) == 0


def test_a_missing_or_empty_responses_request_id_is_still_given_one():
    for payload in ({"input": "hi", "session_id": "s"}, {"input": "hi", "session_id": "s", "request_id": None},
                    {"input": "hi", "session_id": "s", "request_id": ""}):
        responses = ResponseSessions()
        assert apply_session_fields(payload, {}, None, "/v1/responses", responses)
        assert payload["request_id"].startswith("resp_") and len(responses) == 1


def _delete(raw_path: bytes, decoded: str) -> tuple[int, dict]:
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    scope = {"type": "http", "method": "DELETE", "path": decoded, "raw_path": raw_path, "root_path": "",
             "query_string": b"", "app": app, "headers": [(b"authorization", b"Bearer secret")]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(mw(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_session_path_that_is_not_utf8_is_a_400_not_the_replacement_character():
    """Found by probing: uvicorn decodes `%ff` to U+FFFD, so DELETE /kvsched/sessions/%ff ended the session named
    "\ufffd" (a 404 naming it when none): another id than the client sent."""
    status, body = _delete(b"/kvsched/sessions/%ff", "/kvsched/sessions/\ufffd")
    assert status == 400 and body["error"]["param"] == "session_id" and "UTF-8" in body["error"]["message"]
    status, _ = _delete(b"/kvsched/sessions/%EF%BF%BD", "/kvsched/sessions/\ufffd")  # the character itself, sent right
    assert status == 404  # (this fake engine ends nothing)
