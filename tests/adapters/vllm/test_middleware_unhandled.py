"""Routes kvsched does not rewrite (`middleware._unhandled`): what their bodies may carry and what checking costs."""

import json

import pytest

from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from tests.adapters.vllm.test_middleware import FakeVllm, call

JS = ("Content-Type", "application/json")
AUTH = ("Authorization", "Bearer secret")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_json_body_in_utf16_or_utf32_is_checked_too(encoding):
    """Found by review: the byte search that spares most bodies a parse only reads UTF-8, while vLLM's parser
    (`json.loads(bytes)`) reads UTF-16 and UTF-32 as well: a keyless caller's forged tenant or compaction mark, and an
    unvalidated session, reached the engine through /invocations. Such a body is always parsed and checked."""
    marked = {"messages": [], "vllm_xargs": {"session_id": "victim", "kvsched_tenant": "0123456789abcdef01234567"}}
    app = FakeVllm(keys=("secret", "other"))
    mw = KVSchedMiddleware(app)
    for route, headers in (("/invocations", [JS]), ("/v1/chat/completions/batch", [JS, AUTH]),
                           ("/v1/embeddings", [JS, AUTH])):
        status, err = call(mw, app, "POST", route, json.dumps(marked).encode(encoding), headers)
        assert status == 400 and err["error"]["param"] == "vllm_xargs.kvsched_tenant", (route, err)
    keyed = json.dumps({"token_ids": [1], "sampling_params": {"extra_args": {"session_id": "s"}}}).encode(encoding)
    status, err = call(mw, app, "POST", "/inference/v1/generate", keyed, [JS, AUTH])
    assert status == 400 and "per API key" in err["error"]["message"]
    open_app = FakeVllm(keys=())
    open_mw = KVSchedMiddleware(open_app)
    bad = json.dumps({"prompt": "x", "vllm_xargs": {"session_id": "s", "ttl_s": "nan"}}).encode(encoding)
    status, err = call(open_mw, open_app, "POST", "/invocations", bad, [JS])
    assert status == 400 and err["error"]["param"] == "vllm_xargs.ttl_s"
    assert app.calls == [] and open_app.calls == []
    fine = json.dumps({"input": "caf\u00e9"}).encode(encoding)  # nothing of kvsched's: passed on byte for byte
    assert call(mw, app, "POST", "/v1/embeddings", fine, [JS, AUTH])[0] == 200 and app.calls[-1][1] == fine


def test_bodies_on_paths_vllm_does_not_serve_are_not_read(monkeypatch):
    """Found by review: any non-GET request kvsched does not rewrite was buffered (up to 1 GiB) and, if it held the
    bytes `kvsched`, parsed and walked, keyless, even on a path vLLM has no route for. vLLM answers those 404/405
    without reading the body; kvsched now passes them on unread, and checks only what vLLM's routes will run."""
    from starlette.routing import Route

    from kvsched.adapters.vllm import middleware

    reads = []
    real = middleware.read_body
    monkeypatch.setattr(middleware, "read_body", lambda *a, **k: reads.append(a) or real(*a, **k))
    app = FakeVllm(keys=("secret",))
    app.routes = [Route(p, lambda r: None, methods=["POST"]) for p in ("/v1/embeddings", "/invocations")]
    mw = KVSchedMiddleware(app)
    marked = json.dumps({"input": "x", "vllm_xargs": {"kvsched_tenant": "t"}}).encode()
    for method, route in (("POST", "/no/such/route"), ("PUT", "/v1/embeddings"), ("DELETE", "/invocations")):
        call(mw, app, method, route, marked, [JS])
        assert app.calls[-1] == (route, marked) and reads == []  # vLLM's 404/405 (here: the fake's answer)
    status, err = call(mw, app, "POST", "/v1/embeddings", marked, [JS, AUTH])
    assert status == 400 and err["error"]["param"] == "vllm_xargs.kvsched_tenant" and len(reads) == 1
    status, err = call(mw, app, "POST", "/invocations", marked, [JS])  # vLLM serves it to anyone
    assert status == 400 and len(reads) == 2


