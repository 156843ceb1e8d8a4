"""A rewritten request that vLLM refuses (found by review, /tmp/rev_compaction/p5_template.py: a chat template that
does not take the rewrite answers HTTP 400, and since the checkpoint stayed every later turn failed): the refusal is
counted, the conversation's checkpoints go (here and in the shared store) and it is served as sent from then on, once
vLLM has taken its next turn as sent: a client's own bad request is refused with no parameter named too (found by review
of this fix: an unsupported schema, `tool_choice` without tools, an image that fails to load turned compaction off)."""

import asyncio
import json

import pytest

from kvsched.adapters.vllm.compaction_outcome import rewrite_refused
from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run
from tests.adapters.vllm.test_compaction_guards import Shared

TEMPLATE_ERROR = json.dumps({"error": {
    "message": "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...",
    "type": "BadRequestError", "param": None, "code": 400}}).encode()
LENGTH_ERROR = json.dumps({"error": {"message": "This model's maximum context length is 4096 tokens. However, ...",
                                     "type": "BadRequestError", "param": "input_tokens", "code": 400}}).encode()
PARAM_ERROR = json.dumps({"error": {"message": "temperature must be >= 0", "type": "BadRequestError",
                                    "param": "temperature", "code": 400}}).encode()


async def answer(outcome, status, body):
    """vLLM's answer to the (rewritten) request, through the middleware's `send` wrapper, in two body chunks."""
    sent = []

    async def send(message):
        sent.append(message)

    wrapped = outcome.wrap(send)
    await wrapped({"type": "http.response.start", "status": status, "headers": []})
    await wrapped({"type": "http.response.body", "body": body[:7], "more_body": True})
    await wrapped({"type": "http.response.body", "body": body[7:]})
    return sent


def compacted_session(comp):
    """A session served compacted: its first request waits for the summary and is rewritten."""
    out = run(comp.prepare(SCOPE, request(8), {}))
    assert out.replaced > 0 and len(comp.store.checkpoints(next(iter(comp.store.sessions)))) == 1
    return out


def test_a_refused_rewrite_serves_its_conversation_as_sent_from_then_on():
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    comp.shared = shared = Shared()
    out = compacted_session(comp)
    sent = run(answer(out, 400, TEMPLATE_ERROR))
    assert sent[0]["status"] == 400 and b"".join(m.get("body", b"") for m in sent[1:]) == TEMPLATE_ERROR
    key = next(iter(comp.store.sessions))
    assert len(comp.store.checkpoints(key)) == 1 and comp.stats()["rewrites_refused"] == 0  # not yet: a probe
    probe = request(9)
    out = run(comp.prepare(SCOPE, probe, {}))
    assert out.replaced == 0 and probe["messages"] == request(9)["messages"]  # the next turn goes as sent
    run(answer(out, 200, b"{}"))  # and vLLM takes it: the rewrite was the cause
    assert comp.store.checkpoints(key) == [] and comp.stats()["rewrites_refused"] == 1
    assert ("save", 0) in shared.writes  # the dropped checkpoint leaves the shared store too
    for turns in (9, 12, 20):  # past the trigger every time: served as sent, never summarised again
        payload = request(turns)
        later = run(comp.prepare(SCOPE, payload, {}))
        assert later.replaced == 0 and payload["messages"] == request(turns)["messages"]
    assert len(app.calls) == 1
    other = request(9, session="wf/2")  # other sessions are not affected
    assert run(comp.prepare(SCOPE, other, {})).replaced > 0
    assert "kvsched_compaction_rewrites_refused_total 1.0" in comp.render_metrics().decode()


@pytest.mark.parametrize("status, body", [(400, LENGTH_ERROR), (400, PARAM_ERROR), (401, TEMPLATE_ERROR),
                                          (500, TEMPLATE_ERROR), (200, b"{}")])
def test_errors_that_are_not_the_rewrites_fault_keep_compaction(status, body):
    comp = compactor(FakeVllm(), wait_for_summary=True)
    run(answer(compacted_session(comp), status, body))
    assert comp.stats()["rewrites_refused"] == 0 and run(comp.prepare(SCOPE, request(9), {})).replaced > 0


def test_a_refusal_whose_turn_is_refused_as_sent_too_keeps_compaction():
    """The client's own request was the cause: the probe, served as sent, is refused as well, so rewrites go on."""
    comp = compactor(FakeVllm(), wait_for_summary=True)
    run(answer(compacted_session(comp), 400, TEMPLATE_ERROR))
    probe = run(comp.prepare(SCOPE, request(9), {}))
    assert probe.replaced == 0
    run(answer(probe, 400, TEMPLATE_ERROR))
    assert comp.stats()["rewrites_refused"] == 0 and run(comp.prepare(SCOPE, request(10), {})).replaced > 0


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
