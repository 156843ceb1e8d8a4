"""Compaction on a real `vllm serve --scheduler kvsched` whose chat templates are strict (sent with each request:
`--trust-request-chat-template`): one that refuses kvsched's rewrite, and one that renders tool calls only against the
request's tools. Tiny random model: the mechanism is what is tested."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from tests.integration.test_compaction import SYSTEM, compacted, metric, session_rows, text  # noqa: E402

pytestmark = pytest.mark.integration
TURN = """<|{{ message['role'] }}|>
{{ message['content'] }}<|end|>
"""
END = "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
# Refuses a conversation that holds kvsched's summary (as an alternating-roles template refused kvsched's first
# rewrites), and one whose newest message says FORBIDDEN (the client's own request is refused too).
NO_SUMMARY = ("{{ bos_token }}{% for message in messages %}"
              "{% if 'written by kvsched compaction' in (message['content'] or '') %}"
              "{{ raise_exception('this template takes no summaries') }}{% endif %}"
              "{% if loop.last and 'FORBIDDEN' in (message['content'] or '') %}"
              "{{ raise_exception('a forbidden word') }}{% endif %}" + TURN + END)
# Renders the tools first and refuses tool calls without them (templates that look tool calls up among the tools)
NEEDS_TOOLS = ("{{ bos_token }}{% if tools %}<|tools|>\n{{ tools | tojson }}<|end|>\n{% endif %}"
               "{% for message in messages %}{% if message.get('tool_calls') and not tools %}"
               "{{ raise_exception('tool calls need the tools they call') }}{% endif %}" + TURN + END)
TOOLS = [{"type": "function", "function": {"name": "search", "description": "search the web", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


@pytest.fixture(scope="module")
def server(compaction_server):
    """test_compaction's server (conftest; spec in servers.py): its flags take the templates and tools sent here. Every
    check below compares counters before and after, and its sessions are its own."""
    return compaction_server


def post(server, messages, session, template, headers=None, **extra):
    return httpx.post(server.url + "/chat/completions", timeout=120,
                      headers={"X-Session-Id": session, **(headers or {})},
                      json={"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0.0,
                            "chat_template": template, **extra})


def counters(server):
    return {name: metric(server, f"kvsched_compaction_{name}_total") for name in (
        "rewrites_resent", "rewrites_refused", "summary_calls", "summary_failures")}


def grown(server, session, turns, template, headers=None):
    history = [SYSTEM]
    for i in range(turns):
        history.append({"role": "user", "content": text(i)})
        r = post(server, history, session, template, headers)
        assert r.status_code == 200, r.text
        history.append({"role": "assistant", "content": f"noted {i}"})
    return history


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_rewrite_is_served_as_the_client_sent_it_once(server, stream):
    """Found by review: the turn whose rewrite vLLM refused failed to the client. It is sent again as sent: every turn
    gets 200, and the engine saw each of the client's requests once (one branch, a turn each, nothing running). A
    stream too: vLLM refuses the rewrite with a JSON error before any event."""
    session = f"resend-{stream}"
    before, history, sent = counters(server), [SYSTEM], 0
    for i in range(10):
        history.append({"role": "user", "content": text(i)})
        r = post(server, history, session, NO_SUMMARY, stream=stream)
        sent += 1
        assert r.status_code == 200, r.text
        assert compacted(r) == 0 and (not stream or r.text.rstrip().endswith("data: [DONE]"))  # served as sent
        history.append({"role": "assistant", "content": f"noted {i}"})
    after = counters(server)
    assert after["summary_calls"] == before["summary_calls"] + 1  # compaction fired once, then stopped for it
    assert after["rewrites_resent"] == before["rewrites_resent"] + 1
    assert after["rewrites_refused"] == before["rewrites_refused"] + 1
    assert after["summary_failures"] == before["summary_failures"]
    rows = session_rows(server, session)
    assert len(rows) == 1 and rows[0]["turns"] == sent and rows[0]["active_requests"] == 0, rows
    assert rows[0]["pinned_tokens"] > 0


def test_a_request_refused_as_sent_too_gets_its_own_error(server):
    history = grown(server, "own-error", 8, NO_SUMMARY, headers={"X-KVSched-Compaction": "off"})
    before = counters(server)
    history.append({"role": "user", "content": "FORBIDDEN " + text(50)})
    r = post(server, history, "own-error", NO_SUMMARY)
    assert r.status_code == 400 and "a forbidden word" in r.json()["error"]["message"], r.text  # the original's
    after = counters(server)
    assert after["rewrites_resent"] == before["rewrites_resent"] + 1
    assert after["rewrites_refused"] == before["rewrites_refused"]  # the client's own error: compaction goes on
    history[-1] = {"role": "user", "content": text(51)}
    r = post(server, history, "own-error", NO_SUMMARY)
    assert r.status_code == 200 and compacted(r) == 0, r.text  # its rewrite refused again, sent again, taken
    assert counters(server)["rewrites_refused"] == before["rewrites_refused"] + 1
    rows = session_rows(server, "own-error")
    assert len(rows) == 1 and rows[0]["turns"] == 9 and rows[0]["active_requests"] == 0, rows  # 8 + 1 taken


def test_a_tool_using_sessions_summary_renders_its_tool_calls(server):
    """Found by review: the summary call carried no tools, so a template that renders tool calls against them refused
    it and a tool-using agent was never compacted."""
    before = counters(server)
    history = [SYSTEM, {"role": "user", "content": "find the facts about " + text(0, 10)}]
    replies = []
    for i in range(12):
        call = {"id": f"call{i}", "type": "function", "function": {"name": "search",
                                                                   "arguments": json.dumps({"q": text(i, 6)})}}
        history += [{"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call{i}", "content": text(i)}]
        r = post(server, history, "tools", NEEDS_TOOLS, tools=TOOLS, tool_choice="auto")
        assert r.status_code == 200, r.text
        replies.append(r)
        if compacted(r):
            break
    after = counters(server)
    assert compacted(replies[-1]) > 0 and after["summary_failures"] == before["summary_failures"]
    assert after["summary_calls"] == before["summary_calls"] + 1
