"""Compaction on a real `vllm serve --scheduler kvsched` (tiny random model: summaries are gibberish, the mechanism
is what is tested). One server, small trigger, the triggering request waits for its summary."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from tests.integration.servers import COMPACTION_MAX_MODEL_LEN as MAX_MODEL_LEN  # noqa: E402
from tests.integration.servers import COMPACTION_TRIGGER as TRIGGER  # noqa: E402

pytestmark = pytest.mark.integration
SYSTEM = {"role": "system", "content": "You are a careful research agent. Use the tools. " * 4}
WORDS = "agent tool result page document query answer search cache block token prefix session memory".split()


@pytest.fixture(scope="module")
def server(compaction_server):
    """Started with the package's other shared servers (conftest.launched; spec in servers.py)."""
    return compaction_server


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def text(i: int, words: int = 40) -> str:
    return f"[{i}] " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))


def chat(server, messages, session, headers=None, max_tokens=4):
    hdrs = {"X-Session-Id": session, **(headers or {})}
    r = httpx.post(server.url + "/chat/completions", headers=hdrs, timeout=120,
                   json={"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
    return r


def compacted(r) -> int:
    return int(r.headers.get("x-kvsched-compacted", 0))


def metric(server, name):
    return server.metrics().get(name, 0.0)


def session_rows(server, session):
    with urllib.request.urlopen(server.base + "/kvsched/sessions?limit=1000", timeout=30) as r:
        return [row for row in json.loads(r.read())["sessions"] if row["session_id"] == session]


def pinned_tokens(server, session):
    """Pinned tokens of the session's newest branch: a compacted turn does not continue the pinned prompt, so it
    starts a branch of its own (kvsched.core.lineage), and the scheduler ends the branch it left (the middleware marks
    the rewritten request)."""
    rows = session_rows(server, session)
    return max(rows, key=lambda row: row["branch"])["pinned_tokens"] if rows else 0


def grow(server, session, turns, start=0, headers=None, history=None):
    """Play `turns` turns (user tool result, canned assistant reply); returns the history and each response."""
    history = list(history or [SYSTEM])
    replies = []
    for i in range(start, start + turns):
        history.append({"role": "user", "content": text(i)})
        r = chat(server, history, session, headers)
        assert r.status_code == 200, r.text
        replies.append(r)
        history.append({"role": "assistant", "content": f"noted {i}"})
    return history, replies


def older_tokens(history, tokens):
    """The core's trigger quantity for a request (no summary yet): messages between the system prompt and the newest
    two, the cut moved back to a user message; 4 template tokens per message."""
    cut = len(history) - 2
    while cut > 1 and history[cut]["role"] != "user":
        cut -= 1
    return sum(tokens(m["content"]) + 4 for m in history[1:cut])


def test_triggers_at_the_threshold_and_bounds_pinned_kv(server, tokens):
    calls0 = metric(server, "kvsched_compaction_summary_calls_total")
    summaries0 = metric(server, "kvsched_compaction_summaries_total")
    superseded0 = metric(server, "kvsched_branches_superseded_total")
    history = [SYSTEM]
    first = None
    for i in range(8):
        history.append({"role": "user", "content": text(i)})
        r = chat(server, history, "grow")
        assert r.status_code == 200, r.text
        if compacted(r):
            first = (i, r)
            break
        assert older_tokens(history, tokens) < TRIGGER  # not compacted: below the trigger
        history.append({"role": "assistant", "content": f"noted {i}"})
    assert first is not None, "never compacted"
    assert older_tokens(history, tokens) >= TRIGGER  # compacted at the first request over the trigger
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0 + 1
    served = first[1].json()["usage"]["prompt_tokens"]
    assert served < sum(tokens(m["content"]) for m in history)  # the rewrite is shorter than the history
    history.append({"role": "assistant", "content": f"noted {first[0]}"})

    # Grow to 8x the trigger: compaction repeats (summary of summary) and the pinned KV of the session's current
    # branch stays bounded.
    peak = 0
    i = first[0] + 1
    while sum(tokens(m["content"]) for m in history) < 8 * TRIGGER:
        history, replies = grow(server, "grow", 1, start=i, history=history)
        assert compacted(replies[0]) > 0
        peak = max(peak, pinned_tokens(server, "grow"))
        i += 1
    final = sum(tokens(m["content"]) for m in history)
    summaries = metric(server, "kvsched_compaction_summaries_total") - summaries0
    assert summaries >= 2  # repeated
    # Each summary's first rewritten turn started a branch and ended the one it left: only the current branch is
    # left, holding the session's only pinned KV (before, every left branch kept its pin until its TTL).
    assert len(session_rows(server, "grow")) == 1
    assert metric(server, "kvsched_branches_superseded_total") - superseded0 == summaries
    assert 0 < peak < 0.35 * final and peak < 2.5 * TRIGGER


def test_rewritten_only_when_the_prefix_matches_exactly(server):
    history, replies = grow(server, "exact", 9)
    assert compacted(replies[-1]) > 0
    history.append({"role": "user", "content": "and now?"})
    calls0 = metric(server, "kvsched_compaction_summary_calls_total")
    same = chat(server, history, "exact")
    assert compacted(same) > 0 and metric(server, "kvsched_compaction_summary_calls_total") == calls0
    # One corrected message inside the summarised part: the stored summary is not used; these messages (still over
    # the trigger) get a summary of their own.
    edited = [dict(m) for m in history]
    edited[1]["content"] += " (corrected)"
    r = chat(server, edited, "exact", headers={"X-KVSched-Compaction": "summarize"})
    assert r.status_code == 200
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0 + 1
    # Opted out, the edited conversation is served as sent: longer than the compacted one.
    full = chat(server, edited, "exact", headers={"X-KVSched-Compaction": "off"})
    assert compacted(full) == 0
    assert full.json()["usage"]["prompt_tokens"] > same.json()["usage"]["prompt_tokens"]


def test_a_history_past_the_context_is_summarised_from_its_newest_turns_and_served(server, tokens):
    """A conversation whose older part alone is past the model's context (its summary lost, e.g. to an API-server
    restart): the summary call leaves the oldest turns out to fit, and the request is served compacted. Before, the
    call sent the whole older part, vLLM refused it, and the request (longer than the context) failed, every time."""
    cut0, failures0 = metric(server, "kvsched_compaction_summary_inputs_cut_total"), failures(server)
    history = [SYSTEM]
    for i in range(80):
        history += [{"role": "user", "content": text(i, 60)}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "go on"})
    assert sum(tokens(m["content"]) for m in history) > MAX_MODEL_LEN  # as sent, vLLM would refuse it
    r = chat(server, history, "past-the-context")
    assert r.status_code == 200, r.text
    assert compacted(r) > 0 and r.json()["usage"]["prompt_tokens"] < MAX_MODEL_LEN
    assert metric(server, "kvsched_compaction_summary_inputs_cut_total") == cut0 + 1 and failures(server) == failures0


def test_a_turn_too_long_to_summarise_is_served_as_sent_without_a_failing_call(server, tokens):
    """The older part is one turn that alone fills the context: no summary can fit, so none is asked for (no call
    vLLM would refuse, no failure); the request itself fits and is served as sent."""
    calls0, failures0 = metric(server, "kvsched_compaction_summary_calls_total"), failures(server)
    filler = "agent tool result " * 2000
    n = len(filler.split())
    while tokens(" ".join(filler.split()[:n])) > MAX_MODEL_LEN - 110:
        n -= 50
    big = " ".join(filler.split()[:n])
    history = [SYSTEM, {"role": "user", "content": big}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "go on"}]
    r = chat(server, history, "too-long")
    assert r.status_code == 200, r.text
    assert compacted(r) == 0 and r.json()["usage"]["prompt_tokens"] > MAX_MODEL_LEN - 200
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0 and failures(server) == failures0


