"""The API-server side of compaction against a fake inner ASGI app: the summary call, fallback, concurrency, headers."""

import asyncio
import json

import pytest

from kvsched.adapters.vllm.compaction import Compactor, Outcome
from kvsched.core.compaction_config import CompactionConfig, Strategy

SCOPE = {"type": "http", "path": "/v1/chat/completions", "method": "POST"}
SYSTEM = {"role": "system", "content": "you are an agent"}


class FakeVllm:
    """Answers chat completions like vLLM; records what it was sent. `mode`: ok, hang, reject, empty."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.calls = []
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.calls.append((scope, json.loads(message["body"])))
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "slow":
            await self.release.wait()
        status = 400 if self.mode == "reject" else 200
        content = "" if self.mode == "empty" else "short summary of it all"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                          if status == 200 else {"error": {"message": "max_tokens too large"}}).encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


def compactor(app, **kw):
    cfg = CompactionConfig(**{"strategy": Strategy.SUMMARIZE, "trigger_tokens": 40, "keep_recent_messages": 2,
                              "message_overhead_tokens": 0, "summary_target_tokens": 32, **kw})
    return Compactor(app, cfg, tokenizer=lambda text: len(text.split()))


def request(turns, session="wf/1", **extra):
    msgs = [SYSTEM]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"tool result number {i} with words"},
                 {"role": "assistant", "content": f"noted {i}"}]
    msgs.append({"role": "user", "content": "what next"})
    return {"model": "tiny", "messages": msgs, "vllm_xargs": {"session_id": session}, **extra}


def run(coro):
    return asyncio.run(coro)


def test_background_summary_is_used_from_the_next_request():
    app = FakeVllm()
    comp = compactor(app)

    async def scenario():
        first = request(8, cache_salt="tenant-a")
        out = await comp.prepare(SCOPE, first, {})
        assert not out.replaced and first["messages"] == request(8)["messages"]  # served at once, as sent
        await asyncio.gather(*comp.tasks.values())
        second = request(9, cache_salt="tenant-a")
        out2 = await comp.prepare(SCOPE, second, {})
        return out2, second, first

    out, second, first = run(scenario())
    assert len(app.calls) == 1
    scope, body = app.calls[0]
    # The summary call: the session's own prefix + the instruction, no session id and out of session inference (never
    # pinned), same cache salt,
    # lower priority, the configured target length, and opted out of compaction itself.
    assert body["vllm_xargs"] == {"kvsched_infer": 0} and body["cache_salt"] == "tenant-a" and body["priority"] == 10
    assert body["max_tokens"] == 32 and body["messages"][0] == SYSTEM and body["messages"][-1]["role"] == "user"
    assert (b"x-kvsched-compaction", b"off") in scope["headers"]
    assert out.changed and out.replaced > 0
    assert second["messages"][0]["content"].endswith("short summary of it all")  # appended to the system message
    assert second["messages"][1:] == request(9)["messages"][1 + out.replaced:]
    # marked for the scheduler, which ends the branch the rewrite leaves (the first request was served as sent: not
    # marked compacted); each names its conversation
    assert set(second["vllm_xargs"]) == {"session_id", "kvsched_compacted", "kvsched_conversation"}
    assert set(first["vllm_xargs"]) == {"session_id", "kvsched_conversation"}
    stats = comp.stats()
    assert stats["summaries"] == 1 and stats["rewritten_summarize"] == 1 and stats["replaced_messages"] == out.replaced


@pytest.mark.parametrize("mode, reason", [("hang", "timeout"), ("reject", "error"), ("empty", "empty")])
def test_failed_summary_call_serves_uncompacted_and_counts(mode, reason):
    app = FakeVllm(mode)
    comp = compactor(app, summary_timeout_s=0.05, wait_for_summary=True)
    payload = request(8)
    out = run(comp.prepare(SCOPE, payload, {}))
    assert not out.replaced and payload["messages"] == request(8)["messages"]
    stats = comp.stats()
    assert stats[f"failed_{reason}"] == 1 and stats["summaries"] == 0 and stats["summaries_in_flight"] == 0
    # No retry storm: the next request of the session within retry_after_s makes no new call.
    run(comp.prepare(SCOPE, request(9), {}))
    assert len(app.calls) == 1


def test_concurrent_requests_of_one_session_make_one_summary_call():
    app = FakeVllm("slow")
    comp = compactor(app, wait_for_summary=True)

    async def scenario():
        a, b = request(8), request(8)
        pending = asyncio.gather(comp.prepare(SCOPE, a, {}), comp.prepare(SCOPE, b, {}))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        app.release.set()
        return await pending, a, b

    (out_a, out_b), a, b = run(scenario())
    assert len(app.calls) == 1 and comp.stats()["summary_calls"] == 1
    assert out_a.replaced == out_b.replaced > 0 and a["messages"] == b["messages"]


def test_opt_out_and_bad_strategy():
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    payload = request(8)
    assert not run(comp.prepare(SCOPE, payload, {"x-kvsched-compaction": "off"})).replaced
    xargs_off = request(8)
    xargs_off["vllm_xargs"]["compaction"] = "off"
    assert not run(comp.prepare(SCOPE, xargs_off, {})).replaced
    assert app.calls == [] and comp.stats()["opt_outs"] == 2
    assert payload["messages"] == request(8)["messages"]  # served as sent, but named: a later rewrite ends its
    assert payload["vllm_xargs"]["kvsched_conversation"] == xargs_off["vllm_xargs"]["kvsched_conversation"]  # branch
    bad = run(comp.prepare(SCOPE, request(1), {"x-kvsched-compaction": "squeeze"}))
    assert bad.status == 400 and "unknown compaction strategy" in bad.error["error"]["message"]
    assert bad.error["error"]["param"] == "X-KVSched-Compaction"
    # found by review: the body's field was named as the header, and other routes took any value unchecked
    in_body = request(1)
    in_body["vllm_xargs"]["compaction"] = 5
    bad = run(comp.prepare(SCOPE, in_body, {}))
    assert bad.status == 400 and bad.error["error"]["param"] == "vllm_xargs.compaction"
    completions = dict(SCOPE, path="/v1/completions")
    assert run(comp.prepare(completions, {"prompt": "x"}, {"x-kvsched-compaction": "squeeze"})).status == 400
    assert run(comp.prepare(completions, {"prompt": "x"}, {"x-kvsched-compaction": "off"})).error is None


def test_a_client_may_only_opt_out_or_pick_what_the_operator_enabled():
    from kvsched.core.compaction_config import Strategy

    app = FakeVllm()
    comp = compactor(app, strategy=Strategy.OFF)
    for choice in ("summarize", "cap", "sliding_window"):
        refused = run(comp.prepare(SCOPE, request(8), {"x-kvsched-compaction": choice}))
        assert refused.status == 403 and "KVSCHED_COMPACTION_CLIENT_STRATEGIES allows off" in \
            refused.error["error"]["message"]
    xargs = request(8)
    xargs["vllm_xargs"]["compaction"] = "summarize"
    assert run(comp.prepare(SCOPE, xargs, {})).status == 403
    assert run(comp.prepare(SCOPE, request(8), {"x-kvsched-compaction": "off"})) == Outcome()
    assert app.calls == [] and comp.stats()["refused_choices"] == 4


def test_cap_refuses_with_a_message_and_sliding_window_needs_no_call():
    from kvsched.core.compaction_config import Strategy

    app = FakeVllm()
    comp = compactor(app, cap_tokens=30, client_strategies=(Strategy.CAP, Strategy.SLIDING_WINDOW))
    refused = run(comp.prepare(SCOPE, request(8), {"x-kvsched-compaction": "cap"}))
    assert refused.status == 400 and "context cap of 30 tokens" in refused.error["error"]["message"]
    payload = request(8)
    out = run(comp.prepare(SCOPE, payload, {"x-kvsched-compaction": "sliding_window"}))
    assert out.replaced > 0 and app.calls == [] and payload["messages"][0] == SYSTEM
    assert payload["messages"][1:] == request(8)["messages"][1 + out.replaced:]


def test_requests_without_a_session_or_on_completions_pass():
    comp = compactor(FakeVllm(), wait_for_summary=True)
    no_session = request(8)
    del no_session["vllm_xargs"]
    assert run(comp.prepare(SCOPE, no_session, {})) == Outcome()
    assert run(comp.prepare(dict(SCOPE, path="/v1/completions"), request(8), {})) == Outcome()


def test_response_header_and_metrics():
    sent = []

    async def send(message):
        sent.append(message)

    wrapped = Outcome(changed=True, replaced=7).wrap(send)
    run(wrapped({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]}))
    assert (b"x-kvsched-compacted", b"7") in sent[0]["headers"]
    refused = Outcome(changed=True, replaced=7).wrap(send)  # found by review: a rewritten request that vLLM refused
    run(refused({"type": "http.response.start", "status": 400, "headers": []}))  # was answered with the header
    run(refused({"type": "http.response.body", "body": b"{}"}))
    assert sent[1]["status"] == 400 and sent[1]["headers"] == [] and sent[2]["body"] == b"{}"
    assert Outcome().wrap(send) is send
    text = compactor(FakeVllm()).render_metrics().decode()
    assert "kvsched_compaction_summary_calls_total 0.0" in text
    assert 'kvsched_compaction_summary_failures_total{reason="timeout"} 0.0' in text


def test_a_sessions_last_turn_makes_no_summary_and_ends_its_state():
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    run(comp.prepare(SCOPE, request(2), {}))
    assert comp.store.sessions
    last = request(8)
    last["vllm_xargs"]["session_end"] = 1
    assert not run(comp.prepare(SCOPE, last, {})).replaced
    assert app.calls == [] and not comp.store.sessions


def test_the_in_process_call_reaches_the_app_with_body_headers_and_state():
    import asyncio

    from fastapi import FastAPI, Request

    from kvsched.adapters.vllm.compaction_calls import call_asgi

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        assert not await request.is_disconnected()  # no disconnect until the answer is complete
        return {"echo": body["x"], "auth": request.headers.get("authorization"), "state": request.state.tag}

    status, data = asyncio.run(call_asgi(app, {"state": {"tag": "lifespan"}}, "/v1/chat/completions", b'{"x": 7}',
                                         [(b"authorization", b"Bearer k")]))
    assert status == 200 and json.loads(data) == {"echo": 7, "auth": "Bearer k", "state": "lifespan"}
    status, _ = asyncio.run(call_asgi(app, {}, "/v1/nowhere", b"{}", []))
    assert status == 404


def test_the_in_process_call_carries_the_outer_app_to_a_stack_that_does_not_set_it():
    import asyncio

    from kvsched.adapters.vllm.compaction_calls import call_asgi

    seen = {}
    outer = object()

    async def inner(scope, receive, send):  # the app stack below kvsched's middleware: nothing sets scope["app"]
        seen["app"] = scope.get("app")
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    assert asyncio.run(call_asgi(inner, {"app": outer}, "/v1/chat/completions", b"{}", [])) == (200, b"{}")
    assert seen["app"] is outer


def test_each_turn_names_its_conversation_and_a_rewrite_names_what_it_continues():
    """The scheduler ends the branch a rewrite leaves only if that branch's last turn sent messages the rewritten
    request continues: every turn names its messages' digest, a rewrite names its messages' recent prefixes. Another
    conversation under the same id (another client, or the same user's other chat) is never among them. The count in
    X-KVSched-Compacted is the client messages replaced: the system message is served as sent."""
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    turn = request(3)
    run(comp.prepare(SCOPE, turn, {}))
    assert "kvsched_compacted" not in turn["vllm_xargs"]  # under the trigger
    sent = turn["vllm_xargs"]["kvsched_conversation"]
    follow = request(3)
    follow["messages"] = [*turn["messages"], {"role": "assistant", "content": "ok " * 5},
                          *[{"role": "user", "content": "tool output words " * 4}] * 3]
    other = request(3)  # the same id, another conversation
    other["messages"] = [SYSTEM, {"role": "user", "content": "unrelated " * 30}, {"role": "user", "content": "go"}]
    run(comp.prepare(SCOPE, other, {}))
    client = len(follow["messages"])
    out = run(comp.prepare(SCOPE, follow, {}))
    assert out.replaced > 0
    left = follow["vllm_xargs"]["kvsched_compacted"]
    assert sent in left and other["vllm_xargs"]["kvsched_conversation"] not in left
    assert follow["vllm_xargs"]["kvsched_conversation"] not in left  # its own full list continues nothing
    served = follow["messages"]
    assert served[0]["content"].startswith(SYSTEM["content"])  # the system message (with the summary) is not counted
    assert out.replaced == (client - 1) - (len(served) - 1)


def test_ending_one_conversation_keeps_the_summaries_of_the_ids_other_conversations():
    """Found by review: the end flag on any turn under an id dropped every summary of the id, so the same user's other
    conversation (one `user:` id, several chats) lost its summary and, once longer than the context, could not be
    served or summarised again. Now only the ending conversation's summaries go."""
    app = FakeVllm()
    comp = compactor(app, wait_for_summary=True)
    a, b = request(8, session="user:alice"), request(8, session="user:alice")
    b["messages"] = [SYSTEM, *[{"role": "user", "content": f"other chat {i} with more words"} for i in range(9)]]
    b_messages = [dict(m) for m in b["messages"]]
    assert run(comp.prepare(SCOPE, a, {})).replaced > 0 and run(comp.prepare(SCOPE, b, {})).replaced > 0
    assert len(comp.store.checkpoints(comp_key := next(iter(comp.store.sessions)))) == 2
    last_b = request(8, session="user:alice")
    last_b["messages"] = [*b_messages, {"role": "user", "content": "bye"}]
    last_b["vllm_xargs"]["session_end"] = 1
    run(comp.prepare(SCOPE, last_b, {}))
    assert len(comp.store.checkpoints(comp_key)) == 1  # a's stays
    again = request(8, session="user:alice")
    assert run(comp.prepare(SCOPE, again, {})).replaced > 0 and len(app.calls) == 2  # served from a's summary
    last_a = request(8, session="user:alice")
    last_a["vllm_xargs"]["session_end"] = 1
    run(comp.prepare(SCOPE, last_a, {}))
    assert not comp.store.sessions  # nothing left: the state goes


def test_the_summary_call_fits_the_served_models_context():
    """The limit comes from the served model (vLLM's max_model_len, less the summary's tokens and a margin)."""
    from types import SimpleNamespace

    app = FakeVllm()
    app.state = SimpleNamespace(engine_client=SimpleNamespace(model_config=SimpleNamespace(max_model_len=200)))
    comp = compactor(app, wait_for_summary=True)
    payload = request(40)  # ~280 words of history
    out = run(comp.prepare(dict(SCOPE, app=app), payload, {}))
    assert out.replaced > 0
    (_, body), = app.calls
    words = sum(len(m["content"].split()) for m in body["messages"])
    assert words <= 200 * 0.9 - 32 and comp.store.counters["summary_inputs_cut"] == 1


def test_a_summary_target_that_leaves_no_room_in_the_context_is_logged_once_and_counted(caplog):
    """Found by review: KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS at 0.9 of the context or more made no summary, with
    every counter at 0 and nothing logged."""
    from types import SimpleNamespace

    app = FakeVllm()
    app.state = SimpleNamespace(engine_client=SimpleNamespace(model_config=SimpleNamespace(max_model_len=200)))
    comp = compactor(app, wait_for_summary=True, trigger_tokens=200, summary_target_tokens=190)  # 190 > 0.9 * 200
    for session in ("a", "b"):
        out = run(comp.prepare(dict(SCOPE, app=app), request(40, session=session), {}))
        assert out.replaced == 0
    assert not app.calls and comp.stats()["summaries_no_room"] == 2
    assert sum("leaves no room" in r.getMessage() for r in caplog.records) == 1


def test_a_rewrite_ends_the_branch_of_a_turn_served_as_sent_and_of_many_new_messages():
    """Found by review: a turn served with compaction off or under the cap carried no conversation digest, and a
    rewrite listed only its messages' 32 newest prefixes, so the branch it left was not ended when the client switched
    strategy (the cap's 400 tells it to) or an agent turn added 40 tool results at once."""
    comp = compactor(FakeVllm(), wait_for_summary=True, client_strategies=(Strategy.CAP, Strategy.SLIDING_WINDOW))
    first = request(2)
    run(comp.prepare(SCOPE, first, {"x-kvsched-compaction": "cap"}))  # under the cap: served as sent
    sent = first["vllm_xargs"]["kvsched_conversation"]
    later = request(2)
    later["messages"] = [*first["messages"], {"role": "assistant", "content": "ok"},
                         *[{"role": "user", "content": f"tool result {i} with words"} for i in range(40)]]
    out = run(comp.prepare(SCOPE, later, {"x-kvsched-compaction": "sliding_window"}))
    assert out.replaced > 0 and sent in later["vllm_xargs"]["kvsched_compacted"]


@pytest.mark.parametrize("strategy", [Strategy.SUMMARIZE, Strategy.OFF])
def test_a_lone_surrogate_in_a_message_never_fails_the_request(strategy):
    """Found in the last look: a message digest encoded the text as strict UTF-8, so a lone surrogate (valid JSON
    "\\ud800") raised inside the middleware (a 500) once every turn was named."""
    comp = compactor(FakeVllm(), strategy=strategy, client_strategies=(Strategy.SUMMARIZE,))
    payload = request(3)
    payload["messages"][1]["content"] = "bad \ud800 text"
    out = run(comp.prepare(SCOPE, payload, {}))
    assert out.status == 200 and "kvsched_conversation" in payload["vllm_xargs"]


def test_a_job_handed_out_after_waiting_is_started():
    """Found by review: the plan made again after waiting for a summary can carry a new job (here: the call failed and
    retry_after_s is 0); it was handed out but never started, so the conversation's job stayed pending for good and it
    was never summarised again."""
    app = FakeVllm("reject")
    comp = compactor(app, wait_for_summary=True, retry_after_s=0.0)

    async def scenario():
        first = await comp.prepare(SCOPE, request(8), {})
        await asyncio.gather(*comp.tasks.values())
        app.mode = "ok"
        second = request(9)
        return first, await comp.prepare(SCOPE, second, {}), second

    first, out, second = run(scenario())
    assert not first.replaced and comp.store.pending() == 0
    assert out.replaced > 0 and second["messages"][0]["content"].endswith("short summary of it all")
