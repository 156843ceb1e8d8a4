"""A summary is made only when later requests can use it (found by review, /tmp/rev_compaction/p7_volatile_system.py:
a system prompt that changes every turn, or an edit to an old message, made a new summary call every turn, none of
them ever served)."""

from kvsched.core.compaction import CompactionStore, conversation_root
from kvsched.core.compaction_config import CompactionConfig, Strategy


def store(clock, **kw):
    cfg = CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=100, keep_recent_messages=2,
                           message_overhead_tokens=0, summary_target_tokens=20, **kw)
    return CompactionStore(cfg, clock)


def history(turns: int) -> list[dict[str, str]]:
    return [m for i in range(turns) for m in ({"role": "user", "content": f"tool result {i}"},
                                              {"role": "assistant", "content": f"ok {i}"})]


def test_a_system_prompt_that_changes_every_turn_is_served_with_the_summary(clock):
    s = store(clock)
    calls = served = 0
    for turn in range(8, 20):
        system = {"role": "system", "content": f"You are an agent. Current time: 12:{turn:02d}"}
        msgs = [system, *history(turn), {"role": "user", "content": "next"}]
        plan = s.plan("s", msgs, [10] * len(msgs))
        if plan.replaced:
            served += 1
            assert plan.messages[0]["content"].startswith(system["content"])  # this turn's system prompt
            assert plan.messages[0]["content"].endswith(f"summary {calls}")
        if plan.job is not None:
            calls += 1
            s.commit(plan.job, f"summary {calls}", 5)
    # 12 turns of 2 messages (20 tokens) each: one summary per 5 turns of new older turns, each used from the next
    assert served == 11 and calls <= 3 and s.counters["summaries_held_back"] == 0
    a = [{"role": "system", "content": "A"}, {"role": "user", "content": "hi"}]
    assert conversation_root(a) == conversation_root([{"role": "developer", "content": "B"}, *a[1:]])


def test_an_old_message_edited_every_turn_backs_off_after_an_unused_summary(clock):
    s = store(clock, retry_after_s=30.0)
    system = {"role": "system", "content": "agent"}

    def turn(n: int, edit: int) -> list[dict[str, str]]:
        msgs = [system, *history(n), {"role": "user", "content": "next"}]
        msgs[1] = {"role": "user", "content": "the task"}  # the first message (the conversation's root) stays
        msgs[3] = dict(msgs[3], content=f"tool result 1, edited {edit} times")
        return msgs

    first = s.plan("s", turn(10, 0), [10] * 22).job
    s.commit(first, "summary", 5)
    calls = 1
    for n in range(11, 20):  # every turn edits an old message: the summary never matches
        clock.advance(1)
        msgs = turn(n, n)
        plan = s.plan("s", msgs, [10] * len(msgs))
        assert plan.replaced == 0
        calls += plan.job is not None
    assert calls == 1 and s.counters["summaries_held_back"] == 9
    clock.advance(30)
    msgs = turn(21, 21)
    again = s.plan("s", msgs, [10] * len(msgs)).job  # after retry_after_s: one more try
    assert again is not None
    s.commit(again, "summary 2", 5)
    clock.advance(31)
    msgs = turn(22, 22)
    assert s.plan("s", msgs, [10] * len(msgs)).job is None  # unused again: the back-off doubled (60 s)
    clock.advance(30)
    msgs = turn(23, 23)
    assert s.plan("s", msgs, [10] * len(msgs)).job is not None


def test_a_used_summary_never_holds_the_next_back(clock):
    s = store(clock, retry_after_s=1e9)
    msgs = [{"role": "system", "content": "agent"}, *history(10), {"role": "user", "content": "next"}]
    s.commit(s.plan("s", msgs, [10] * len(msgs)).job, "first", 5)
    grown = msgs + history(30)[20:] + [{"role": "user", "content": "again"}]
    plan = s.plan("s", grown, [10] * len(grown))
    assert plan.replaced > 0 and plan.job is not None and s.counters["summaries_held_back"] == 0
