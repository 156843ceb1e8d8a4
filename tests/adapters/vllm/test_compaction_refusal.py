"""A rewritten request that vLLM refuses (found by review, /tmp/rev_compaction/p5_template.py: a chat template that
does not take the rewrite answers HTTP 400, and since the checkpoint stayed every later turn failed): the request is
sent again as the client sent it and the client gets that answer (found by review: the refused request itself still
failed); if vLLM takes it, the refusal is counted, the conversation's checkpoints go (here and in the shared store) and
it is served as sent from then on: a client's own bad request is refused with no parameter named too (found by review
of this fix: an unsupported schema, `tool_choice` without tools, an image that fails to load turned compaction off)."""

import asyncio
import json

import pytest

from kvsched.adapters.vllm.compaction_outcome import MAX_ERROR_BODY, rewrite_refused
from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run
from tests.adapters.vllm.test_compaction_guards import Shared

TEMPLATE_ERROR = json.dumps({"error": {
    "message": "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...",
    "type": "BadRequestError", "param": None, "code": 400}}).encode()
LENGTH_ERROR = json.dumps({"error": {"message": "This model's maximum context length is 4096 tokens. However, ...",
                                     "type": "BadRequestError", "param": "input_tokens", "code": 400}}).encode()
PARAM_ERROR = json.dumps({"error": {"message": "temperature must be >= 0", "type": "BadRequestError",
                                    "param": "temperature", "code": 400}}).encode()


async def answer(outcome, status, body, resent=(200, b"{}"), payload=None):
    """vLLM's answers through `Outcome.forward`, each in two body chunks: (`status`, `body`) to the request as prepared,
    `resent` to the request sent again, if it is. Returns (what the client got, the requests vLLM was sent)."""
    answers = [(status, body), resent]
    seen = []

    async def vllm(scope, receive, send):
        message = await receive()
        seen.append((dict(scope["headers"]), message["body"]))
        code, text = answers.pop(0)
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": text[:7], "more_body": True})
        await send({"type": "http.response.body", "body": text[7:]})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    data = json.dumps(payload or {}).encode()
    await outcome.forward(vllm, {"type": "http", "headers": [(b"content-length", str(len(data)).encode())]}, data,
                          receive, send)
    return sent, seen


def got(sent):
    """(status, body) as the client got them: one response."""
    assert [m["type"] for m in sent].count("http.response.start") == 1
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def compacted_session(comp, payload=None):
    """A session served compacted: its first request waits for the summary and is rewritten."""
    out = run(comp.prepare(SCOPE, payload or request(8), {}))
    assert out.replaced > 0 and len(comp.store.checkpoints(next(iter(comp.store.sessions)))) == 1
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_rewrite_is_sent_again_as_sent_and_its_conversation_served_as_sent_from_then_on(stream):
    """Found by review: the refused request itself failed to the client. vLLM refuses a template's or length check's
    error before any response header, also for `stream: true` (a JSON error): the request is sent again as sent."""
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    comp.shared = shared = Shared()
    payload = request(8, stream=stream)
    out = compacted_session(comp, payload)
    sent, seen = run(answer(out, 400, TEMPLATE_ERROR, resent=(200, b'{"id": "x"}'), payload=payload))
    assert got(sent) == (200, b'{"id": "x"}')  # the client never sees the refusal
    assert not any(k == b"x-kvsched-compacted" for k, _ in sent[0]["headers"])  # that answer is not compacted
    (_, rewritten), (headers, again) = seen
    again = json.loads(again)
    assert json.loads(rewritten)["messages"] != request(8)["messages"]
    assert again["messages"] == request(8)["messages"] and again["stream"] is stream  # as the client sent it,
    assert set(again["vllm_xargs"]) == {"session_id", "kvsched_conversation"}  # no compacted mark: a turn as sent
    assert headers[b"content-length"] == str(len(seen[1][1])).encode()
    key = next(iter(comp.store.sessions))
    assert comp.store.checkpoints(key) == [] and comp.stats()["rewrites_refused"] == 1  # vLLM took it: the rewrite
    assert comp.stats()["rewrites_resent"] == 1 and ("save", 0) in shared.writes  # was the cause, here and shared
    for turns in (9, 12, 20):  # past the trigger every time: served as sent, never summarised again
        payload = request(turns)
        later = run(comp.prepare(SCOPE, payload, {}))
        assert later.replaced == 0 and payload["messages"] == request(turns)["messages"]
    assert len(app.calls) == 1
    other = request(9, session="wf/2")  # other sessions are not affected
    assert run(comp.prepare(SCOPE, other, {})).replaced > 0
    text = comp.render_metrics().decode()
    assert "kvsched_compaction_rewrites_refused_total 1.0" in text
    assert "kvsched_compaction_rewrites_resent_total 1.0" in text


