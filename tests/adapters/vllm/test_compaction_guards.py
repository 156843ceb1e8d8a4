"""Compaction on the API server against requests it must not be fooled or stalled by (found by review): a session
ended while its summary is made, a prefixed URL under `--root-path`, a message far larger than the model's context,
and a rewritten request that vLLM refuses."""

import asyncio
import threading
from types import SimpleNamespace

from kvsched.adapters.vllm.compaction import Compactor, Outcome
from kvsched.core.compaction_config import Strategy
from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run


class Shared:
    """Records the writes to the shared store (the interface of `SharedCheckpoints`); holds nothing to load."""

    def __init__(self):
        self.writes = []
        self.counters = {}

    async def load_into(self, local, session):
        return 0

    def save(self, local, session, drop_roots=frozenset(), drop_digests=frozenset()):
        self.writes.append(("save", len(local.checkpoints(session))))


def test_a_summary_landing_after_its_session_ended_is_neither_stored_nor_saved():
    """The end flag arrives while the session's summary call runs: when the summary lands it was stored again (in a
    re-created session, and in the shared store), and the id's next request was served with the ended one's summary."""
    app = FakeVllm("slow")
    comp = compactor(app)
    comp.shared = shared = Shared()

    async def scenario():
        await comp.prepare(SCOPE, request(8), {})  # starts the background summary
        await asyncio.sleep(0)
        end = request(8)
        end["vllm_xargs"]["session_end"] = 1
        await comp.prepare(SCOPE, end, {})
        app.release.set()
        await asyncio.gather(*comp.tasks.values())
        writes = list(shared.writes)
        return writes, await comp.prepare(SCOPE, request(9), {})

    writes, later = run(scenario())
    assert writes == [("save", 0)] and comp.stats()["summaries_dropped"] == 1  # the end: nothing left to save
    assert later.replaced == 0  # a new session under the id starts from nothing


def test_a_prefixed_url_under_root_path_is_compacted_and_capped_like_the_plain_one():
    """Under `--root-path /api` a chat request may arrive as /api/v1/chat/completions (vLLM routes it with the prefix
    removed): compaction compared the raw path, so the prefixed URL escaped it, even the operator's cap."""
    prefixed = dict(SCOPE, path="/api/v1/chat/completions", root_path="/api")
    capped = compactor(FakeVllm(), strategy=Strategy.CAP, cap_tokens=10)
    assert run(capped.prepare(SCOPE, request(8), {})).status == 400
    assert run(capped.prepare(prefixed, request(8), {})).status == 400
    payload = request(8)
    assert run(compactor(FakeVllm(), wait_for_summary=True).prepare(prefixed, payload, {})).replaced > 0
    elsewhere = dict(SCOPE, path="/api/v1/completions", root_path="/api")
    assert run(capped.prepare(elsewhere, request(8), {})).status == 200  # only chat is compacted


names: dict[int, str] = {}  # thread id -> name, as the tokenizer saw it


class CountingTokenizer:
    """Counts words like the other tests' tokenizer; records the characters of each call and the thread it ran on."""

    def __init__(self):
        self.calls = []

    def __call__(self, text):
        self.calls.append((len(text), threading.get_ident()))
        names[threading.get_ident()] = threading.current_thread().name
        return len(text.split())


def counting(app, tokenizer, **kw):
    return Compactor(app, compactor(app, **kw).config, tokenizer=tokenizer)


def test_a_message_far_past_the_models_context_is_never_tokenized():
    """Found by review: each message of a session's chat request was tokenized on the API server's event loop before
    vLLM's own length check, so a 20 MB message stalled /health and every other request for half a minute. A message
    with more characters than the context holds at the tokenizer's longest token per token is not counted: served
    as sent (vLLM refuses it), refused under the cap. A long history of ordinary messages is still compacted, however
    far past the context."""
    app = FakeVllm()
    served = SimpleNamespace(get_vocab=lambda: {"a": 0, "=" * 16: 1, "Ġword": 2})  # its longest token: 16 characters
    app.state = SimpleNamespace(engine_client=SimpleNamespace(model_config=SimpleNamespace(max_model_len=200),
                                                              get_tokenizer=lambda: served))
    scope, tok = dict(SCOPE, app=app), CountingTokenizer()
    huge = request(8)
    huge["messages"][-1]["content"] = "word " * 400_000  # 2 MB; 3,200 characters are past this context
    out = run(counting(app, tok).prepare(scope, huge, {}))
    assert tok.calls == [] and out == Outcome() and app.calls == []
    capped = counting(app, tok, strategy=Strategy.CAP)
    assert run(capped.prepare(scope, huge, {})).status == 400 and tok.calls == []
    assert capped.stats()["oversized_requests"] == 1
    history = request(40)
    assert sum(len(m["content"]) for m in history["messages"]) > 8 * 200
    assert run(counting(app, tok, wait_for_summary=True).prepare(scope, history, {})).replaced > 0
    fits = request(8)  # 2,000 characters of 16-character tokens: 125 tokens, within the 200 (a fixed 8 characters per
    fits["messages"][-1]["content"] = "=" * 2_000  # token refused it under the cap: found by review)
    assert run(counting(app, tok, strategy=Strategy.CAP).prepare(scope, fits, {})).status != 400


