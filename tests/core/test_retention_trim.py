"""The session table's bound (`RetentionConfig.max_sessions`), kept on every record's creation by a bounded scan."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

NO_HINTS = TurnHints()


def make(clock, **overrides):
    config = replace(RetentionConfig(payback_sampling=0), **overrides)
    return RetentionPolicy(config, clock, total_blocks=1_000_000, bytes_per_token=1024.0)


def key(i: int) -> SessionKey:
    return SessionKey(SessionId(f"s{i}"))


def turn(p, k, blocks, hints=NO_HINTS):
    p.request_arrived(k, hints)
    p.turn_started(k, cached_tokens=0)
    p.turn_finished(k, hints, blocks * 16, blocks)


def test_turns_that_never_pin_keep_the_table_at_its_bound(clock):
    """Found by review: the table was trimmed only when a turn pinned, so prompts under one block, TTL 0 turns and
    aborted requests left a record each, forever (max_sessions 50: 1,300 records)."""
    p = make(clock, max_sessions=50)
    for i in range(200):
        turn(p, key(i), 0)  # under one block: nothing to pin
    for i in range(200, 400):
        turn(p, key(i), 4, TurnHints(ttl_s=0.0))  # TTL 0: nothing pinned
    for i in range(400, 600):
        p.request_arrived(key(i), NO_HINTS)
        p.request_abandoned(key(i))  # aborted before it ran
    assert len(p.sessions) == 50
    assert list(p.sessions) == [key(i) for i in range(550, 600)]  # the most recently active


def test_the_table_never_drops_a_pinned_waiting_or_running_session(clock):
    p = make(clock, max_sessions=3)
    turn(p, key(0), 4)  # pinned
    p.request_arrived(key(1), NO_HINTS)  # waiting
    p.request_arrived(key(2), NO_HINTS)
    p.turn_started(key(2), 0)  # running
    for i in range(3, 10):
        turn(p, key(i), 0)
    assert {key(0), key(1), key(2)} <= set(p.sessions) and len(p.sessions) == 4  # room for one idle record
    assert p.sessions[key(0)].pinned and p.sessions[key(1)].waiting == 1 and p.sessions[key(2)].active_requests == 1


class _Counting(OrderedDict):
    """The session table, counting the records a scan of it visits."""

    visited = 0

    def items(self):  # type: ignore[override]
        for item in super().items():
            self.visited += 1
            yield item


def test_a_new_record_at_the_bound_looks_at_a_few_records_not_the_whole_table(clock):
    """Found by review: each pinning turn at the bound built a list of the whole table (45 ms at 100,000 records)."""
    p = make(clock, max_sessions=2000)
    p.sessions = _Counting()
    for i in range(2000):
        turn(p, key(i), 0)
    p.sessions.visited = 0
    for i in range(2000, 2100):
        turn(p, key(i), 2)  # new sessions that pin
    assert len(p.sessions) == 2000 and p.sessions.visited <= 2 * 100