@pytest.mark.parametrize("status, body", [(400, LENGTH_ERROR), (400, PARAM_ERROR), (401, TEMPLATE_ERROR),
                                          (500, TEMPLATE_ERROR), (200, b"{}")])
def test_errors_that_are_not_the_rewrites_fault_reach_the_client_and_keep_compaction(status, body):
    comp = compactor(FakeVllm(), wait_for_summary=True)
    sent, seen = run(answer(compacted_session(comp), status, body))
    assert got(sent) == (status, body) and len(seen) == 1  # not sent again
    assert comp.stats()["rewrites_refused"] == comp.stats()["rewrites_resent"] == 0
    assert run(comp.prepare(SCOPE, request(9), {})).replaced > 0


def test_a_request_refused_as_sent_too_gets_its_own_error_and_keeps_compaction():
    """The client's own request was the cause: sent again as sent, it is refused too; the client gets that error (the
    original's), and rewrites go on."""
    comp = compactor(FakeVllm(), wait_for_summary=True)
    own = json.dumps({"error": {"message": "bad image", "param": None}}).encode()
    sent, seen = run(answer(compacted_session(comp), 400, TEMPLATE_ERROR, resent=(400, own)))
    assert got(sent) == (400, own) and len(seen) == 2
    assert comp.stats()["rewrites_refused"] == 0 and comp.stats()["rewrites_resent"] == 1
    assert run(comp.prepare(SCOPE, request(10), {})).replaced > 0


def test_a_server_error_to_the_request_sent_again_leaves_the_next_turn_to_tell():
    comp = compactor(FakeVllm(), wait_for_summary=True)
    sent, _ = run(answer(compacted_session(comp), 400, TEMPLATE_ERROR, resent=(503, b"{}")))
    assert got(sent) == (503, b"{}") and comp.stats()["rewrites_refused"] == 0
    probe = request(9)
    out = run(comp.prepare(SCOPE, probe, {}))
    assert out.replaced == 0 and probe["messages"] == request(9)["messages"]  # a probe: served as sent
    sent, seen = run(answer(out, 200, b"{}"))
    assert got(sent) == (200, b"{}") and len(seen) == 1 and comp.stats()["rewrites_refused"] == 1


def test_a_started_response_is_never_sent_again():
    """A stream that began (200, event stream) and then reports an error is the client's: never held, never resent."""
    comp = compactor(FakeVllm(), wait_for_summary=True)
    sent, seen = run(answer(compacted_session(comp), 200, b'data: {"error": {"code": 400}}\n\n'))
    assert sent[0]["status"] == 200 and len(seen) == 1 and comp.stats()["rewrites_resent"] == 0


def test_an_error_body_too_long_to_hold_goes_on_as_it_comes():
    comp = compactor(FakeVllm(), wait_for_summary=True)
    big = json.dumps({"error": {"message": "x" * (MAX_ERROR_BODY + 10)}}).encode()
    sent, seen = run(answer(compacted_session(comp), 400, big))
    assert got(sent) == (400, big) and len(seen) == 1 and comp.stats()["rewrites_resent"] == 0


def test_what_counts_as_the_rewrites_fault():
    assert rewrite_refused(400, TEMPLATE_ERROR) and rewrite_refused(422, b"not json")
    assert rewrite_refused(400, json.dumps({"error": {"message": "bad", "param": "messages"}}).encode())
    assert not rewrite_refused(400, LENGTH_ERROR) and not rewrite_refused(400, PARAM_ERROR)
    assert not rewrite_refused(404, TEMPLATE_ERROR) and not rewrite_refused(429, TEMPLATE_ERROR)


def test_a_summary_landing_after_the_refusal_is_dropped():
    app = FakeVllm("slow")
    comp = compactor(app)

    async def scenario():
        first = await comp.prepare(SCOPE, request(8), {})  # starts the background summary
        assert first.replaced == 0
        key = next(iter(comp.store.sessions))
        root = next(iter(comp.store.sessions[key].pending))
        comp._refused(key, root, 400)  # e.g. a window of the same conversation was refused meanwhile,
        comp._probed(key, root, 200)  # and its next turn taken as sent
        app.release.set()
        await asyncio.gather(*comp.tasks.values())
        return key

    key = run(scenario())
    assert comp.store.checkpoints(key) == [] and comp.stats()["summaries_dropped"] == 1