def failures(server) -> float:
    return metric(server, "kvsched_compaction_summary_failures_total")


def test_opt_out_is_served_as_sent(server):
    calls0 = metric(server, "kvsched_compaction_summary_calls_total")
    history, replies = grow(server, "optout", 9, headers={"X-KVSched-Compaction": "off"})
    assert all(compacted(r) == 0 for r in replies)
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0
    assert metric(server, "kvsched_compaction_opt_outs_total") >= 9


def test_two_concurrent_requests_make_one_summary(server):
    history, _ = grow(server, "twice", 8, headers={"X-KVSched-Compaction": "off"})
    history += [{"role": "user", "content": text(k)} for k in (50, 51)]
    calls0 = metric(server, "kvsched_compaction_summary_calls_total")
    results = [None, None]

    def send(k):
        results[k] = chat(server, history, "twice")

    threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0 + 1
    assert compacted(results[0]) == compacted(results[1]) > 0


def test_cap_and_sliding_window_per_request(server):
    history, _ = grow(server, "capped", 4, headers={"X-KVSched-Compaction": "off"})
    history += [{"role": "user", "content": text(k, 400)} for k in range(3)]
    r = chat(server, history, "capped", headers={"X-KVSched-Compaction": "cap"})
    assert r.status_code == 400 and "context cap of 1000 tokens" in r.json()["error"]["message"]
    calls0 = metric(server, "kvsched_compaction_summary_calls_total")
    r = chat(server, history, "capped", headers={"X-KVSched-Compaction": "sliding_window"})
    assert r.status_code == 200 and compacted(r) > 0
    assert metric(server, "kvsched_compaction_summary_calls_total") == calls0
    bad = chat(server, history, "capped", headers={"X-KVSched-Compaction": "shrink"})
    assert bad.status_code == 400 and "unknown compaction strategy" in bad.json()["error"]["message"]
