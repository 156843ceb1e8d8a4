"""The API-server side, as pure functions: session field validation and the metrics splice."""

import pytest

from kvsched.adapters.vllm.metrics import render_metrics
from kvsched.adapters.vllm.middleware import append_metrics, apply_session_fields
from kvsched.core.sessions import InvalidSessionInput


def test_headers_are_copied_into_vllm_xargs():
    payload = {"messages": []}
    headers = {"x-session-id": "wf/1", "x-agent-role": "Orchestrator", "x-session-ttl": "2.5", "x-session-end": "1"}
    assert apply_session_fields(payload, headers) is True
    assert payload["vllm_xargs"] == {"session_id": "wf/1", "agent_role": "orchestrator", "ttl_s": 2.5,
                                     "session_end": 1}


def test_body_field_and_xargs_agree_or_fail():
    payload = {"session_id": "a", "vllm_xargs": {"session_id": "a", "other": 1}}
    assert apply_session_fields(payload, {}) is False  # nothing to add
    with pytest.raises(InvalidSessionInput, match="conflicting"):
        apply_session_fields({"session_id": "a"}, {"x-session-id": "b"})


def test_requests_without_a_session_are_untouched():
    payload = {"messages": [], "vllm_xargs": {"foo": 1}}
    assert apply_session_fields(payload, {}) is False and payload == {"messages": [], "vllm_xargs": {"foo": 1}}


def test_a_clients_own_compacted_mark_is_dropped():
    """Only kvsched's compaction marks a request as rewritten (the scheduler then ends the branch it left): a client
    sending the mark itself could otherwise end its session's other branch."""
    payload = {"messages": [], "vllm_xargs": {"session_id": "s", "kvsched_compacted": ["d"], "kvsched_conversation": "d"}}
    assert apply_session_fields(payload, {}) is True and payload["vllm_xargs"] == {"session_id": "s"}
    bare = {"messages": [], "vllm_xargs": {"kvsched_compacted": 1}}  # no session either
    assert apply_session_fields(bare, {}) is True and bare["vllm_xargs"] == {}


@pytest.mark.parametrize("payload, headers", [
    ({}, {"x-session-id": ""}),
    ({"vllm_xargs": {"session_id": 5}}, {}),
    ({}, {"x-session-id": "ok", "x-session-ttl": "-3"}),
    ({"vllm_xargs": {"ttl_s": 3}}, {}),  # a TTL without a session
])
def test_malformed_input_raises(payload, headers):
    with pytest.raises(InvalidSessionInput):
        apply_session_fields(payload, headers)


def test_metrics_are_spliced_before_openmetrics_eof():
    extra = render_metrics({"pinned_blocks": 3, "released_ttl": 2}, openmetrics=True)
    body = append_metrics(b"vllm:x 1\n# EOF\n", extra)
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    assert b"kvsched_pinned_blocks 3.0" in body and b'kvsched_pin_releases_total{reason="ttl"} 2.0' in body
    plain = append_metrics(b"vllm:x 1", render_metrics({"sessions_seen": 4}))
    assert b"vllm:x 1\n" in plain and b"kvsched_sessions_seen_total 4.0" in plain


# ---- the middleware as an ASGI app over a fake vLLM (no engine) ---------------------------------------------------
import asyncio  # noqa: E402
import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from kvsched.adapters.vllm.http_io import MAX_JSON_DEPTH, HttpError, parse_json, read_body, utf8_headers  # noqa: E402
from kvsched.adapters.vllm.middleware import KVSchedMiddleware  # noqa: E402
from kvsched.adapters.vllm.request_fields import ResponseSessions  # noqa: E402


