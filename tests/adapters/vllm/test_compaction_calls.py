"""What the summary call sends and keeps (suspected by review, confirmed): the session's template arguments go along,
a reasoning model's `<think>` block is never stored as the summary, and a summary cut off at max_tokens is counted."""

import json

import pytest

from kvsched.adapters.vllm.compaction_calls import strip_reasoning
from tests.adapters.vllm.test_compaction import SCOPE, compactor, request, run


class Model:
    """Answers every chat completion with `content` and `finish_reason`; records the bodies it was sent."""

    def __init__(self, content="the summary", finish_reason="stop"):
        self.content, self.finish_reason, self.bodies = content, finish_reason, []

    async def __call__(self, scope, receive, send):
        self.bodies.append(json.loads((await receive())["body"]))
        body = {"choices": [{"message": {"role": "assistant", "content": self.content},
                             "finish_reason": self.finish_reason}]}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def summarised(model, **extra):
    comp = compactor(model, wait_for_summary=True)
    payload = request(8, **extra)
    out = run(comp.prepare(SCOPE, payload, {}))
    return comp, out, payload


@pytest.mark.parametrize("text, kept", [
    ("<think>let me see</think>\n\nthe summary", "\n\nthe summary"),
    ("  <think>a\nb</think>the summary", "the summary"),
    ("reasoning the template opened</think>the summary", "the summary"),
    ("<think>thinking until max_tokens ran out", ""),
    ("the summary, no reasoning", "the summary, no reasoning"),
])
def test_reasoning_is_stripped(text, kept):
    assert strip_reasoning(text) == kept


def test_a_reasoning_models_thoughts_are_not_the_summary():
    comp, out, payload = summarised(Model("<think>The user wants a summary. Let me list...</think>\nFacts: A, B."))
    assert out.replaced > 0 and payload["messages"][0]["content"].endswith("Facts: A, B.")
    assert "<think>" not in payload["messages"][0]["content"]
    comp, out, _ = summarised(Model("<think>The user wants a summary, so", finish_reason="length"))
    assert out.replaced == 0 and comp.stats()["failed_empty"] == 1 and comp.stats()["summaries"] == 0


def test_the_summary_call_is_rendered_like_the_sessions_requests():
    model = Model()
    kwargs = {"enable_thinking": False}
    summarised(model, chat_template_kwargs=kwargs, chat_template="{{ messages }}", cache_salt="t")
    (body,) = model.bodies
    assert body["chat_template_kwargs"] == kwargs and body["chat_template"] == "{{ messages }}"
    assert body["cache_salt"] == "t"
    bare = Model()
    summarised(bare)
    assert "chat_template_kwargs" not in bare.bodies[0] and "chat_template" not in bare.bodies[0]


def test_a_summary_cut_off_at_max_tokens_is_kept_counted_and_logged_once(caplog):
    model = Model("Facts: A, B, and then", finish_reason="length")
    comp = compactor(model, wait_for_summary=True)
    for session in ("a", "b"):
        assert run(comp.prepare(SCOPE, request(8, session=session), {})).replaced > 0
    assert comp.stats()["summaries_truncated"] == 2 and comp.stats()["summaries"] == 2
    assert sum("cut short" in r.getMessage() for r in caplog.records) == 1
    assert "kvsched_compaction_summaries_truncated_total 2.0" in comp.render_metrics().decode()


TOOLS = [{"type": "function", "function": {"name": "search", "description": "search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def tool_loop(turns):
    """An agent's session: one task, then tool calls and their results."""
    payload = request(0, tools=TOOLS, tool_choice="auto")
    msgs = payload["messages"][:1] + [{"role": "user", "content": "find the facts"}]
    for i in range(turns):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "search", "arguments": json.dumps({"q": f"query {i}"})}}
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": f"c{i}", "content": f"result {i} with many words in it"}]
    payload["messages"] = msgs
    return payload


class ToolTemplate(Model):
    """A model whose chat template renders tool calls only against the request's tools (HTTP 400 otherwise)."""

    async def __call__(self, scope, receive, send):
        message = await receive()
        body = json.loads(message["body"])
        names = {t["function"]["name"] for t in body.get("tools") or []}
        if any(c["function"]["name"] not in names for m in body["messages"] for c in m.get("tool_calls") or []):
            self.bodies.append(body)
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "unknown tool"}}'})
            return

        async def again():
            return message

        await super().__call__(scope, again, send)


def test_a_tool_using_sessions_summary_call_carries_its_tools_and_answers_in_text():
    model = ToolTemplate()
    comp = compactor(model, wait_for_summary=True)
    payload = tool_loop(6)
    out = run(comp.prepare(SCOPE, payload, {}))
    assert out.replaced > 0 and comp.stats()["summaries"] == 1 and comp.stats()["failed_error"] == 0
    (body,) = model.bodies
    assert body["tools"] == TOOLS and body["tool_choice"] == "none"  # rendered as the session's, answered in text
    assert any(m.get("tool_calls") for m in body["messages"])
    bare = Model()
    summarised(bare)
    assert "tools" not in bare.bodies[0] and "tool_choice" not in bare.bodies[0]
