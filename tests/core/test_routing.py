"""The session router's policy with fake replicas: ring stability, bounded load, slots, KV preference, failover."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvsched.core.routing import (
    NoLiveReplicas,
    RouterConfig,
    RouteReason,
    RoutingConfigError,
    SessionRouter,
    load_bound,
)
from kvsched.core.routing_ring import HashRing, SlotName, slot_name

SLOTS = [slot_name(i) for i in range(8)]
SESSIONS = [f"wf{i}/agent-{i % 5}" for i in range(2000)]


def router(slots: list[SlotName] = SLOTS, **kw: object) -> SessionRouter:
    r = SessionRouter(RouterConfig(**kw))  # type: ignore[arg-type]
    r.set_live(slots)
    return r


def idle_assignment(r: SessionRouter) -> dict[str, SlotName]:
    return {s: r.route(s, {}).slot for s in SESSIONS}


def settled(r: SessionRouter, kv: dict[str, SlotName] | None = None) -> dict[str, SlotName]:
    """Every session routed once and recorded (it lives where it went)."""
    out = {}
    for s in SESSIONS:
        d = r.route(s, {}, kv_slots=[kv[s]] if kv else ())
        r.record(d)
        out[s] = d.slot
    return out


def test_ring_is_the_same_whatever_the_insertion_order() -> None:
    a, b = HashRing(SLOTS), HashRing(reversed(SLOTS))
    assert [a.owner(s) for s in SESSIONS] == [b.owner(s) for s in SESSIONS]
    assert set(Counter(a.owner(s) for s in SESSIONS)) == set(SLOTS)  # every slot owns something


def test_removing_a_slot_moves_only_its_keys_and_adding_one_takes_only_keys_for_it() -> None:
    ring = HashRing(SLOTS)
    before = {s: ring.owner(s) for s in SESSIONS}
    ring.remove(SLOTS[3])
    after = {s: ring.owner(s) for s in SESSIONS}
    assert {s for s in SESSIONS if before[s] != after[s]} == {s for s in SESSIONS if before[s] == SLOTS[3]}
    ring.add(SLOTS[3])
    ring.add(slot_name(8))
    grown = {s: ring.owner(s) for s in SESSIONS}
    moved = {s for s in SESSIONS if grown[s] != before[s]}
    assert moved and all(grown[s] == slot_name(8) for s in moved)


def test_walk_visits_every_slot_once_owner_first() -> None:
    ring = HashRing(SLOTS)
    for s in SESSIONS[:50]:
        order = list(ring.walk(s))
        assert sorted(order) == sorted(SLOTS) and order[0] == ring.owner(s)


def test_idle_router_sends_each_session_home() -> None:
    r = router()
    assert all(r.route(s, {}).slot == r.home(s) for s in SESSIONS)
    assert {r.route(s, {}).reason for s in SESSIONS} == {RouteReason.HOME}


def test_bounded_load_under_skew_never_exceeds_the_bound() -> None:
    """Heavy-tailed sessions, requests held in flight: after every placement no replica is above the bound."""
    r = router(load_factor=1.25)
    rng = random.Random(7)
    weights = [1.0 / (i + 1) ** 1.2 for i in range(len(SESSIONS))]
    loads: Counter[SlotName] = Counter()
    in_flight: list[SlotName] = []
    for _ in range(5000):
        if in_flight and rng.random() < 0.48:
            loads[in_flight.pop(rng.randrange(len(in_flight)))] -= 1
        sid = rng.choices(SESSIONS, weights)[0]
        total = sum(loads.values())
        d = r.route(sid, loads)
        r.record(d)
        loads[d.slot] += 1
        in_flight.append(d.slot)
        assert loads[d.slot] <= load_bound(total, len(SLOTS), 1.25)
    assert sum(loads.values()) > 50  # the bound was exercised at a real load


def test_overflow_goes_to_the_next_slot_on_the_ring() -> None:
    r = router()
    sid = SESSIONS[0]
    home, successor = list(r._ring.walk(sid))[:2]
    loads = {s: 10 for s in SLOTS} | {home: 13}  # bound = ceil(1.25 * 84 / 8) = 14: home would go to 14... fits
    assert r.route(sid, loads).slot == home
    loads[home] = 14
    d = r.route(sid, loads)
    assert (d.slot, d.reason, d.home) == (successor, RouteReason.OVERFLOW, home)


def test_load_floor_lets_a_replica_hold_that_many_whatever_the_average() -> None:
    sid = SESSIONS[0]
    home = router().home(sid)
    loads = {home: 2}  # bound = ceil(1.25 * 3 / 8) = 1: a third request spills without a floor
    assert router().route(sid, loads).slot != home
    assert router(load_floor=3).route(sid, loads).slot == home
    assert router(load_floor=3).route(sid, {home: 3}).slot != home


def test_kv_preference_keeps_a_session_where_its_kv_is_while_within_bound() -> None:
    r = router()
    sid = SESSIONS[1]
    home = r.home(sid)
    holder = next(s for s in SLOTS if s != home)
    d = r.route(sid, {}, kv_slots=[holder])
    assert (d.slot, d.reason) == (holder, RouteReason.KV)
    busy = {s: 4 for s in SLOTS} | {holder: 6}  # bound = ceil(1.25 * 35 / 8) = 6: holder is full
    assert r.route(sid, busy, kv_slots=[holder]).slot == home
    assert router(kv_preference=False).route(sid, {}, kv_slots=[holder]).slot == home


def test_kv_report_from_a_dead_or_unknown_slot_is_ignored() -> None:
    r = router()
    sid = SESSIONS[2]
    other = next(s for s in SLOTS if s != r.home(sid))
    r.mark_down(other)
    assert r.route(sid, {}, kv_slots=[other, SlotName("slot-99")]).slot == r.home(sid)


def test_dead_slot_sessions_fail_over_to_ring_successors_and_nobody_else_moves() -> None:
    r = router()
    before = settled(r)
    dead = SLOTS[5]
    r.mark_down(dead)
    after = {}
    for s in SESSIONS:
        d = r.route(s, {})
        r.record(d)
        after[s] = d
    for s in SESSIONS:
        if before[s] == dead:
            walk = list(r._ring.walk(s))
            assert after[s].slot == next(x for x in walk if x != dead) and after[s].reason == RouteReason.FAILOVER
        else:
            assert after[s].slot == before[s]


def test_failed_over_sessions_go_back_only_to_the_replica_they_left_or_to_a_slot_reporting_their_kv() -> None:
    """Changed on purpose (found by review, repro_replacement_return.py): this test pinned that a replacement in the
    dead slot took every failed-over session back even with its KV elsewhere. A replacement is a new engine with an
    empty cache, and the sessions had rebuilt their KV on the successors they failed over to: going back cost each a
    second full prefill. Now a session goes back only to the replica it left (the same holder: back after a blip,
    its cache intact) or to a slot whose new replica reports its KV; otherwise it stays where it lives."""
    first = {s: f"{s}@1" for s in SLOTS}
    r = SessionRouter(RouterConfig())
    r.set_live(SLOTS, first)
    before = settled(r)
    dead = SLOTS[2]
    r.set_live([s for s in SLOTS if s != dead])
    during = settled(r)
    moved = sorted(s for s in SESSIONS if during[s] != before[s])
    assert set(moved) == {s for s in SESSIONS if before[s] == dead}
    r.set_live(SLOTS, first | {dead: f"{dead}@2"})  # a replacement: a new replica in the same slot
    reported = set(moved[::2])  # it reports the KV of some (fetched from a shared store, say)
    after = {s: r.route(s, {}, kv_slots=[dead] if s in reported else [during[s]]) for s in SESSIONS}
    assert all(after[s].slot == (dead if s in reported else during[s]) for s in SESSIONS)
    assert {s for s in SESSIONS if after[s].reason == RouteReason.RETURN} == reported
    # The replica that left is back instead (same holder): every failed-over session returns, even while the
    # successor's KV report lags behind.
    r.set_live(SLOTS, first)
    assert all(r.route(s, {}, kv_slots=[during[s]]).slot == before[s] for s in SESSIONS)


def test_scale_up_moves_only_sessions_without_kv_elsewhere_to_the_new_slot() -> None:
    r = router()
    before = idle_assignment(r)
    r.set_live([*SLOTS, slot_name(8)])
    held = {s: r.route(s, {}, kv_slots=[before[s]]).slot for s in SESSIONS}
    assert held == before  # KV preference: nobody leaves KV behind on scale-up
    fresh = {s: r.route(s, {}).slot for s in SESSIONS}
    assert {fresh[s] for s in SESSIONS if fresh[s] != before[s]} == {slot_name(8)}


def test_forgotten_slot_rehomes_its_sessions() -> None:
    r = router()
    gone = SLOTS[0]
    r.forget(gone)
    assert gone not in r.known and all(r.route(s, {}).reason == RouteReason.HOME for s in SESSIONS)


def test_sessionless_requests_go_to_the_least_loaded_replica() -> None:
    r = router(SLOTS[:3])
    d = r.route(None, {SLOTS[0]: 3, SLOTS[1]: 1, SLOTS[2]: 2})
    assert (d.slot, d.reason) == (SLOTS[1], RouteReason.LEAST_LOADED)


def test_no_live_replica_is_a_typed_error() -> None:
    r = router()
    r.set_live([])
    with pytest.raises(NoLiveReplicas):
        r.route("s", {})


@pytest.mark.parametrize("kw", [{"load_factor": 1.0}, {"load_factor": float("nan")}, {"load_factor": "2"},
                                {"virtual_nodes": 0}, {"virtual_nodes": 2.5}, {"session_memory": -1},
                                {"load_floor": -1}, {"load_floor": 1.5}])
def test_bad_router_config_is_a_typed_error(kw: dict[str, object]) -> None:
    with pytest.raises(RoutingConfigError):
        RouterConfig(**kw)  # type: ignore[arg-type]


def test_session_failed_over_from_an_overflow_replica_returns_there_when_it_is_back() -> None:
    """A session living off its home (overflow, KV kept there) whose replica dies moves, and moves back on return."""
    r = router()
    sid = SESSIONS[3]
    home = r.home(sid)
    holder = next(s for s in SLOTS if s != home)
    r.record(r.route(sid, {}, kv_slots=[holder]))  # lives on `holder` now
    r.set_live([s for s in SLOTS if s != holder])
    d = r.route(sid, {})
    assert (d.reason, d.failed_over_from) == (RouteReason.FAILOVER, holder) and d.slot != holder
    r.record(d)
    assert r.route(sid, {}).slot == d.slot  # stays where its KV now is
    r.set_live(SLOTS)
    back = r.route(sid, {}, kv_slots=[d.slot])
    assert (back.slot, back.reason) == (holder, RouteReason.RETURN)
    r.record(back)
    assert r.route(sid, {}).slot == holder and r.route(sid, {}).reason == RouteReason.KV


def test_session_memory_is_bounded() -> None:
    r = router(session_memory=10)
    for s in SESSIONS[:50]:
        r.record(r.route(s, {}))
    assert len(r._last) == 10


def test_the_newest_placement_beats_an_older_pin_still_reported_elsewhere() -> None:
    r = router()
    sid = SESSIONS[4]
    home = r.home(sid)
    full = {s: 4 for s in SLOTS} | {home: 6}  # bound = ceil(1.25 * 35 / 8) = 6: home is full
    d = r.route(sid, full, kv_slots=[home])
    assert d.slot != home
    r.record(d)
    # home has room again and still reports its (older) pin; the newer KV is where the last turn ran
    assert r.route(sid, {}, kv_slots=[home, d.slot]).slot == d.slot
    assert r.route(sid, {}, kv_slots=[home]).slot == d.slot


# ---- sessions as residents: placement bound, floor, idle expiry, session end -------------------------------------
TWO = [slot_name(0), slot_name(1)]


def test_placement_bounds_the_sessions_living_on_each_replica() -> None:
    """Sessions are placed within ceil(c * (S + 1) / n) residents per replica, whatever their hashes: 16 sessions
    homed on one of two replicas, at most 10 stay there (max/mean 1.25)."""
    r = router(TWO)
    sessions = [s for s in SESSIONS if r.home(s) == TWO[0]][:16]  # all homed on one replica
    for n, sid in enumerate(sessions, start=1):
        r.record(r.route(sid, {}))
        assert max(r.residents().values()) <= load_bound(n - 1, 2, 1.25)
    assert sum(r.residents().values()) == 16 and max(r.residents().values()) <= 10


def burst_affinity(**kw: object) -> float:
    """16 sessions on two replicas, requests held in flight in small random bursts (a handful at a time, as a
    lightly loaded real deployment sees them): the share of follow-up turns that stay where the session lives."""
    r = router(TWO, **kw)
    rng = random.Random(3)
    sessions = [f"wf{i}/worker-{i % 3}" for i in range(16)]
    where: dict[str, SlotName] = {}
    hits = follow_ups = 0
    for _ in range(400):
        loads: Counter[SlotName] = Counter()
        for sid in rng.sample(sessions, rng.randint(1, 6)):
            d = r.route(sid, loads)
            r.record(d)
            loads[d.slot] += 1
            if sid in where:
                follow_ups += 1
                hits += d.slot == where[sid]
            where[sid] = d.slot
    return hits / follow_ups


def test_at_a_handful_of_requests_the_bound_alone_moves_sessions_and_the_floor_keeps_them() -> None:
    assert burst_affinity() < 0.97  # the real 2-replica failure mode, in the policy alone (0.949)
    assert burst_affinity(load_floor=8) == 1.0


def test_a_replica_over_the_floor_and_the_bound_still_sheds_a_session() -> None:
    sid = "wf1/worker"
    for floor, stays, moves in ((4, 3, 4), (0, 1, 2)):  # the bound alone: ceil(1.25 * (L + 1) / 2) with L in flight
        r = router(TWO, load_floor=floor)
        d = r.route(sid, {})
        r.record(d)
        other = next(s for s in TWO if s != d.slot)
        assert r.route(sid, {d.slot: stays}).slot == d.slot
        assert r.route(sid, {d.slot: moves}).slot == other


def test_idle_sessions_stop_living_on_their_replica(clock: object) -> None:
    r = SessionRouter(RouterConfig(session_idle_s=60), clock=clock)  # type: ignore[arg-type]
    r.set_live(TWO)
    r.record(r.route("a", {}))
    clock.advance(30)  # type: ignore[attr-defined]
    r.record(r.route("b", {}))
    assert sum(r.residents().values()) == 2
    clock.advance(45)  # type: ignore[attr-defined]
    assert sum(r.residents().values()) == 1 and r.last_slot("a") is None and r.last_slot("b") is not None


def test_an_idle_session_forgets_the_dead_slot_it_failed_over_from(clock: object) -> None:
    """Found by review: idle expiry left the failed-over-from entry behind (growing to its cap), and the session,
    back after hours, was pulled to that slot's replacement, away from where its KV was."""
    r = SessionRouter(RouterConfig(session_idle_s=60), clock=clock)  # type: ignore[arg-type]
    r.set_live(TWO)
    home = r.route("a", {}).slot
    r.record(r.route("a", {}))
    r.mark_down(home)
    r.record(r.route("a", {}))  # failed over
    assert r._displaced
    clock.advance(61)  # type: ignore[attr-defined]
    r.residents()  # any call that expires
    r.route("b", {})
    assert r._displaced == {} and r.last_slot("a") is None