class FakeVllm:
    """Answers like vLLM's auth middleware + a handler: 401 without the key, else 200 echoing the body it got."""

    def __init__(self, keys=("secret",)):
        self.keys = list(keys)
        self.calls = []
        self.utility = []

        async def call_utility_async(name, op, *args):
            self.utility.append((op, args))
            assert len(args) <= 1  # vLLM refuses more arguments than the scheduler's __call__(op, *args) names
            return {"ended": 0} if op.startswith("end") else {"sessions": [], "next_cursor": None, "total": 0}

        self.state = SimpleNamespace(args=SimpleNamespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X",
                                                          api_key=self.keys),
                                     engine_client=SimpleNamespace(engine_core=SimpleNamespace(
                                         call_utility_async=call_utility_async)))

    async def __call__(self, scope, receive, send):
        body = await read_body(scope, receive, limit=1 << 62)  # what vLLM itself takes is not bounded here
        headers = dict(scope["headers"])
        ok = not self.keys or headers.get(b"authorization") in [f"Bearer {k}".encode() for k in self.keys]
        self.calls.append((scope["path"], body))
        out = json.dumps({"error": "Unauthorized"} if not ok else {"echo": body.decode(errors="replace")}).encode()
        await send({"type": "http.response.start", "status": 200 if ok else 401, "headers": []})
        await send({"type": "http.response.body", "body": out})


def call(mw, app, method, path, body=b"", headers=(), chunks=None):
    path, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query.encode(), "app": app,
             "headers": [(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers]}
    parts = chunks or [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(mw(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


KV_HEADERS = [("X-Session-Id", "bad\u0001".encode()), ("X-KVSched-Compaction", "summarize"), ("X-Session-TTL", "x")]


def test_nothing_of_kvsched_runs_before_authentication():
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "session_id": "s"}).encode()
    for key in (None, "wrong"):
        auth = [("Authorization", f"Bearer {key}")] if key else []
        assert call(mw, app, "POST", "/v1/chat/completions", body, [*KV_HEADERS, *auth])[0] == 401  # vLLM's answer
        assert call(mw, app, "GET", "/kvsched/sessions", headers=auth)[0] == 401
        assert call(mw, app, "DELETE", "/kvsched/sessions/s", headers=auth)[0] == 401
        assert call(mw, app, "POST", "/v1/responses", b"[" * 100_000, auth)[0] == 401
    # passed on byte for byte, no engine call, no compaction
    assert all(b == body or b == b"[" * 100_000 for _, b in app.calls) and app.utility == []
    assert mw.compaction.stats()["summary_calls"] == 0 and mw.rejected == 0


def test_an_options_request_to_the_session_routes_goes_to_vllm_unauthenticated():
    """vLLM's authentication lets OPTIONS through (CORS preflights); kvsched answered its own routes' with 401."""
    app = FakeVllm(keys=("secret",))
    mw = KVSchedMiddleware(app)
    call(mw, app, "OPTIONS", "/kvsched/sessions")  # (this fake answers it as any request without the key)
    assert app.calls == [("/kvsched/sessions", b"")] and app.utility == []  # vLLM's to answer, not kvsched's 401


def test_with_the_key_kvsched_validates_and_writes_the_tenant():
    app = FakeVllm(keys=("secret", "other"))
    mw = KVSchedMiddleware(app)
    auth = ("Authorization", "Bearer secret")
    status, err = call(mw, app, "POST", "/v1/chat/completions", b'{"messages": []}', [KV_HEADERS[0], auth])
    assert status == 400 and err["error"]["param"] == "X-Session-Id"
    body = {"model": "m", "messages": [], "vllm_xargs": {"kvsched_tenant": "forged"}, "prompt_cache_key": "café"}
    status, echo = call(mw, app, "POST", "/v1/chat/completions", json.dumps(body).encode(), [auth])
    xargs = json.loads(echo["echo"])["vllm_xargs"]
    assert status == 200 and xargs["session_id"] == "café" and xargs["kvsched_tenant"] not in ("forged", "secret")
    _, echo2 = call(mw, app, "POST", "/v1/completions", b'{"prompt": "x"}', [("Authorization", "Bearer other")])
    assert json.loads(echo2["echo"])["vllm_xargs"]["kvsched_tenant"] != xargs["kvsched_tenant"]


def test_operator_policy_is_a_403_naming_the_setting():
    app = FakeVllm(keys=())
    mw = KVSchedMiddleware(app)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "session_id": "s"}).encode()
    status, err = call(mw, app, "POST", "/v1/chat/completions", body, [("X-KVSched-Compaction", "summarize")])
    assert status == 403 and "KVSCHED_COMPACTION_CLIENT_STRATEGIES" in err["error"]["message"]


