"""The compaction policy core: trigger, exact-prefix matching, summary of summary, sliding window, cap, config."""

import pytest

from kvsched.core.compaction import CompactionStore, leading_system_messages, prefix_digests
from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput, Strategy, parse_strategy

SYSTEM = {"role": "system", "content": "you are an agent"}


def conversation(turns: int) -> list[dict[str, str]]:
    msgs = [SYSTEM]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"tool result {i}"})
        msgs.append({"role": "assistant", "content": f"noted {i}"})
    return msgs


def counts(msgs, per_message=10):
    return [per_message] * len(msgs)


def store(clock, **kw):
    cfg = CompactionConfig(**{"strategy": Strategy.SUMMARIZE, "trigger_tokens": 100, "keep_recent_messages": 2,
                              "message_overhead_tokens": 0, "summary_target_tokens": 50, **kw})
    return CompactionStore(cfg, clock)


def ask(s, msgs, session="s1", strategy=None, per_message=10):
    return s.plan(session, msgs, counts(msgs, per_message), strategy)


def test_no_job_below_the_trigger_and_one_at_it(clock):
    s = store(clock)
    below = conversation(5) + [{"role": "user", "content": "next"}]  # older part: 8 messages, 80 tokens
    plan = ask(s, below)
    assert plan.job is None and plan.replaced == 0 and plan.messages == tuple(below)
    at = conversation(6) + [{"role": "user", "content": "next"}]
    plan = ask(s, at)
    job = plan.job
    assert job is not None and plan.replaced == 0
    # The kept part starts at a user turn; the older part is everything after the system prompt before the cut.
    assert at[job.cut]["role"] == "user" and len(at) - job.cut >= 2
    assert job.older_tokens == 10 * (job.cut - 1) >= 100
    assert job.prompt[: job.cut] == tuple(at[: job.cut]) and job.prompt[-1]["role"] == "user"
    assert "50 tokens" in job.prompt[-1]["content"]


def test_summary_applies_only_to_the_exact_prefix(clock):
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    job = ask(s, msgs).job
    s.commit(job, "SUMMARY", 7)
    later = msgs + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    plan = ask(s, later)
    assert plan.replaced == job.cut
    # the summary is appended to the system message (template-safe: compaction_layout), the kept turns follow
    head = plan.messages[0]["content"]
    assert head.startswith(SYSTEM["content"]) and head.endswith("SUMMARY")
    assert plan.messages[1:] == tuple(later[job.cut:])
    assert plan.tokens == 10 + 7 + 10 * (len(later) - job.cut) < plan.original_tokens
    edited = [dict(m) for m in later]
    edited[3]["content"] += " (edited)"
    assert ask(s, edited).replaced == 0  # one changed message inside the summarised part: served as sent
    other_system = [{"role": "system", "content": "another prompt"}] + later[1:]  # served with its own system
    plan = ask(s, other_system)  # prompt: summaries stand for the messages after it (tests/core/test_compaction_reuse)
    assert plan.replaced == job.cut and plan.messages[0]["content"].startswith("another prompt")
    assert ask(s, later, session="s2").replaced == 0  # summaries belong to their session


def test_one_job_at_a_time_per_session(clock):
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    first = ask(s, msgs).job
    assert first is not None
    assert ask(s, msgs).job is None and ask(s, msgs + [{"role": "user", "content": "x"}]).job is None
    assert ask(s, msgs, session="other").job is not None  # other sessions are independent
    s.commit(first, "S", 3)
    assert s.pending() == 1  # only "other" is still pending


def test_failure_backs_off_then_retries(clock):
    s = store(clock, retry_after_s=30.0)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    job = ask(s, msgs).job
    s.failed(job, "timeout")
    assert s.counters["failed_timeout"] == 1
    plan = ask(s, msgs)
    assert plan.job is None and plan.replaced == 0 and plan.messages == tuple(msgs)
    clock.advance(31)
    assert ask(s, msgs).job is not None


def test_repeat_compaction_summarises_the_summary(clock):
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    first = ask(s, msgs).job
    s.commit(first, "FIRST", 10)
    grown = msgs + [m for i in range(10, 20) for m in ({"role": "assistant", "content": f"a{i}"},
                                                      {"role": "user", "content": f"u{i}"})]
    plan = ask(s, grown)
    second = plan.job
    assert second is not None and second.cut > first.cut
    # The summariser sees the earlier summary plus the newer turns, exactly as the session is served.
    assert second.prompt[0]["content"].endswith("FIRST") and second.prompt[1] == grown[first.cut]
    assert second.older_tokens == 10 + 10 * (second.cut - first.cut)
    s.commit(second, "SECOND", 10)
    again = ask(s, grown + [{"role": "assistant", "content": "z"}, {"role": "user", "content": "zz"}])
    assert again.replaced == second.cut and again.messages[0]["content"].endswith("SECOND")
    assert ask(s, msgs).replaced == first.cut  # the older checkpoint still serves a request that stopped earlier


