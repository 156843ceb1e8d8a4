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