def test_size_and_depth_limits():
    app = FakeVllm(keys=())
    mw = KVSchedMiddleware(app)
    deep = b"[" * 100_000
    assert call(mw, app, "POST", "/v1/chat/completions", deep)[0] == 400
    nested = json.dumps({"messages": [], "x": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)}).encode()
    assert call(mw, app, "POST", "/v1/chat/completions", nested)[0] == 400
    big = [("Content-Length", str(64 * 2**20 + 1))]
    status, err = call(mw, app, "POST", "/v1/chat/completions", b"{}", big)
    assert status == 413 and "over the limit" in err["error"]["message"]
    chunks = [b"x" * (16 * 2**20)] * 5  # no Content-Length: counted as it arrives
    assert call(mw, app, "POST", "/v1/completions", chunks=chunks)[0] == 413
    assert call(mw, app, "POST", "/v1/completions", b"not json")[0] == 200  # vLLM judges non-JSON itself
    many = b'{"messages": [' + b"{}," * 1_000_000 + b"{}]}"  # 3 MB, ~25x that once parsed
    status, err = call(mw, app, "POST", "/v1/chat/completions", many)
    assert status == 413 and "objects and arrays" in err["error"]["message"]
    ids = b"[" + b",".join(b"%d" % (i % 128_000) for i in range(65_536)) + b"]"  # token-id prompts: cheap to parse
    batch = b'{"prompt": [' + b",".join([ids] * 64) + b"]}"
    assert call(mw, app, "POST", "/v1/completions", batch)[0] == 200


def test_parse_json_and_headers():
    assert parse_json(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]} and parse_json(b"{nope") is None
    with pytest.raises(HttpError) as info:
        parse_json(b"[" * 5000 + b"]" * 5000)
    assert info.value.status == 400
    assert utf8_headers({"x-session-id": "café ☕".encode()}, ["x-session-id"]) == {"x-session-id": "café ☕"}
    with pytest.raises(HttpError) as info:
        utf8_headers({"x-session-id": b"\xff\xfe"}, ["x-session-id"])
    assert info.value.status == 400 and info.value.body["error"]["param"] == "x-session-id"

    async def receive():
        return {"type": "http.request", "body": b"12345", "more_body": False}

    with pytest.raises(HttpError):
        asyncio.run(read_body({"headers": []}, receive, limit=4))


def test_admin_routes_decode_the_path_once_and_scope_the_caller():
    app = FakeVllm(keys=("secret",))
    mw = KVSchedMiddleware(app)
    auth = [("Authorization", "Bearer secret"), ("X-KVSched-Cache-Salt", "pepper")]
    assert call(mw, app, "DELETE", "/kvsched/sessions/x%41", headers=auth)[0] == 404  # ASGI path: decoded once
    op, (packed,) = app.utility[-1]
    sid, caller = packed["kvsched_args"]
    assert op == "end" and sid == "x%41" and caller[0] is False and caller[2] == "pepper" and caller[3] is True
    assert call(mw, app, "GET", "/kvsched/sessions", headers=auth)[0] == 200
    assert call(mw, app, "PUT", "/kvsched/sessions", headers=auth)[0] == 405
    status, err = call(mw, app, "GET", "/kvsched/sessions?pinned_ids=2", headers=auth)  # a router's index query
    assert status == 400 and err["error"]["param"] == "pinned_ids"
    calls = len(app.utility)
    assert call(mw, app, "GET", "/kvsched/sessions?pinned_ids=1", headers=auth)[0] == 200
    assert app.utility[calls:] == [("list", app.utility[-1][1])] and app.utility[-1][1][0]["kvsched_args"][3] == \
        "pinned_ids"  # one engine call, no stats call


