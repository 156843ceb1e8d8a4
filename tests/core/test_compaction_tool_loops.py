"""Agent tool loops are compacted (found by review, /tmp/rev_compaction/p1_tool_loop.py: one user task then hundreds
of assistant tool calls and tool results was never cut, since a cut moved back to a user message only), and a cut
never separates an assistant's tool calls from their results."""

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, Strategy
from kvsched.core.compaction_layout import WINDOW_NOTE, turn_starts
from tests.core.test_compaction_layout import template_accepts

SYSTEM = {"role": "system", "content": "agent"}


def call(i: int, n: int = 1) -> list[dict]:
    """One assistant message with `n` tool calls and their results."""
    calls = [{"id": f"c{i}_{k}", "type": "function", "function": {"name": "search", "arguments": "{}"}}
             for k in range(n)]
    return [{"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"} for c in calls)]


def loop(steps: int, n: int = 1) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": "research X"}, *(m for i in range(steps) for m in call(i, n))]


def store(strategy=Strategy.SUMMARIZE, keep=3):
    cfg = CompactionConfig(strategy=strategy, trigger_tokens=100, keep_recent_messages=keep,
                           message_overhead_tokens=0, summary_target_tokens=20)
    return CompactionStore(cfg, clock=lambda: 0.0)


def test_turn_groups_start_at_user_messages_and_at_assistants_whose_calls_are_answered():
    msgs = [SYSTEM, {"role": "user", "content": "go"}, *call(0, 2), {"role": "assistant", "content": "done"},
            {"role": "user", "content": "more"}, *call(1)]
    # an assistant answering the user message before it belongs to that user's group (a chat is cut at users)
    assert turn_starts(msgs) == [False, True, False, False, False, True, True, False, False]
    unanswered = [{"role": "user", "content": "go"}, *call(0, 2), *call(1, 2)[:2],
                  {"role": "assistant", "content": "?"}]
    assert turn_starts(unanswered) == [True, False, False, False, True, False, False]  # one of two calls answered


def test_a_tool_loop_is_summarised_and_served_with_its_calls_and_results_together():
    s = store()
    msgs = loop(20)
    job = s.plan("s", msgs, [10] * len(msgs)).job
    assert job is not None and msgs[job.cut]["role"] == "assistant" and msgs[job.cut - 1]["role"] == "tool"
    assert len(msgs) - job.cut >= 3 and template_accepts(list(job.prompt))
    s.commit(job, "searched 18 times", 5)
    grown = msgs + call(20)
    plan = s.plan("s", grown, [10] * len(grown))
    assert plan.replaced == job.cut
    # the kept part starts with an assistant message: the summary is a user message before it (Qwen3's template
    # needs a user message, Mistral's alternation)
    assert plan.messages[:2] == (SYSTEM, {"role": "user", "content": s.summary_text("searched 18 times")})
    assert plan.messages[2:] == tuple(grown[job.cut:]) and template_accepts(list(plan.messages))
    assert plan.tokens < plan.original_tokens


def test_parallel_tool_calls_are_never_separated_from_their_results():
    s = store(keep=2)
    msgs = loop(12, n=3)
    job = s.plan("s", msgs, [10] * len(msgs)).job
    assert job is not None and msgs[job.cut]["role"] == "assistant" and msgs[job.cut].get("tool_calls")
    kept = msgs[job.cut:]
    ids = {c["id"] for m in kept if m.get("tool_calls") for c in m["tool_calls"]}
    assert ids == {m["tool_call_id"] for m in kept if m["role"] == "tool"}


def test_a_window_over_a_tool_loop_keeps_a_user_message_before_the_calls():
    s = store(Strategy.SLIDING_WINDOW)
    chat = [SYSTEM, *({"role": r, "content": f"{r} {i}"} for i in range(20) for r in ("user", "assistant"))]
    assert chat[s.plan("c", chat, [10] * len(chat)).replaced]["role"] == "user"  # a chat is still cut at a user
    msgs = loop(20)
    plan = s.plan("s", msgs, [10] * len(msgs))
    assert plan.replaced > 0 and msgs[plan.replaced]["role"] == "assistant"
    assert plan.messages[:2] == (SYSTEM, {"role": "user", "content": WINDOW_NOTE})
    assert plan.messages[2:] == tuple(msgs[plan.replaced:]) and template_accepts(list(plan.messages))


def test_a_summary_call_cut_to_the_context_starts_at_a_turn_group():
    s = store()
    msgs = loop(40)
    job = s.plan("s", msgs, [10] * len(msgs), None, input_limit=300).job
    assert job is not None and s.counters["summary_inputs_cut"] == 1
    first = job.prompt[1]  # after the system message: the note that earlier turns are left out, then a whole group
    assert first == {"role": "user", "content": WINDOW_NOTE} and job.prompt[2]["role"] == "assistant"
    assert template_accepts(list(job.prompt))
