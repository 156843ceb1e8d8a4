"""What makes a summary: the turns since the last cut reach the trigger (found by review,
/tmp/rev_compaction/p3_trigger_le_summary.py: the trigger counted the previous summary, so a trigger at or below the
summary's size re-summarised every turn) or the served prompt nears the model's context
(/tmp/rev_compaction/p8_trigger_vs_context.py: the default trigger of 5,000 on a 4,096-token model never fired before
the prompt passed the context)."""

import pytest

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput, Strategy

SYSTEM = {"role": "system", "content": "agent"}


def chat(turns: int) -> list[dict[str, str]]:
    return [SYSTEM, *(m for i in range(turns) for m in ({"role": "user", "content": f"u{i}"},
                                                         {"role": "assistant", "content": f"a{i}"})),
            {"role": "user", "content": "next"}]


def test_a_trigger_at_or_below_the_summary_size_is_refused_naming_both_settings():
    with pytest.raises(InvalidCompactionInput, match="KVSCHED_COMPACTION_TRIGGER_TOKENS.*SUMMARY_TARGET_TOKENS"):
        CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=400, summary_target_tokens=500)
    with pytest.raises(InvalidCompactionInput, match="trigger_tokens .500"):
        CompactionConfig(client_strategies=(Strategy.SUMMARIZE,), trigger_tokens=500)  # a client may pick it
    with pytest.raises(InvalidCompactionInput, match="^KVSCHED_COMPACTION_TRIGGER_TOKENS"):
        CompactionConfig.from_env({"KVSCHED_COMPACTION": "summarize", "KVSCHED_COMPACTION_TRIGGER_TOKENS": "300"})
    assert CompactionConfig(strategy=Strategy.SLIDING_WINDOW, trigger_tokens=300).trigger_tokens == 300  # no summary


def test_the_summary_itself_never_counts_toward_the_next_trigger():
    s = CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=100, summary_target_tokens=50,
                                         keep_recent_messages=2, message_overhead_tokens=0), clock=lambda: 0.0)
    msgs = chat(6)
    s.commit(s.plan("s", msgs, [10] * len(msgs)).job, "a long summary", 95)  # the model overshot its target
    for turns in range(7, 11):  # each turn adds 20 tokens of older turns: no summary until they reach 100
        msgs = chat(turns)
        plan = s.plan("s", msgs, [10] * len(msgs))
        assert plan.replaced > 0 and plan.job is None, turns
    msgs = chat(11)
    job = s.plan("s", msgs, [10] * len(msgs)).job
    assert job is not None and job.older_tokens == 95 + 10 * (job.cut - 11)  # the call summarises both


def big_chat(turns: int) -> tuple[list[dict[str, str]], list[int]]:
    """`turns` user turns of 400 tokens (and short answers) after a 10-token system prompt, then a short question."""
    msgs = chat(turns)
    return msgs, [10, *([400, 2] * turns), 5]


def test_a_prompt_near_the_models_context_is_compacted_before_the_trigger():
    s = CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, message_overhead_tokens=0), clock=lambda: 0.0)
    assert s.config.trigger_tokens == 5000  # the default, past this 4,096-token model's context
    msgs, counts = big_chat(7)  # 2,829 tokens: under 3/4 of the context
    assert s.plan("s", msgs, counts, context_tokens=4096).job is None
    msgs, counts = big_chat(8)  # 3,231 tokens: past 3/4 of the context (3,072)
    assert s.plan("s", msgs, counts).job is None  # without the context: nothing before 5,000 tokens of turns
    job = s.plan("t", msgs, counts, context_tokens=4096).job
    assert job is not None and s.counters["context_triggers"] == 1
    s.commit(job, "summary", 300)
    msgs, counts = big_chat(9)
    plan = s.plan("t", msgs, counts, context_tokens=4096)
    assert plan.replaced == job.cut and plan.tokens < 3072 and plan.job is None


def test_near_the_context_a_summary_still_needs_more_turns_than_its_own_size():
    """Recent turns alone can fill the context (keep_recent_messages is a count): no summary of a few tokens then."""
    s = CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, message_overhead_tokens=0,
                                         keep_recent_messages=2), clock=lambda: 0.0)
    msgs = chat(2)
    counts = [10, 200, 100, 200, 100, 3500]  # the newest question is most of the context; older turns: 300 tokens
    assert s.plan("s", msgs, counts, context_tokens=4096).job is None  # 300 tokens: not more than the 500 target
    assert s.plan("s", msgs, [10, 300, 300, 300, 300, 3500], context_tokens=4096).job is not None