def test_previous_response_id_finds_the_session_of_this_tenant_only():
    responses = ResponseSessions(capacity=2)
    first = {"input": "hi", "prompt_cache_key": "conv-1"}
    assert apply_session_fields(first, {}, "t1", "/v1/responses", responses)
    rid = first["request_id"]
    assert rid.startswith("resp_")
    follow = {"input": "more", "previous_response_id": rid}
    apply_session_fields(follow, {}, "t1", "/v1/responses", responses)
    assert follow["vllm_xargs"]["session_id"] == "conv-1"
    stranger = {"input": "more", "previous_response_id": rid}
    apply_session_fields(stranger, {}, "t2", "/v1/responses", responses)
    assert "session_id" not in stranger.get("vllm_xargs", {})
    for i in range(3):  # bounded, oldest first
        responses.put("t1", None, f"r{i}", "s")
    assert responses.get("t1", None, rid) is None


def test_routes_kvsched_does_not_rewrite_refuse_its_marks_and_keyed_sessions():
    """vLLM hands the `vllm_xargs`/`extra_args` of other routes to the engine as they are: a forged tenant would reach
    another key's sessions, a forged compaction mark would end a branch; a keyed caller's session id there would be
    shared with every other key (nothing scopes it). All refused with a 400 naming the field; the rest passes."""
    app = FakeVllm(keys=("secret", "other"))
    mw = KVSchedMiddleware(app)
    auth, js = ("Authorization", "Bearer secret"), ("Content-Type", "application/json")
    batch = {"messages": [[{"role": "user", "content": "x"}]], "vllm_xargs": {"kvsched_tenant": "t-of-other"}}
    status, err = call(mw, app, "POST", "/v1/chat/completions/batch", json.dumps(batch).encode(), [auth, js])
    assert status == 400 and err["error"]["param"] == "vllm_xargs.kvsched_tenant"
    invocation = {"messages": [], "vllm_xargs": {"kvsched_compacted": 1}}  # vLLM checks no key on /invocations
    status, err = call(mw, app, "POST", "/invocations", json.dumps(invocation).encode(), [js])
    assert status == 400 and "kvsched's middleware only" in err["error"]["message"]
    generate = {"token_ids": [1, 2], "sampling_params": {"extra_args": {"session_id": "s"}}}
    status, err = call(mw, app, "POST", "/inference/v1/generate", json.dumps(generate).encode(), [auth, js])
    assert status == 400 and "per API key" in err["error"]["message"]
    bare = json.dumps({"token_ids": [1, 2]}).encode()
    status, err = call(mw, app, "POST", "/inference/v1/generate", bare, [auth, js, ("X-Session-ID", "s")])
    assert status == 400 and err["error"]["param"] == "session_id"
    assert mw.rejected == 4 and app.calls == []
    # allowed: no session, or no keys on the server (one tenant); a key's absence on a guarded path is vLLM's 401
    assert call(mw, app, "POST", "/inference/v1/generate", bare, [auth, js]) == (200, {"echo": bare.decode()})
    forged = json.dumps(batch).encode()
    assert call(mw, app, "POST", "/v1/chat/completions/batch", forged, [js])[0] == 401
    assert call(mw, app, "POST", "/v1/audio/transcriptions", forged, [auth])[0] == 200  # not JSON to vLLM either
    # found by review: a top-level session_id names a session too (vLLM's `_get_session_id` reads it first)
    status, err = call(mw, app, "POST", "/invocations", json.dumps({"messages": [], "session_id": "s"}).encode(),
                       [auth, js])
    assert status == 400 and err["error"]["param"] == "session_id"
    # a form's vllm_xargs reaches the engine too (the audio routes): its marks are refused as in JSON
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    marked = b"model=m&vllm_xargs=" + b'{"kvsched\\u005ftenant": "t"}'.replace(b'"', b"%22").replace(b" ", b"+")
    status, err = call(mw, app, "POST", "/v1/audio/transcriptions", marked, [auth, *form])
    assert status == 400 and err["error"]["param"] == "vllm_xargs.kvsched_tenant", err
    deep = b"model=m&vllm_xargs=" + b"%5B" * 100_000  # nested past json's recursion limit: vLLM's to refuse
    assert call(mw, app, "POST", "/v1/audio/transcriptions", deep, [auth, *form])[0] == 200
    plain = b"model=m&vllm_xargs=%7B%7D"
    assert call(mw, app, "POST", "/v1/audio/transcriptions", plain, [auth, *form]) == (200, {"echo": plain.decode()})
    # the X-Session-ID header only matters where vLLM reads it: an SDK sending it everywhere still embeds
    body = json.dumps({"input": "x"}).encode()
    assert call(mw, app, "POST", "/v1/embeddings", body, [auth, js, ("X-Session-ID", "s")])[0] == 200
    for route in ("/v1/messages/count_tokens", "/v1/chat/completions/render", "/inference/v1/abort_requests"):
        assert call(mw, app, "POST", route, body, [auth, js, ("X-Session-ID", "s")])[0] == 200  # run nothing
    open_app = FakeVllm(keys=())
    status, _ = call(KVSchedMiddleware(open_app), open_app, "POST", "/inference/v1/generate",
                     json.dumps(generate).encode(), [js])
    assert status == 200 and open_app.calls == [("/inference/v1/generate", json.dumps(generate).encode())]
    # found by review: without keys, a malformed session field there was answered 200 and the engine dropped the
    # session silently; it is refused as on the four rewritten routes, naming the field
    open_mw = KVSchedMiddleware(open_app)
    for body, headers, param in (
            ({"prompt": "x", "vllm_xargs": {"session_id": "inv", "ttl_s": "nan"}}, [], "vllm_xargs.ttl_s"),
            ({"prompt": "x", "vllm_xargs": {"session_id": "a\u0007"}}, [], "vllm_xargs.session_id"),
            ({"prompt": "x", "session_id": "s", "vllm_xargs": {"agent_role": "a b"}}, [], "vllm_xargs.agent_role"),
            ({"prompt": "x", "session_id": 5}, [], "session_id"),
            ({"prompt": "x"}, [("X-Session-ID", "x" * 500)], "X-Session-Id"),
            ({"token_ids": [1], "sampling_params": {"extra_args": {"session_id": "s", "session_end": "maybe"}}}, [],
             "sampling_params.extra_args.session_end")):
        route = "/inference/v1/generate" if "token_ids" in body else "/invocations"
        status, err = call(open_mw, open_app, "POST", route, json.dumps(body).encode(), [js, *headers])
        assert status == 400 and err["error"]["param"] == param, (body, err)
    fine = json.dumps({"prompt": "x", "vllm_xargs": {"session_id": "inv", "ttl_s": "30"}}).encode()
    assert call(open_mw, open_app, "POST", "/invocations", fine, [js, ("X-Session-ID", "inv")])[0] == 200
    # only where the engine reads them (found by review: a JSON schema's `extra_args` property was refused)
    schema = {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "properties": {"extra_args": {"session_id": {"type": "string"}}}}}}}
    assert call(open_mw, open_app, "POST", "/invocations", json.dumps(schema).encode(), [js])[0] == 200
    from kvsched.adapters.vllm.request_fields import needs_scan

    big = json.dumps({"input": ["x" * 1000] * 100}).encode()  # an embedding request: parsed by vLLM alone
    assert not needs_scan(big, None, "/invocations") and needs_scan(big, None, "/invocations", session_header=True)
    assert needs_scan(big, "tenant", "/invocations") and needs_scan(fine, None, "/invocations")