def test_much_new_text_is_tokenized_off_the_event_loop_and_a_little_on_it():
    tok = CountingTokenizer()
    comp = counting(FakeVllm(), tok, wait_for_summary=True)
    first = request(8)
    first["messages"][1]["content"] = "word " * 4_000  # 20,000 new characters
    sent = [dict(m) for m in first["messages"]]

    async def scenario():
        await comp.prepare(SCOPE, first, {})  # its summary is counted too (on the loop: a short text)
        later = request(8)
        later["messages"] = [*sent, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]
        return threading.get_ident(), await comp.prepare(SCOPE, later, {})

    loop, out = run(scenario())
    assert out.replaced > 0 and len(tok.calls) == len(sent) + 1 + 2  # counted once each
    assert all(thread != loop for _, thread in tok.calls[: len(sent)])
    # on the counter's own threads, not the default executor's that the shared store's calls use (found by review)
    assert {names[t] for _, t in tok.calls[: len(sent)]} <= {"kvsched-tokens_0", "kvsched-tokens_1"}
    assert all(thread == loop for _, thread in tok.calls[len(sent):])


def test_a_trigger_past_the_models_context_is_logged_once_and_compaction_fires_by_the_context(caplog):
    """Found by review (/tmp/rev_compaction/p8_trigger_vs_context.py): the default trigger of 5,000 tokens on a
    4,096-token model let a session's prompt pass the context before compaction fired, and nothing said so."""
    app = FakeVllm()
    app.state = SimpleNamespace(engine_client=SimpleNamespace(model_config=SimpleNamespace(max_model_len=400)))
    comp = compactor(app, wait_for_summary=True, trigger_tokens=5000)
    for session in ("a", "b"):
        out = run(comp.prepare(dict(SCOPE, app=app), request(60, session=session), {}))  # ~480 words: past 300
        assert out.replaced > 0
    assert comp.stats()["context_triggers"] == 2 and len(app.calls) == 2
    assert sum("sessions are compacted when their prompt reaches 300 tokens" in r.getMessage()
               for r in caplog.records) == 1


def test_one_call_per_conversation_even_when_its_state_went_while_the_call_ran():
    """Found by review (/tmp/rev_compaction/p4_lru_dup.py): a session's state evicted while its summary call ran, or
    a conversation ended and begun again, started a second call for the same conversation, which overwrote the first
    in the table of calls (the in-flight gauge went wrong) and made the same summary twice."""
    app = FakeVllm("slow")
    comp = compactor(app, max_sessions=2)

    async def scenario():
        await comp.prepare(SCOPE, request(8, session="A"), {})  # A's call starts and hangs
        for other in ("B", "C"):
            await comp.prepare(SCOPE, request(0, session=other), {})
        await comp.prepare(SCOPE, request(9, session="A"), {})  # A is still known: no second call
        end = request(8, session="A")
        end["vllm_xargs"]["session_end"] = 1
        await comp.prepare(SCOPE, end, {})  # the conversation ends while its call runs ...
        await comp.prepare(SCOPE, request(8, session="A"), {})  # ... and the same one begins again: not a second
        for _ in range(5):
            await asyncio.sleep(0)
        in_flight = (len(app.calls), comp.stats()["summaries_in_flight"], comp.store.pending())
        app.release.set()
        await asyncio.gather(*comp.tasks.values())
        return in_flight

    assert run(scenario()) == (1, 1, 0)
    assert comp.store.counters["jobs_withdrawn"] == 1 and comp.stats()["summaries_in_flight"] == 0
