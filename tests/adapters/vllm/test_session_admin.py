"""The engine side of the session routes (session_admin.py) on the real retention policy: a tenant's list, summary,
pinned ids and deletes cost its own sessions, not the table's; a page can carry the stats in the same call."""

from __future__ import annotations

from collections import OrderedDict

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.session_admin import handle_admin
from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from kvsched.core.tenancy import Caller


class Table(OrderedDict):
    """The policy's session table, counting the walks over all of it."""

    walks = 0


def _counting(name: str):
    def walk(self, *args):
        Table.walks += 1
        return getattr(super(Table, self), name)(*args)
    return walk


for _name in ("__iter__", "items", "values", "keys"):
    setattr(Table, _name, _counting(_name))


class Pins:
    def __init__(self, sessions: int) -> None:
        self.policy = RetentionPolicy(RetentionConfig(), lambda: 0.0, 1000, 1000.0)
        self.policy.sessions = Table()
        self.pinned: dict = {}
        for i in range(sessions):
            self.add(SessionKey(SessionId(f"v{i:05d}"), None, "victim"))

    def add(self, key: SessionKey) -> None:
        self.policy.request_arrived(key, TurnHints())
        self.policy.request_abandoned(key)  # idle: an end forgets it

    def _end(self, key: SessionKey) -> None:
        self.policy.end(key)

    def stats(self) -> dict[str, float]:
        return {"active_sessions": len(self.policy.sessions)}


def call(pins: Pins, op: str, *args):
    return handle_admin(pins, op, ({compat.PACKED_ARGS: list(args)},))


def test_a_tenants_session_calls_do_not_walk_the_whole_table():
    """Found by review: every call from any key walked every session on the engine-core thread (tokens/s 215 -> 0.2
    under 32 connections of ?summary=1 at 20,000 sessions, from a key with no sessions of its own)."""
    pins = Pins(5000)
    attacker, victim = Caller(tenant="attacker").as_args(), Caller(tenant="victim").as_args()
    assert call(pins, "list", attacker, 100, None, True)["summary"]["sessions"] == 0  # the first call indexes once
    Table.walks = 0
    for _ in range(20):
        assert call(pins, "list", attacker, 100, None, False)["total"] == 0
        assert call(pins, "list", attacker, 100, None, True)["summary"]["sessions"] == 0
        assert call(pins, "list", attacker, 100, None, "pinned_ids") == {"pinned_session_ids": []}
        assert call(pins, "end", "v00001", attacker) == {"ended": 0}
        assert call(pins, "end_all", attacker) == {"ended": 0}
    assert Table.walks == 0
    assert call(pins, "list", victim, 1000, None, True)["summary"]["sessions"] == 5000  # its own: all of them
    assert call(pins, "end", "v00001", victim) == {"ended": 1}
    assert call(pins, "list", victim, 1000, None, False)["total"] == 4999 and Table.walks == 0


def test_an_admin_still_sees_every_tenant():
    pins = Pins(30)
    pins.add(SessionKey(SessionId("x"), "salt", "other"))
    admin = Caller(admin=True).as_args()
    assert call(pins, "list", admin, 100, None, True)["summary"]["sessions"] == 31
    narrowed = Caller(admin=True, cache_salt="salt", salt_given=True).as_args()
    assert [r["session_id"] for r in call(pins, "list", narrowed, 100, None, False)["sessions"]] == ["x"]
    assert call(pins, "end_all", admin) == {"ended": 31} and len(pins.policy.sessions) == 0


def test_a_page_carries_the_stats_when_asked_in_the_same_call():
    """The API server asked for a page, then for the stats: two engine calls per list (found by review)."""
    pins = Pins(3)
    victim = Caller(tenant="victim").as_args()
    page = call(pins, "list", victim, 2, None, False, True)
    assert page["stats"] == {"active_sessions": 3} and len(page["sessions"]) == 2 and page["next_cursor"]
    assert "stats" not in call(pins, "list", victim, 2, None, False)  # an older caller's four arguments
    assert "stats" not in call(pins, "list", victim, 2, None, True, True)  # a summary: counts only