def test_response_ids_and_salts_of_any_length_cost_one_fixed_size_entry():
    """The client picks `/v1/responses`' request_id and cache_salt: the table keeps digests of them, so a 1 MB id
    costs what a short one does, and still finds its session (and only under its own salt)."""
    responses = ResponseSessions(capacity=4)
    rid, salt = "r" * 2**20, "s" * 2**20
    body = {"input": "hi", "prompt_cache_key": "conv", "request_id": rid, "cache_salt": salt}
    apply_session_fields(body, {}, "t1", "/v1/responses", responses)
    assert responses.get("t1", salt, rid) == "conv" and responses.get("t1", None, rid) is None
    assert responses.get("t1", salt + "x", rid) is None
    (key,) = responses._maps["t1"]
    assert sum(len(part or "") for part in key) < 100


def test_bad_session_input_is_a_400_not_a_500():
    """Each of these raised inside the middleware (a 500) or reached the engine, which dropped the session."""
    app = FakeVllm(keys=())
    mw = KVSchedMiddleware(app)
    for fields in ({"session_id": "s", "vllm_xargs": {"ttl_s": 10**400}}, {"prompt_cache_retention": ["24h"]},
                   {"session_id": "s", "vllm_xargs": {"agent_role": "\u0130"}}, {"session_id": "a\ud800"}):
        body = json.dumps({"model": "m", "messages": [], **fields}).encode()
        status, err = call(mw, app, "POST", "/v1/chat/completions", body)
        assert status == 400 and err["error"]["message"] and err["error"]["param"]
    assert app.calls == []


