"""Edges of matching and of reporting a summary that the review's mutation testing found untested: a request ending
exactly where a summary ends, a summary landing for a job no longer pending, and a summary clearing a failure."""

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, Strategy

SYSTEM = {"role": "system", "content": "agent"}


def store(clock):
    return CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=100, summary_target_tokens=20,
                                            keep_recent_messages=2, message_overhead_tokens=0, retry_after_s=30.0),
                           clock)


def chat(name: str, turns: int) -> list[dict[str, str]]:
    return [SYSTEM, *({"role": r, "content": f"{name} {r} {i}"} for i in range(turns) for r in ("user", "assistant")),
            {"role": "user", "content": f"{name} next"}]


def plan(s, msgs, session="u"):
    return s.plan(session, msgs, [10] * len(msgs))


def test_a_request_ending_exactly_where_a_summary_ends_is_served_whole(clock):
    s = store(clock)
    msgs = chat("a", 8)
    job = plan(s, msgs).job
    s.commit(job, "summary", 5)
    upto = msgs[: job.cut]  # exactly the messages the summary stands for (a retry of an earlier turn)
    served = plan(s, upto)
    assert served.replaced == 0 and served.messages == tuple(upto)  # its newest message is never dropped
    assert plan(s, msgs[: job.cut + 1]).replaced == job.cut  # one message more: the summary serves it


def test_a_summary_for_a_job_no_longer_pending_is_dropped_though_the_session_lives_on(clock):
    s = store(clock)
    a, b = chat("a", 8), chat("b", 8)
    s.commit(plan(s, b).job, "b's summary", 5)  # the id's other conversation keeps the session's state
    job = plan(s, a).job
    assert not s.forget("u", a)  # a ends while its call runs; b's summary keeps the state
    assert s.commit(job, "a's summary", 5) is None and s.counters["summaries_dropped"] == 1
    again = plan(s, a).job  # a begins again: a new job ...
    longer = chat("a", 9)
    assert again is not None and plan(s, longer).job is None
    s.forget("u", a)
    newer = plan(s, longer).job  # ... ended too, and another for a longer history: the older job's result is stale
    assert s.commit(again, "stale", 5) is None and s.counters["summaries_dropped"] == 2
    assert s.commit(newer, "a's summary", 5) is not None


def test_a_stored_summary_clears_its_conversations_failure_clock(clock):
    s = store(clock)
    a = chat("a", 8)
    s.commit(plan(s, chat("b", 8)).job, "b's summary", 5)  # keeps the session's state through a's end
    first = plan(s, a).job
    s.forget("u", a)
    second = plan(s, chat("a", 9)).job  # the conversation begins again (a turn on) while the first call still runs
    s.failed(first)  # the first call fails late: the conversation's failure clock starts
    assert s.commit(second, "a's summary", 5) is not None  # ... and the second's summary stops it
    grown = chat("a", 9) + [m for i in range(8, 20) for m in ({"role": "assistant", "content": f"x{i}"},
                                                  {"role": "user", "content": f"y{i}"})]
    assert plan(s, grown).job is not None  # summarised again at once, not 30 s later
