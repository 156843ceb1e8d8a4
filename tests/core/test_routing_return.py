"""When a failed-over session goes back to the slot it left: on the turn right after the failover, by each of the
three reasons `SessionRouter.route` has (the same replica is back, the slot reports its KV, the replica it went to is
over the resident bound), and never once it has run a turn where it went (found by review: a session that had lived
20 turns on the other replica jumped back, away from the KV it had built there)."""

from __future__ import annotations

import pytest

from kvsched.core.routing import RouterConfig, RouteReason, SessionRouter
from kvsched.core.routing_ring import SlotName, slot_name

A, B = slot_name(0), slot_name(1)
FIRST = {A: "a@1", B: "b@1"}
SESSIONS = [f"wf{i}/worker" for i in range(40)]


def failed_over(turns_after: int) -> tuple[SessionRouter, list[str]]:
    """Eight sessions placed on A and B, then A down and the next turn of each of A's failed over to B, then
    `turns_after` turns of each of those on B (A still down)."""
    r = SessionRouter(RouterConfig())
    r.set_live([A, B], FIRST)
    for sid in SESSIONS[:8]:
        r.record(r.route(sid, {}))
    on_a = [s for s in SESSIONS[:8] if r.last_slot(s) == A]
    assert len(on_a) >= 3 and sum(r.residents().values()) == 8
    r.set_live([B])
    for sid in on_a:
        d = r.route(sid, {})
        assert (d.slot, d.reason, d.failed_over_from) == (B, RouteReason.FAILOVER, A)
        r.record(d)
    for _ in range(turns_after):
        for sid in on_a:
            d = r.route(sid, {})
            assert (d.slot, d.failed_over_from) == (B, None)
            r.record(d)
    return r, on_a


def back(r: SessionRouter, why: str) -> dict[str, list[SlotName]]:
    """A is live again for `why`: the same replica (a blip), or a replacement that reports the sessions' KV, or a
    replacement that reports nothing (B then holds all eight sessions: over the resident bound of 5)."""
    r.set_live([A, B], FIRST if why == "same replica" else FIRST | {A: "a@2"})
    return {"kv": [A]} if why == "kv report" else {}


@pytest.mark.parametrize("why", ["same replica", "kv report", "rebalance"])
def test_the_turn_right_after_a_failover_may_go_back(why: str) -> None:
    r, on_a = failed_over(turns_after=0)
    kv = back(r, why).get("kv", [])
    went = [r.route(s, {}, kv_slots=kv) for s in on_a]
    returned = [d for d in went if d.reason == RouteReason.RETURN]
    assert all(d.slot == A for d in returned)
    assert len(returned) == len(on_a)  # (nothing recorded: each alone would rebalance B)
    r.record(went[0])
    assert r.route(on_a[0], {}).slot == A  # back where its older KV is, and lives there now


@pytest.mark.parametrize("why", ["same replica", "kv report", "rebalance"])
@pytest.mark.parametrize("turns_after", [1, 20])
def test_a_session_that_ran_a_turn_where_it_failed_over_to_stays_there(why: str, turns_after: int) -> None:
    r, on_a = failed_over(turns_after)
    kv = back(r, why).get("kv", [])
    for sid in on_a:
        d = r.route(sid, {}, kv_slots=kv)
        assert (d.slot, d.reason) == (B, RouteReason.KV), sid
        r.record(d)
    assert r._displaced == {}


def on_three_slots_home_down() -> tuple[SessionRouter, str, str]:
    """Three live slots (A, B and a third, returned), a session that ran a turn on its home A, and A down."""
    c = slot_name(2)
    r = SessionRouter(RouterConfig())
    r.set_live([A, B, c], FIRST | {c: "c@1"})
    sid = next(s for s in SESSIONS if r.home(s) == A)
    r.record(r.route(sid, {}))
    r.mark_down(A)
    return r, sid, c


def test_a_session_failed_over_twice_goes_back_only_to_the_slot_it_left_last() -> None:
    """A -> B (failover), a turn on B, then B fails it -> C: it may go back to B on the next turn, never to A."""
    r, sid, c = on_three_slots_home_down()
    r.record(r.route(sid, {}))  # failover A -> somewhere
    there = r.last_slot(sid)
    assert there != A
    r.record(r.route(sid, {}))  # a turn there: the note about A is gone
    r.set_live([A, B, c])  # A back (the same replica)
    d = r.route(sid, {}, unavailable=[there])
    assert d.failed_over_from == there and d.slot != there
    r.record(d)
    assert r.route(sid, {}).slot == there and r.route(sid, {}).reason == RouteReason.RETURN