def test_an_ended_session_lives_nowhere() -> None:
    r = router(TWO)
    r.record(r.route("a", {}))
    r.forget_session("a")
    assert r.residents() == {} and r.last_slot("a") is None


def test_session_memory_cap_keeps_the_resident_counts_exact() -> None:
    r = router(session_memory=10)
    for s in SESSIONS[:50]:
        r.record(r.route(s, {}))
    assert sum(r.residents().values()) == 10


def test_a_slot_that_failed_a_request_is_avoided_for_it_and_the_session_returns_after() -> None:
    r = router(TWO)
    sid = "wf2/worker"
    first = r.route(sid, {})
    r.record(first)
    other = next(s for s in TWO if s != first.slot)
    retry = r.route(sid, {}, unavailable=[first.slot])
    assert (retry.slot, retry.reason, retry.failed_over_from) == (other, RouteReason.FAILOVER, first.slot)
    r.record(retry)
    back = r.route(sid, {})
    assert (back.slot, back.reason) == (first.slot, RouteReason.RETURN)
    with pytest.raises(NoLiveReplicas):
        r.route(sid, {}, unavailable=TWO)


def test_a_ring_built_at_once_is_the_ring_built_slot_by_slot():
    """The constructor sorts all points once (adding 100,000 slots one by one was quadratic: found by review); the
    ring must be the same, points, owners and every key's owner, as `add` builds it."""
    from kvsched.core.routing_ring import HashRing

    names = [f"slot-{i}" for i in range(50)]
    built = HashRing(names, virtual_nodes=20)
    grown = HashRing(virtual_nodes=20)
    for n in reversed(names):
        grown.add(n)
    assert built._points == grown._points and built._owners == grown._owners
    assert all(built.owner(f"s{k}") == grown.owner(f"s{k}") for k in range(500))
