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