def test_sliding_window_drops_older_turns_and_keeps_the_system_prompt(clock):
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    plan = ask(s, msgs, strategy=Strategy.SLIDING_WINDOW)
    assert plan.job is None and plan.replaced > 0
    assert plan.messages[0] == SYSTEM and plan.messages[1] == msgs[plan.replaced]
    assert plan.messages[1:] == tuple(msgs[plan.replaced:])
    # The window is stable: the next turn keeps the same cut (prefix-cache friendly) until the trigger is hit again.
    nxt = msgs + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert ask(s, nxt, strategy=Strategy.SLIDING_WINDOW).replaced == plan.replaced
    # A summarize request of the same session does not use a window checkpoint.
    assert ask(s, nxt).replaced == 0


def test_cap_refuses_past_the_cap_only(clock):
    s = CompactionStore(CompactionConfig(strategy=Strategy.CAP, cap_tokens=100, message_overhead_tokens=1), clock)
    ok = s.plan("s", [SYSTEM, {"role": "user", "content": "x"}], [40, 40])
    assert ok.refusal is None and ok.tokens == 82
    refused = s.plan("s", [SYSTEM, {"role": "user", "content": "x"}], [60, 40])
    assert refused.refusal is not None and "102 tokens" in refused.refusal and "100" in refused.refusal


def test_off_changes_nothing(clock):
    s = store(clock)
    msgs = conversation(20)
    plan = ask(s, msgs, strategy=Strategy.OFF)
    assert plan.job is None and plan.replaced == 0 and plan.messages == tuple(msgs) and not s.sessions


def test_token_counts_must_match_messages(clock):
    with pytest.raises(ValueError, match="token counts"):
        store(clock).plan("s", [SYSTEM], [1, 2])


def test_store_is_bounded(clock):
    s = store(clock, max_sessions=2, checkpoints_per_session=1)
    for sid in ("a", "b", "c"):
        ask(s, [SYSTEM, {"role": "user", "content": "x"}], session=sid)
    assert list(s.sessions) == ["b", "c"]


def test_digests_identify_exact_prefixes():
    a = conversation(2)
    b = [dict(m) for m in a]
    assert prefix_digests(a) == prefix_digests(b)
    b[2]["content"] += "!"
    da, db = prefix_digests(a), prefix_digests(b)
    assert da[:3] == db[:3] and all(x != y for x, y in zip(da[3:], db[3:], strict=True))
    assert leading_system_messages(a) == 1 and leading_system_messages(a[1:]) == 0


def test_config_from_env_and_bad_values():
    cfg = CompactionConfig.from_env({"KVSCHED_COMPACTION": "Sliding_Window", "KVSCHED_COMPACTION_TRIGGER_TOKENS": "300",
                                     "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1",
                                     "KVSCHED_COMPACTION_SUMMARY_TIMEOUT_S": "2.5"})
    assert cfg.strategy is Strategy.SLIDING_WINDOW and cfg.trigger_tokens == 300 and cfg.wait_for_summary
    assert cfg.summary_timeout_s == 2.5 and CompactionConfig.from_env({}).strategy is Strategy.OFF
    with pytest.raises(InvalidCompactionInput, match="unknown compaction strategy"):
        CompactionConfig.from_env({"KVSCHED_COMPACTION": "shrink"})
    with pytest.raises(InvalidCompactionInput, match="TRIGGER_TOKENS"):
        CompactionConfig.from_env({"KVSCHED_COMPACTION_TRIGGER_TOKENS": "many"})
    with pytest.raises(InvalidCompactionInput, match="trigger_tokens"):
        CompactionConfig(trigger_tokens=0)
    with pytest.raises(InvalidCompactionInput):
        parse_strategy("")
    for blank in ("", "  \n"):  # found by review: every summary call then went out without an instruction; a blank
        # variable is now unset, as every KVSCHED_* one (kvsched.core.env): the built-in instruction
        assert CompactionConfig.from_env({"KVSCHED_COMPACTION_SUMMARY_PROMPT": blank}) == CompactionConfig()
    with pytest.raises(InvalidCompactionInput, match="summary_prompt"):
        CompactionConfig(summary_prompt=" ")