def test_a_body_kvsched_must_parse_is_checked_at_any_size_vllm_takes():
    """Found by review: a body that had to be checked met the rewritten routes' 64 MiB and 1,000,000 objects and
    arrays (413), so whether a request was served depended on the words of its prompt ("kvsched", "session"). It is
    checked at any size vLLM takes: passed when it holds none of kvsched's fields, refused (400) when it does. A form's
    `vllm_xargs` fields keep their limits (no client sends megabytes of them)."""
    app = FakeVllm(keys=())
    mw = KVSchedMiddleware(app)
    big = b"x" * (64 * 2**20 + 1)
    clean = b'{"note": "kvsched", "input": "' + big + b'"}'
    assert call(mw, app, "POST", "/v1/embeddings", clean, [JS])[0] == 200 and app.calls[-1][1] == clean
    packed = b'{"note": "kvsched", "input": [' + b"{}," * 1_000_000 + b"{}]}"
    assert call(mw, app, "POST", "/v1/embeddings", packed, [JS])[0] == 200 and app.calls[-1][1] == packed
    marked = b'{"input": "' + big + b'", "vllm_xargs": {"kvsched_tenant": "t"}}'
    status, err = call(mw, app, "POST", "/v1/embeddings", marked, [JS])
    assert status == 400 and "kvsched_tenant" in err["error"]["message"] and app.calls[-1][1] == packed
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    xargs = b"vllm_xargs=" + b"[" + b"[]," * 299_999 + b"[]]"  # a field of under 1 MB: Starlette's own cap
    status, err = call(mw, app, "POST", "/v1/audio/transcriptions", b"&".join([b"model=m"] + [xargs] * 4), form)
    assert status == 413 and "vllm_xargs" in err["error"]["message"]


def test_escapes_that_cannot_spell_a_name_do_not_make_a_body_parsed():
    """Any non-ASCII text under `ensure_ascii` is `\\u`-escaped: only an escaped lowercase letter or `_` can hide a
    mark or a session field, so only those make a body parsed."""
    from kvsched.adapters.vllm.request_fields import needs_scan

    for text, scan in ((b"caf\\u00e9", False), (b"\\u003cb\\u003e \\u4e2d \\ud83d\\ude00", False),
                       (b"\\u006bvsched_tenant", True), (b"kvsched\\u005Ftenant", True), (b"\\u0073", True)):
        assert needs_scan(b'{"input": "' + text + b'"}', None, "/v1/embeddings") is scan, text


def test_the_check_walks_a_value_packed_body_without_a_step_or_an_allocation_per_element():
    """Found by review: the walk built a (value, "path[i]") tuple and string for every element at once (~130 bytes
    per body byte); the path is now built only for an error's message."""
    import tracemalloc

    from kvsched.adapters.vllm.request_fields import check_unhandled_body
    from kvsched.core.sessions import InvalidSessionInput

    payload = json.loads(b'{"input": [' + b"1," * 1_000_000 + b'{"a": [' + b"2.5," * 1_000_000 + b'"x"]}]}')
    tracemalloc.start()
    try:
        check_unhandled_body(payload, {}, "tenant", "/v1/embeddings")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    deep = {"a": [1, {"b": [{"vllm_xargs": {"kvsched_tenant": 1}}]}]}
    for body, field in ((deep, "a[1].b[0].vllm_xargs.kvsched_tenant"),
                        ([{"x": 1}, {"vllm_xargs": {"kvsched_compacted": 1}}], "[1].vllm_xargs.kvsched_compacted"),
                        ({"kvsched_conversation": 1}, "kvsched_conversation")):
        with pytest.raises(InvalidSessionInput) as info:
            check_unhandled_body(body, {}, None, "/v1/embeddings")
        assert info.value.field == field


def _form(fields):
    parts = [f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields]
    parts.append('--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n'
                 '\r\nRIFF....\r\n--b--\r\n')
    return "".join(parts).encode(), ("Content-Type", "multipart/form-data; boundary=b")