def test_bodies_that_cannot_hold_kvsched_fields_are_not_parsed_twice(monkeypatch):
    """Found by review: every JSON body on a route kvsched does not rewrite (embeddings: up to 1 GiB) was parsed here
    and again by vLLM. Only a body that spells a mark out or escapes characters is still read."""
    from kvsched.adapters.vllm import middleware

    parsed = []
    real = middleware.parse_json
    monkeypatch.setattr(middleware, "parse_json", lambda body, *a: parsed.append(body) or real(body, *a))
    app = FakeVllm(keys=("secret", "other"))
    mw = KVSchedMiddleware(app)
    auth, js = ("Authorization", "Bearer secret"), ("Content-Type", "application/json")
    plain = json.dumps({"input": ["x" * 1000] * 100, "vllm_xargs": {"priority_hint": 1}}).encode()
    assert call(mw, app, "POST", "/v1/embeddings", plain, [auth, js]) == (200, {"echo": plain.decode()})
    assert parsed == []
    escaped = b'{"input": "x", "vllm_xargs": {"\\u006bvsched_tenant": "t"}}'
    status, err = call(mw, app, "POST", "/v1/embeddings", escaped, [auth, js])
    assert status == 400 and err["error"]["param"] == "vllm_xargs.kvsched_tenant" and parsed == [escaped]
    named = json.dumps({"token_ids": [1], "session_id": "s"}).encode()  # a keyed session route is always read
    assert call(mw, app, "POST", "/inference/v1/generate", named, [auth, js])[0] == 400


def test_any_salt_a_body_may_carry_can_be_named_base64_encoded():
    """Found by review: a salt with edge spaces (a header's are stripped), over 1,024 characters or with characters a
    header cannot carry left its owner unable to list or end its own sessions."""
    import base64

    app = FakeVllm(keys=("secret",))
    mw = KVSchedMiddleware(app)
    for salt in (" padded ", "s" * 5000, "line\nbreak", "caf\u00e9"):
        b64 = base64.b64encode(salt.encode()).decode()
        auth = [("Authorization", "Bearer secret"), ("X-KVSched-Cache-Salt-B64", b64)]
        assert call(mw, app, "DELETE", "/kvsched/sessions/x", headers=auth)[0] == 404
        sid, caller = app.utility[-1][1][0]["kvsched_args"]
        assert caller[2] == salt and caller[3] is True
    auth = [("Authorization", "Bearer secret")]
    for headers, param in (([("X-KVSched-Cache-Salt-B64", "%%%")], "x-kvsched-cache-salt-b64"),
                           ([("X-KVSched-Cache-Salt-B64", "7aCA")], "x-kvsched-cache-salt-b64"),  # a lone surrogate
                           ([("X-KVSched-Cache-Salt-B64", "")], "x-kvsched-cache-salt-b64"),
                           ([("X-KVSched-Cache-Salt-B64", "YQ=="), ("X-KVSched-Cache-Salt", "a")], "x-kvsched-cache-salt")):
        status, err = call(mw, app, "GET", "/kvsched/sessions", headers=auth + headers)
        assert status == 400 and err["error"]["param"] == param, err


def test_payback_releases_are_exported():
    """Found by review: releases for reason `payback` (the fallback to LRU) were left out of the release metrics."""
    from kvsched.adapters.vllm.metrics import render_metrics

    text = render_metrics({"released_payback": 3, "released_blocks_payback": 12}).decode()
    # the values, not only the label: every reason is always rendered, with 0 when the stats lack it
    assert 'kvsched_pin_releases_total{reason="payback"} 3.0' in text
    assert 'kvsched_pin_released_blocks_total{reason="payback"} 12.0' in text
    assert 'kvsched_pin_releases_total{reason="ttl"} 0.0' in text