def test_a_turn_sent_elsewhere_after_the_failover_also_keeps_the_session_from_going_back() -> None:
    """The turn after the failover overflowed off the busy replica it went to: its newest KV is on a third one, and
    it does not go back to the one it left once that is back."""
    r, sid, c = on_three_slots_home_down()
    went = r.route(sid, {})
    r.record(went)
    other = next(s for s in (B, c) if s != went.slot)
    d = r.route(sid, {went.slot: 10})  # busy: over the in-flight bound
    assert (d.slot, d.failed_over_from) == (other, None)
    r.record(d)
    r.set_live([A, B, c])  # the same replica back
    assert (r.route(sid, {}).slot, r.route(sid, {}).reason) == (other, RouteReason.KV)


@pytest.mark.parametrize("replaced", [False, True])
def test_a_session_whose_replica_is_replaced_before_its_next_turn_goes_where_its_kv_is(replaced: bool) -> None:
    """A session's newest KV was on A (it overflowed there from B, where older turns left KV). A dies and, before the
    session's next turn, comes back: the same replica (a blip, its cache intact) keeps the session; a replacement (an
    empty cache) does not: the session lived on the replica that died, and goes where its KV is reported. Found reading
    an AVX2 host's Ray kill-test failure: a replacement up before a dead replica's session turned again was taken for
    the replica the session lived on, ahead of any KV report elsewhere."""
    r = SessionRouter(RouterConfig())
    r.set_live([A, B], FIRST)
    sid = next(s for s in SESSIONS if r.home(s) == B)
    r.record(r.route(sid, {}))
    d = r.route(sid, {B: 10})  # B busy: over the in-flight bound
    assert (d.slot, d.reason) == (A, RouteReason.OVERFLOW)
    r.record(d)
    r.set_live([B])  # A dies before the session's next turn
    r.set_live([A, B], FIRST | ({A: "a@2"} if replaced else {}))
    assert r.residents() == {A: 1}  # it counts there until it turns (most sessions of a dead replica come back)
    d = r.route(sid, {}, kv_slots=[B])
    assert (d.slot, d.reason) == ((B, RouteReason.HOME) if replaced else (A, RouteReason.KV))
    r.record(d)
    assert r.residents() == {d.slot: 1} and r.route(sid, {}, kv_slots=[B]).slot == d.slot


def test_the_dead_replicas_sessions_count_on_its_replacement_so_the_failed_over_ones_keep_their_kv() -> None:
    """Six sessions on each of A and B; A dies and two of its sessions fail over to B (eight there); a replacement
    takes A before the others turn again. Counting A's four as the replacement's residents, B is within the resident
    bound (ceil(1.25 * 12 / 2) = 8) and the two stay with the KV they rebuilt on B; counted nowhere, B looked over
    the bound (8 of 8 live residents) and both went back to the empty replacement."""
    r = SessionRouter(RouterConfig())
    r.set_live([A, B], FIRST)
    homed = {x: [s for s in SESSIONS if r.home(s) == x][:6] for x in (A, B)}
    for pair in zip(homed[A], homed[B], strict=True):  # in turns: each within the resident bound at home
        for sid in pair:
            r.record(r.route(sid, {}))
    assert r.residents() == {A: 6, B: 6}
    r.set_live([B])
    for sid in homed[A][:2]:
        r.record(r.route(sid, {}))
    r.set_live([A, B], FIRST | {A: "a@2"})
    assert r.residents() == {A: 4, B: 8}
    went = [r.route(sid, {}) for sid in homed[A][:2]]
    assert [(d.slot, d.reason) for d in went] == [(B, RouteReason.KV)] * 2


def test_a_session_placed_before_its_replicas_were_named_still_leaves_a_replacement() -> None:
    """The router learns which replica holds each slot (`set_live`'s holders) after a session was placed: the first
    holders named are the replicas it was placed on, so it stays (a replacement is a holder changing, not the first
    one named); the next holder of its slot is a replacement, and its next turn goes where its KV is reported."""
    r = SessionRouter(RouterConfig())
    r.set_live([A, B])  # no holders yet
    sid = next(s for s in SESSIONS if r.home(s) == A)
    r.record(r.route(sid, {}))
    r.set_live([A, B], FIRST)
    assert (r.route(sid, {}, kv_slots=[B]).slot, r.last_slot(sid)) == (A, A)
    r.set_live([A, B], FIRST | {A: "a@2"})
    d = r.route(sid, {}, kv_slots=[B])
    assert (d.slot, d.reason) == (B, RouteReason.KV)
