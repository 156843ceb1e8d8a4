"""A rewritten request that vLLM refuses, through kvsched's middleware (found by review: the request was answered HTTP
400 although the client sent nothing wrong; compaction turned off for its conversation only after a later probe). The
request is sent again as the client sent it, once; the client gets that answer."""

import json
from types import SimpleNamespace

from kvsched.adapters.vllm.http_io import read_body
from kvsched.adapters.vllm.middleware import KVSchedMiddleware
from kvsched.core.compaction_config import DEFAULT_SUMMARY_PREFIX
from tests.adapters.vllm.test_compaction import compactor, request
from tests.adapters.vllm.test_compaction_refusal import TEMPLATE_ERROR
from tests.adapters.vllm.test_middleware import call

OWN_ERROR = json.dumps({"error": {"message": "the image at messages[3] failed to load", "param": None}}).encode()


class TemplateVllm:
    """vLLM under a chat template that refuses the rewrite (a conversation holding kvsched's summary: HTTP 400 naming
    no parameter, as vLLM answers a template's exception) and, with `refuse_all`, the client's request as well."""

    def __init__(self, refuse_all=False):
        self.refuse_all = refuse_all
        self.bodies = []
        self.state = SimpleNamespace(args=SimpleNamespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X",
                                                          api_key=None))

    async def __call__(self, scope, receive, send):
        body = await read_body(scope, receive)
        payload = json.loads(body)
        assert int(dict(scope["headers"])[b"content-length"]) == len(body)
        self.bodies.append(payload)
        summary_call = payload["vllm_xargs"].get("kvsched_infer") == 0
        if any(DEFAULT_SUMMARY_PREFIX in str(m.get("content")) for m in payload["messages"]):
            status, out = 400, TEMPLATE_ERROR
        elif self.refuse_all and not summary_call:
            status, out = 400, OWN_ERROR
        else:
            status, out = 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": "a summary"},
                                                        "finish_reason": "stop"}]}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"json")]})
        await send({"type": "http.response.body", "body": out})


def served(refuse_all=False):
    app = TemplateVllm(refuse_all)
    mw = KVSchedMiddleware(app)
    mw.compaction = compactor(app, wait_for_summary=True)
    return app, mw


def post(mw, app, turns):
    return call(mw, app, "POST", "/v1/chat/completions", json.dumps(request(turns)).encode(),
                [("content-type", "application/json")])


def test_the_client_gets_the_answer_to_its_request_as_sent():
    app, mw = served()
    status, body = post(mw, app, 8)
    assert status == 200 and body["choices"][0]["message"]["content"] == "a summary"
    summary, rewritten, again = app.bodies  # the summary call, the rewrite (refused), the request as sent
    assert summary["vllm_xargs"] == {"kvsched_infer": 0} and "kvsched_compacted" in rewritten["vllm_xargs"]
    assert again["messages"] == request(8)["messages"] and "kvsched_compacted" not in again["vllm_xargs"]
    assert again["vllm_xargs"]["session_id"] == "wf/1"  # the session's turn, sent once to the engine
    stats = mw.compaction.stats()
    assert stats["rewrites_resent"] == 1 and stats["rewrites_refused"] == 1
    assert post(mw, app, 9)[0] == 200 and len(app.bodies) == 4  # the next turn goes as sent at once
    assert app.bodies[-1]["messages"] == request(9)["messages"]


def test_a_request_refused_as_sent_too_gets_the_originals_error():
    app, mw = served(refuse_all=True)
    status, body = post(mw, app, 8)
    assert status == 400 and body == json.loads(OWN_ERROR) and len(app.bodies) == 3
    stats = mw.compaction.stats()
    assert stats["rewrites_resent"] == 1 and stats["rewrites_refused"] == 0  # the client's own error: goes on