def test_forget_drops_a_session(clock):
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    s.commit(ask(s, msgs).job, "S", 3)
    s.forget("s1")
    assert s.checkpoints("s1") == [] and ask(s, msgs + [{"role": "assistant", "content": "a"}]).replaced == 0


def test_a_summary_landing_after_its_conversation_ended_or_its_state_went_is_dropped(clock):
    """Found by review: `commit` re-created a session ended while its call ran and stored the summary, so a later
    request under the id was served with the ended conversation's summary (and the adapter saved it to the shared
    store); committing for an evicted session also evicted another, live one."""
    s = store(clock)
    msgs = conversation(6) + [{"role": "user", "content": "next"}]
    job = ask(s, msgs).job
    assert s.forget("s1", msgs) and not s.sessions  # the last turn of the conversation
    assert s.commit(job, "S", 3) is None and not s.sessions and s.counters["summaries_dropped"] == 1
    s.failed(job)
    assert not s.sessions
    small = store(clock, max_sessions=1)
    job = ask(small, msgs).job
    ask(small, [SYSTEM, {"role": "user", "content": "x"}], session="s2")
    small.forget("s2")
    assert small.commit(job, "S", 3) is not None and list(small.sessions) == ["s1"]  # s2 never evicted to store it
    # (a session whose call runs is never evicted by the bound: tests/core/test_compaction_bounds.py)


def test_a_summary_call_past_the_models_context_summarises_the_newest_turns_that_fit(clock):
    """Found by review: a session whose summary was lost (an API-server restart, the store's bound) and whose history
    had grown past the model's context sent the whole history to the summary call, which failed, again after every
    retry: the session could never be served again. The call now leaves the oldest turns out, within the limit."""
    s = store(clock)
    msgs = conversation(60) + [{"role": "user", "content": "next"}]  # 121 messages of 10 tokens
    plan = s.plan("s1", msgs, counts(msgs), None, input_limit=300)
    job = plan.job
    assert job is not None and job.cut == len(msgs) - 3  # the cut itself does not move
    prompt_tokens = 10 * len(job.prompt) + len(s.config.instruction()) // 2
    assert prompt_tokens <= 300 + 10 and job.prompt[0] == SYSTEM and job.prompt[1]["role"] == "user"
    assert job.prompt[-2] == msgs[job.cut - 1]  # the newest older turn is in, the oldest are not
    assert s.counters["summary_inputs_cut"] == 1
    s.commit(job, "short", 5)
    again = s.plan("s1", msgs, counts(msgs), None, input_limit=300)
    assert again.replaced == job.cut and len(again.messages) == 1 + 3  # system with the summary + the recent turns
    unbounded = store(clock).plan("s1", msgs, counts(msgs))
    assert len(unbounded.job.prompt) == job.cut + 1  # without a limit: the whole older part, as before


