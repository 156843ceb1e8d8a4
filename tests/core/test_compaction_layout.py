"""Compacted conversations keep the shape strict chat templates accept (found by review, /tmp/rev_compaction/p5):
roles alternate user/assistant after an optional leading system message, and a user message is left."""

import pytest

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput, Strategy
from kvsched.core.compaction_layout import SUMMARY_ACK

SYSTEM = {"role": "system", "content": "you are an agent"}


def template_accepts(messages) -> bool:
    """The checks of Mistral-Instruct v0.3's template (its tokenizer_config.json: only messages[0] may be a system
    message; tool results and assistant tool calls are left out of the alternation check) plus Qwen3's (a user message
    must be left). Llama 2 and Gemma 2/3 check the same alternation."""
    loop = messages[1:] if messages and messages[0]["role"] == "system" else messages
    turns = [m for m in loop if m["role"] != "tool" and not m.get("tool_calls")]
    alternate = all((m["role"] == "user") == (i % 2 == 0) for i, m in enumerate(turns))
    return alternate and any(m["role"] == "user" for m in loop)


def chat(turns: int, system: bool = True) -> list[dict[str, str]]:
    msgs = [SYSTEM] if system else []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return msgs + [{"role": "user", "content": "next"}]


def store(role="system", **kw):
    cfg = CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=40, keep_recent_messages=2,
                           message_overhead_tokens=0, summary_target_tokens=20, summary_role=role, **kw)
    return CompactionStore(cfg, clock=lambda: 0.0)


def test_the_check_sees_the_old_layout_fail():
    old = [SYSTEM, {"role": "system", "content": "summary"}, {"role": "user", "content": "u"}]
    assert template_accepts(chat(3)) and not template_accepts(old)
    assert not template_accepts([SYSTEM, {"role": "user", "content": "summary"}, {"role": "user", "content": "u"}])


@pytest.mark.parametrize("role", ["system", "user"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_served_and_summary_call_messages_keep_alternating(role, system):
    s = store(role)
    msgs = chat(8, system)
    job = s.plan("s", msgs, [10] * len(msgs)).job
    assert job is not None and template_accepts(list(job.prompt))
    s.commit(job, "the summary", 5)
    grown = msgs + [m for i in range(8, 20) for m in ({"role": "assistant", "content": f"a{i}"},
                                                     {"role": "user", "content": f"u{i}"})]
    plan = s.plan("s", grown, [10] * len(grown))
    assert plan.replaced == job.cut and template_accepts(list(plan.messages)), plan.messages
    assert any("the summary" in str(m["content"]) for m in plan.messages)
    again = plan.job  # a summary of the summary: its call is served the same way
    assert again is not None and template_accepts(list(again.prompt))
    assert again.prompt[-1]["content"].endswith(s.config.instruction())


def test_the_default_merges_into_the_system_message_and_a_user_summary_is_acknowledged():
    s = store("system")
    msgs = chat(8)
    s.commit(s.plan("s", msgs, [10] * len(msgs)).job, "S", 5)
    plan = s.plan("s", msgs, [10] * len(msgs))
    assert plan.messages[0] == {"role": "system", "content": "you are an agent\n\n" + s.summary_text("S")}
    assert plan.messages[1] == msgs[plan.replaced] and plan.tokens == 10 + 5 + 10 * (len(msgs) - plan.replaced)
    u = store("user")
    u.commit(u.plan("s", msgs, [10] * len(msgs)).job, "S", 5)
    plan = u.plan("s", msgs, [10] * len(msgs))
    assert plan.messages[:3] == (SYSTEM, {"role": "user", "content": u.summary_text("S")},
                                 {"role": "assistant", "content": SUMMARY_ACK})
    assert plan.messages[3:] == tuple(msgs[plan.replaced:])


def test_list_content_of_the_system_message_gets_a_text_part():
    s = store()
    msgs = chat(8)
    msgs[0] = {"role": "system", "content": [{"type": "text", "text": "you are an agent"}]}
    s.commit(s.plan("s", msgs, [10] * len(msgs)).job, "S", 5)
    head = s.plan("s", msgs, [10] * len(msgs)).messages[0]
    assert head["content"] == [{"type": "text", "text": "you are an agent"},
                               {"type": "text", "text": s.summary_text("S")}]


@pytest.mark.parametrize("role", ["assistant", "tool", "bogus"])
def test_only_template_safe_summary_roles_are_accepted(role):
    with pytest.raises(InvalidCompactionInput, match="summary_role"):
        CompactionConfig(summary_role=role)
    with pytest.raises(InvalidCompactionInput, match="KVSCHED_COMPACTION_SUMMARY_ROLE"):
        CompactionConfig.from_env({"KVSCHED_COMPACTION_SUMMARY_ROLE": role})
