"""The store's bound never drops a session whose summary call runs (found by review, /tmp/rev_compaction/p4_lru_dup.py:
evicting it made its next request start a second call for the same summary, and the first's result was dropped)."""

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, Strategy

SYSTEM = {"role": "system", "content": "agent"}


def long_chat() -> list[dict[str, str]]:
    return [SYSTEM, *({"role": r, "content": f"{r} {i}"} for i in range(8) for r in ("user", "assistant")),
            {"role": "user", "content": "next"}]


def test_a_session_with_a_call_under_way_outlives_the_lru_bound(clock):
    s = CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=40, summary_target_tokens=10,
                                         keep_recent_messages=2, message_overhead_tokens=0, max_sessions=2), clock)
    msgs = long_chat()
    job = s.plan("A", msgs, [10] * len(msgs)).job
    assert job is not None
    short = [SYSTEM, {"role": "user", "content": "hi"}]
    for other in ("B", "C", "D"):  # A is the least recently used, but its call runs
        s.plan(other, short, [1, 1])
    assert list(s.sessions) == ["A", "D"]  # B and C went instead
    assert s.plan("A", msgs, [10] * len(msgs)).job is None  # no second call for the same summary
    assert s.commit(job, "summary", 5) is not None and s.counters["summaries_dropped"] == 0
    assert s.plan("A", msgs, [10] * len(msgs)).replaced == job.cut
    s.plan("E", short, [1, 1])
    s.plan("F", short, [1, 1])
    assert list(s.sessions) == ["E", "F"]  # once its call landed, A goes like any other


def test_with_every_other_session_waiting_the_store_stays_over_its_bound_until_one_lands(clock):
    s = CompactionStore(CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=40, summary_target_tokens=10,
                                         keep_recent_messages=2, message_overhead_tokens=0, max_sessions=1), clock)
    msgs = long_chat()
    jobs = [s.plan(sid, msgs, [10] * len(msgs)).job for sid in ("A", "B")]
    assert all(jobs) and list(s.sessions) == ["A", "B"]
    s.commit(jobs[0], "a", 5)
    s.plan("C", msgs[:2], [1, 1])
    assert list(s.sessions) == ["B", "C"]  # A (no call left) goes; B's call still runs