def test_the_summary_input_limit_never_stops_a_sliding_window(clock):
    """Found by review: the limit meant for summary calls also ran for windows, and a large newest older turn then
    stopped the window: the request went out whole, past the model's context."""
    s = store(clock)
    msgs = [SYSTEM, {"role": "user", "content": "big"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "big"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go"}]
    sizes = [10, 1400, 5, 700, 5, 5]
    plan = s.plan("s1", msgs, sizes, Strategy.SLIDING_WINDOW, input_limit=500)
    assert plan.replaced > 0 and s.counters["windows"] == 1 and s.counters["summary_inputs_cut"] == 0


def test_one_conversations_pending_or_failed_summary_never_holds_back_another_under_the_same_id(clock):
    """A `user:` id holds every chat of its user: found by review, a failed summary of one held every other chat under
    the id back for `retry_after_s`, and a pending one until it was reported."""
    s = store(clock)
    a = conversation(8) + [{"role": "user", "content": "next"}]
    b = [SYSTEM] + [{"role": "user", "content": f"other chat {i}"} for i in range(16)] + [{"role": "user",
                                                                                            "content": "go"}]
    job_a = ask(s, a, session="user:alice").job
    job_b = ask(s, b, session="user:alice").job  # a's is pending: b gets its own
    assert job_a is not None and job_b is not None and job_a.root != job_b.root and s.pending() == 2
    s.failed(job_a)
    assert ask(s, a, session="user:alice").job is None  # a waits retry_after_s
    s.failed(job_b)
    clock.advance(s.config.retry_after_s)
    assert ask(s, b, session="user:alice").job is not None  # each on its own clock


def chat(n: int) -> list[dict[str, str]]:
    """Chat `n` of one user: its own first message, enough older turns to trigger a summary, a newest user turn."""
    return [SYSTEM] + [{"role": "user", "content": f"chat {n} turn {i}"} for i in range(14)] + [
        {"role": "user", "content": f"chat {n} next"}]


def test_a_users_many_chats_each_keep_their_summary(clock):
    """Found by review: one bound of 4 checkpoints for a whole id let a `user:` id's fifth chat evict the first's
    summary, so every chat was summarised again and again."""
    s = store(clock)
    for n in range(6):
        job = ask(s, chat(n), session="user:alice").job
        assert job is not None
        s.commit(job, f"summary of chat {n}", 5)
    for n in range(6):
        plan = ask(s, chat(n), session="user:alice")
        assert plan.replaced > 0 and plan.job is None, n  # served on its own summary, no second call
        assert plan.messages[0]["content"].endswith(f"summary of chat {n}")


def test_checkpoints_are_bounded_per_conversation_and_per_id(clock):
    s = store(clock, checkpoints_per_session=2)
    for rounds in range(3):  # one conversation summarised three times keeps its newest two
        msgs = chat(0) + [{"role": "user", "content": f"more {j}"} for j in range(12 * rounds)]
        job = ask(s, msgs, session="u").job
        s.commit(job, f"round {rounds}", 5)
    assert [cp.summary for cp in s.checkpoints("u")] == ["round 1", "round 2"]
    for n in range(1, 40):
        s.commit(ask(s, chat(n), session="u").job, f"summary {n}", 5)
    assert len(s.checkpoints("u")) == 2 * 16


def test_a_full_pending_table_hands_out_no_duplicate_call(clock):
    """Found by review: pending jobs were kept for the 16 newest conversations only, so with 17 calls in flight the
    oldest conversation's next request started a second call for the same summary."""
    s = store(clock)
    jobs = [ask(s, chat(n), session="u").job for n in range(17)]
    assert all(j is not None for j in jobs[:16]) and jobs[16] is None  # a full table hands out nothing
    assert ask(s, chat(0), session="u").job is None  # chat 0's call is still in flight: no second one
    s.commit(jobs[0], "done", 5)
    assert ask(s, chat(16), session="u").job is not None  # a slot came free


def test_shared_checkpoints_keep_their_conversation():
    from kvsched.core.compaction import Checkpoint
    from kvsched.core.shared_state import decode_checkpoints, encode_checkpoints
    cps = [Checkpoint("a" * 64, 3, 1, "s", 2, "b" * 64), Checkpoint("c" * 64, 3, 1, None)]
    assert decode_checkpoints(encode_checkpoints(cps)) == cps
    assert decode_checkpoints('[{"digest":"' + "a" * 64 + '","replaced":3,"system_count":1,"summary":"s",'
                              '"root":"bad"}]') == []  # a malformed root is never served


def test_a_summary_with_no_room_for_its_input_is_counted(clock):
    """Found by review: a summary target near the model's context (input limit 1) skipped every summary, counted
    nowhere; the adapter also logs it once (tests/adapters/vllm/test_compaction.py)."""
    s = store(clock)
    msgs = conversation(60) + [{"role": "user", "content": "next"}]
    assert s.plan("s1", msgs, counts(msgs), None, input_limit=1).job is None
    assert s.counters["summaries_no_room"] == 1


def test_an_empty_summary_prefix_is_a_setting_not_unset():
    """Blank KVSCHED_* values mean unset, but an empty prefix is how an operator asks for the summary alone (found by
    review of the blank-means-unset change: it silently brought the built-in prefix back)."""
    from kvsched.core.compaction_config import DEFAULT_SUMMARY_PREFIX

    assert CompactionConfig.from_env({"KVSCHED_COMPACTION_SUMMARY_PREFIX": ""}).summary_prefix == ""
    assert CompactionConfig.from_env({"KVSCHED_COMPACTION_SUMMARY_PREFIX": "Earlier: "}).summary_prefix == "Earlier: "
    assert CompactionConfig.from_env({}).summary_prefix == DEFAULT_SUMMARY_PREFIX
    assert CompactionConfig.from_env({"KVSCHED_COMPACTION_TRIGGER_TOKENS": " "}) == CompactionConfig.from_env({})


@pytest.mark.parametrize("value", ["-5", "abc", "1e9"])
def test_a_bad_multimodal_token_cost_is_refused_naming_its_variable(value):
    with pytest.raises(InvalidCompactionInput, match="KVSCHED_COMPACTION_IMAGE_TOKENS"):
        CompactionConfig.from_env({"KVSCHED_COMPACTION_IMAGE_TOKENS": value})