@pytest.mark.parametrize("route", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_the_audio_routes_session_fields_are_checked_as_on_other_session_routes(route):
    """Found by review: vLLM copies the audio routes' form field `vllm_xargs` into the request's extra args, where the
    scheduler reads a session, but those routes were not among the session routes: a keyed caller's session there was
    shared by every key, and a malformed one was dropped by the engine unannounced. vLLM reads neither a `session_id`
    field nor the X-Session-ID header there, so those stay the client's own business."""
    app = FakeVllm(keys=("secret", "other"))
    mw = KVSchedMiddleware(app)
    body, ctype = _form([("model", "m"), ("vllm_xargs", json.dumps({"session_id": "shared"}))])
    status, err = call(mw, app, "POST", route, body, [AUTH, ctype])
    assert status == 400 and "per API key" in err["error"]["message"] and app.calls == []
    plain, _ = _form([("model", "m"), ("vllm_xargs", json.dumps({"temperature_hint": 1})), ("session_id", "s")])
    assert call(mw, app, "POST", route, plain, [AUTH, ctype, ("X-Session-ID", "s")])[0] == 200
    open_app = FakeVllm(keys=())
    open_mw = KVSchedMiddleware(open_app)
    for xargs, param in (({"session_id": "x" * 500}, "vllm_xargs.session_id"),
                         ({"session_id": "s", "ttl_s": "nan"}, "vllm_xargs.ttl_s")):
        marked, _ = _form([("model", "m"), ("vllm_xargs", json.dumps(xargs))])
        status, err = call(open_mw, open_app, "POST", route, marked, [ctype])
        assert status == 400 and err["error"]["param"] == param, err
    fine, _ = _form([("model", "m"), ("vllm_xargs", json.dumps({"session_id": "s", "ttl_s": 30}))])
    assert call(open_mw, open_app, "POST", route, fine, [ctype, ("X-Session-ID", "\x01")])[0] == 200
    assert open_app.calls[-1][1] == fine


def test_a_non_ascii_session_header_is_refused_where_vllm_reads_it_as_latin1():
    """Found by review: on the session routes kvsched does not rewrite, X-Session-Id was checked as UTF-8 and passed
    on, while vLLM reads it as Latin-1: `café` named one session on /v1/chat/completions and another there, and an id
    whose Latin-1 reading holds a control character passed the check and was dropped by the engine. Refused there,
    naming the field that carries any id; on the four rewritten routes kvsched writes the UTF-8 reading itself."""
    app = FakeVllm(keys=())
    mw = KVSchedMiddleware(app)
    for sid in ("caf\u00e9", "\u0101-agent"):
        header = ("X-Session-Id", sid.encode())
        for route, body in (("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "x"}]]}),
                            ("/invocations", {"prompt": "x"}), ("/inference/v1/generate", {"token_ids": [1]})):
            status, err = call(mw, app, "POST", route, json.dumps(body).encode(), [JS, header])
            assert status == 400 and err["error"]["param"] == "X-Session-Id", err
            assert "vllm_xargs.session_id" in err["error"]["message"]
        chat = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        status, echo = call(mw, app, "POST", "/v1/chat/completions", chat, [JS, header])
        assert status == 200 and json.loads(echo["echo"])["vllm_xargs"]["session_id"] == sid
    assert call(mw, app, "POST", "/invocations", b'{"prompt": "x"}', [JS, ("X-Session-Id", b"cafe")])[0] == 200


def test_one_tenant_cannot_evict_anothers_response_ids():
    """Found by review: previous_response_id -> session was one LRU shared by every tenant, filled before vLLM checks
    the request: another key's stream of cheap (even invalid) /v1/responses requests pushed a tenant's entries out, and
    its next turn lost its session. A full table now evicts from the tenant holding the most entries."""
    from kvsched.adapters.vllm.request_fields import ResponseSessions, apply_session_fields

    responses = ResponseSessions(capacity=100)
    first = {"model": "m", "input": "hi", "prompt_cache_key": "a-conv"}
    apply_session_fields(first, {}, "tenantA", "/v1/responses", responses)
    for _ in range(1000):
        apply_session_fields({"model": "no-such-model", "input": "", "prompt_cache_key": "b"}, {}, "tenantB",
                             "/v1/responses", responses)
    follow = {"model": "m", "input": "more", "previous_response_id": first["request_id"]}
    apply_session_fields(follow, {}, "tenantA", "/v1/responses", responses)
    assert follow["vllm_xargs"]["session_id"] == "a-conv"
    assert len(responses) == 100
