"""The owner index the session routes read (kvsched.core.session_index), over the real retention policy: it must list
exactly each owner's sessions whatever the policy did meanwhile, and cost the owner's sessions, not the table's."""

from __future__ import annotations

import random

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.session_index import SessionIndex
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

OWNERS = [(t, s) for t in (None, "t1", "t2") for s in (None, "salt")]


def policy(max_sessions: int = 100_000) -> tuple[RetentionPolicy, list[float]]:
    now = [0.0]
    return RetentionPolicy(RetentionConfig(max_sessions=max_sessions), lambda: now[0], 1000, 1000.0), now


def owned_by_scan(pol: RetentionPolicy, owner: tuple[str | None, str | None]) -> set[SessionKey]:
    return {k for k in pol.sessions if (k.tenant, k.cache_salt) == owner}


def test_the_tables_order_is_its_records_activity():
    """What `SessionIndex.sync` relies on: records added or touched go to the end with a higher activity. A change to
    RetentionPolicy that breaks this makes the index miss new sessions: this test says so first."""
    pol, now = policy(max_sessions=30)
    rng = random.Random(3)
    for step in range(3000):
        now[0] += rng.random()
        t, s = rng.choice(OWNERS)
        key = SessionKey(SessionId(f"s{rng.randrange(60)}"), s, t, rng.randrange(2))
        _random_event(pol, key, rng)
        activities = [r.activity for r in pol.sessions.values()]
        assert activities == sorted(activities) and len(set(activities)) == len(activities), step


def _random_event(pol: RetentionPolicy, key: SessionKey, rng: random.Random) -> None:
    what = rng.random()
    if what < 0.35:
        pol.request_arrived(key, TurnHints())
        pol.turn_started(key, 0)
        pol.turn_finished(key, TurnHints(end=rng.random() < 0.1), 64, rng.randrange(0, 5))
    elif what < 0.5:
        pol.request_arrived(key, TurnHints())
    elif what < 0.6:
        pol.request_abandoned(key)
    elif what < 0.7:
        pol.end(key)
    elif what < 0.8:
        pol.expire()
    else:
        pol.turn_started(key, 16)
        pol.turn_finished(key, TurnHints(), 32, 2)


def test_the_index_lists_each_owners_sessions_exactly_through_any_events():
    pol, now = policy(max_sessions=40)
    index = SessionIndex(pol)
    rng = random.Random(7)
    for step in range(4000):
        now[0] += rng.random() * 5
        t, s = rng.choice(OWNERS)
        _random_event(pol, SessionKey(SessionId(f"s{rng.randrange(80)}"), s, t), rng)
        if step % 7 == 0:  # looked up now and then: several changes between looks
            for owner in OWNERS:
                assert set(index.owned(*owner)) == owned_by_scan(pol, owner), (step, owner)
    assert len(index) <= 2 * len(pol.sessions) + SessionIndex.REBUILD_SLACK


def test_a_lookup_costs_the_changes_since_the_last_one_not_the_table():
    """Found by review: a list, summary or delete from a key with no sessions walked all of them (20,000 here)."""
    pol, now = policy()
    for i in range(20_000):
        pol.request_arrived(SessionKey(SessionId(f"v{i}"), None, "victim"), TurnHints())
    index = SessionIndex(pol)
    assert index.rebuilds == 1 and index.owned("attacker", None) == []
    for _ in range(100):
        assert index.sync() == 0 and index.owned("attacker", None) == []
    pol.request_arrived(SessionKey(SessionId("new"), None, "attacker"), TurnHints())
    pol.turn_started(SessionKey(SessionId("v5"), None, "victim"), 0)  # an old session active again
    assert index.sync() == 2 and index.rebuilds == 1
    assert index.owned("attacker", None) == [SessionKey(SessionId("new"), None, "attacker")]
    assert len(index.owned("victim", None)) == 20_000


def test_ended_sessions_leave_the_index_and_a_churned_table_is_rebuilt_not_grown():
    pol, now = policy()
    index = SessionIndex(pol)
    for i in range(5000):
        key = SessionKey(SessionId(f"c{i}"), None, "t1")
        pol.request_arrived(key, TurnHints())
        pol.request_abandoned(key)
        index.sync()
        pol.end(key)
    assert index.owned("t1", None) == [] and len(pol.sessions) == 0
    assert len(index) <= SessionIndex.REBUILD_SLACK + 1 and index.rebuilds >= 2
