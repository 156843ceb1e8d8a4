"""kvsched's Ray request router while the replica set changes, with fake running replicas (no cluster): a slot follows
its replica through Ray's rank renumbering and out-of-order scale-ups, and what the router keeps about a session
idles out with it."""

from __future__ import annotations

import asyncio

import pytest

from kvsched.core.routing_ring import slot_name
from tests.ray.test_router_units import fake_replica, new_router, pending


async def turn(r, replicas, sid: str, rid: str):  # noqa: ANN001, ANN201
    """One turn routed like Ray: choose, send to the first replica offered, complete; returns that replica."""
    chosen = (await r.choose_replicas(replicas, pending(sid, rid)))[0][0]
    r._assigned(pending(sid, rid), chosen.replica_id)
    r.on_request_completed(chosen.replica_id, rid)
    return chosen


@pytest.mark.parametrize("first_deploy", [False, True])
def test_a_scale_up_whose_higher_rank_comes_up_first_moves_no_session(first_deploy: bool) -> None:
    """Found by review: scaling 2 -> 4 with rank 3 RUNNING before rank 2, rank 3 was mapped to slot-2 and took
    sessions; when rank 2 came it was renumbered to slot-3 and those sessions followed slot-2 to the empty replica
    (also on a first deploy, or after a router restart, with ranks coming up out of order)."""
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("A", {"slot": 0}), fake_replica("B", {"slot": 1})
        if not first_deploy:
            r.update_replicas([a, b])
        d_stats: dict = {"slot": 3}
        d = fake_replica("D", d_stats)  # rank 3 is up first
        r.update_replicas([a, b, d])
        where = {f"conv-{i}": await turn(r, [a, b, d], f"conv-{i}", f"conv-{i}-1") for i in range(120)}
        on_d = [sid for sid, rep in where.items() if rep is d]
        assert on_d
        d_stats["kv_sessions"] = on_d  # D holds their KV and says so
        c = fake_replica("C", {"slot": 2})  # rank 2, a few seconds later
        r.update_replicas([a, b, d, c])
        assert (r.slot_of(d.replica_id), r.slot_of(c.replica_id)) == (slot_name(3), slot_name(2))
        for sid, rep in where.items():
            assert await turn(r, [a, b, d, c], sid, f"{sid}-2") is rep, sid

    asyncio.run(run())


def test_a_survivor_renumbered_by_ray_after_a_scale_down_keeps_its_slot_and_sessions() -> None:
    """Found by review: Ray renumbers ranks after a scale-down (the rank-2 survivor becomes rank 1); the router
    followed the rank, recorded the survivor's sessions as failed over from slot-2 and, at the next scale-up, moved
    them to the new, empty replica there. Now a slot follows its replica while it lives; the new replica takes the
    slot the stopped one left; the sessions that lived on the stopped one stay where they were placed after it left
    (a graceful leave vacates its slot: nothing of theirs is on the new replica)."""
    async def run() -> None:
        r = new_router()
        a_stats, c_stats = {"slot": 0}, {"slot": 2}
        a, b, c = fake_replica("A", a_stats), fake_replica("B", {"slot": 1}), fake_replica("C", c_stats)
        r.update_replicas([a, b, c])
        first = {f"conv-{i}": await turn(r, [a, b, c], f"conv-{i}", f"conv-{i}-1") for i in range(150)}
        where = dict(first)
        r.update_replicas([a, c])  # B stopped by a downscale; its sessions fail over on their next turn
        for sid in [s for s, rep in first.items() if rep is b]:
            where[sid] = await turn(r, [a, c], sid, f"{sid}-2")
            assert where[sid] is not b
        for stats, rep in ((a_stats, a), (c_stats, c)):
            stats["kv_sessions"] = [s for s, x in where.items() if x is rep]
        c_stats["slot"] = 1  # Ray's rank consistency pass, seen on the next stats poll
        r.update_replicas([a, c])
        assert r.slot_of(c.replica_id) == slot_name(2)
        for sid, rep in where.items():
            assert await turn(r, [a, c], sid, f"{sid}-3") is rep, sid
        d = fake_replica("D", {"slot": 2})  # scale-up: Ray gives the new replica rank 2, which C keeps as slot-2
        r.update_replicas([a, c, d])
        assert r.slot_of(d.replica_id) == slot_name(1)
        for sid, rep in where.items():
            assert await turn(r, [a, c, d], sid, f"{sid}-4") is rep, sid

    asyncio.run(run())


def test_where_a_session_failed_over_from_idles_out_with_the_session() -> None:
    """Found by review: the dead slot a session failed over from was never idle-expired (the table grew to its
    million-entry cap), and a session back after hours was still pulled to that slot's replacement, away from the
    replica reporting its KV."""
    async def run() -> None:
        now = [0.0]
        r = new_router()
        r._core._clock = lambda: now[0]
        a_stats: dict = {"slot": 0}
        a, b = fake_replica("A", a_stats), fake_replica("B", {"slot": 1})
        r.update_replicas([a, b])
        on_b = [s for s in (f"conv-{i}" for i in range(40)) if await turn(r, [a, b], s, f"{s}-1") is b]
        r.on_replica_actor_died(b.replica_id)
        r.update_replicas([a])
        for sid in on_b:
            assert await turn(r, [a], sid, f"{sid}-2") is a  # failed over
        assert len(r._core._displaced) == len(on_b)
        a_stats["kv_sessions"] = on_b  # A holds their KV now (pinned)
        now[0] += r._core.config.session_idle_s + 1
        await turn(r, [a], "someone-else", "x")
        assert r._core._displaced == {} and r._core.last_slot(on_b[0]) is None
        c = fake_replica("C", {"slot": 1})  # B's replacement
        r.update_replicas([a, c])
        for sid in on_b:
            assert await turn(r, [a, c], sid, f"{sid}-3") is a, sid

    asyncio.run(run())


def test_a_replacement_up_while_its_dead_predecessor_is_still_listed_takes_the_dead_slot() -> None:
    """A replica whose engine is gone (or whose actor died) holds no slot: its replacement, under a rank past the end
    while Ray still lists the dead one, takes the slot at once; the sessions that failed over from it go back when it
    reports their KV; of the others, as many as bring A back within the resident bound (it holds all 30 sessions
    now), the rest stay where they rebuilt their KV."""
    from kvsched.adapters.ray.hints import RouteHints
    from kvsched.core.routing import load_bound

    async def run() -> None:
        r = new_router()
        a, b = fake_replica("A", {"slot": 0}), fake_replica("B", {"slot": 1})
        r.update_replicas([a, b])
        on_b = [s for s in (f"conv-{i}" for i in range(30)) if await turn(r, [a, b], s, f"{s}-1") is b]
        gone = RouteHints(exclude=("B",), gone=("B",))
        for sid in on_b:
            chosen = (await r.choose_replicas([a, b], pending(sid, f"{sid}-2", gone)))[0][0]
            r._assigned(pending(sid, f"{sid}-2", gone), chosen.replica_id)
            r.on_request_completed(chosen.replica_id, f"{sid}-2")
            assert chosen is a
        reported = on_b[::2]
        b2 = fake_replica("B2", {"slot": 2, "kv_sessions": reported})  # Ray: rank 1 is still B's
        r.update_replicas([a, b, b2])
        assert r.slot_of(b2.replica_id) == slot_name(1) and r.slot_of(b.replica_id) is None
        cap, on_a, rebalanced = load_bound(30 - 1, 2, 1.25), 30, 0  # sessions living on A: every one
        for sid in on_b:
            over = on_a > cap  # before this session's turn
            went = await turn(r, [a, b, b2], sid, f"{sid}-3")
            assert went is (b2 if sid in reported or over else a), sid
            on_a -= went is b2
            rebalanced += went is b2 and sid not in reported
        assert on_a <= cap and 0 < rebalanced < len(on_b) - len(reported)  # some unreported ones moved, some stayed

    asyncio.run(run())


def test_sessions_of_a_scaled_down_replica_stay_with_their_rebuilt_kv_when_a_new_replica_takes_its_slot() -> None:
    """Found by review: a graceful leave (the autoscaler removing a replica) was treated like a death; the sessions
    living there were recorded as failed over from its slot and the next scale-up pulled every one of them to the
    new, empty replica in that slot, away from the KV they had rebuilt on the survivors."""
    async def run() -> None:
        r = new_router()
        a_stats, b_stats = {"slot": 0}, {"slot": 1}
        a, b, c = fake_replica("A", a_stats), fake_replica("B", b_stats), fake_replica("C", {"slot": 2})
        r.update_replicas([a, b, c])
        on_c = [s for s in (f"conv-{i}" for i in range(60)) if await turn(r, [a, b, c], s, f"{s}-1") is c]
        assert on_c
        r.update_replicas([a, b])  # scaled 3 -> 2: C stopped, not dead
        now_on = {s: await turn(r, [a, b], s, f"{s}-2") for s in on_c}
        a_stats["kv_sessions"] = [s for s in on_c if now_on[s] is a]
        b_stats["kv_sessions"] = [s for s in on_c if now_on[s] is b]
        d = fake_replica("D", {"slot": 2})  # scaled 2 -> 3: a new replica, no KV, in slot-2
        r.update_replicas([a, b, d])
        assert r.slot_of(d.replica_id) == slot_name(2)
        for sid in on_c:
            assert await turn(r, [a, b, d], sid, f"{sid}-3") is now_on[sid], sid

    asyncio.run(run())


def test_an_answer_names_the_routers_slot_for_its_replica_after_ray_renumbered_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review (test_header_slot.py): X-KVSched-Replica named the replica's current Ray rank. After a
    scale-down Ray renumbered C from rank 2 to 1 while the router kept it in slot-2, and the scale-up's D (rank 2)
    took slot-1: the headers said slot-1 for C and slot-2 for D, the router's slots the other way round. The router
    passes its slot with the request (Ray's own routing loop sends the kwargs it leaves); the replica answers
    with it."""
    from kvsched.adapters.ray import engine
    from kvsched.adapters.ray.hints import RouteHints
    from kvsched.adapters.ray.ingress import served_by
    from tests.ray.standin_engine import StandInEngine
    from tests.ray.test_ingress_handles import POOL
    from tests.ray.test_router_units import sessions_by_home

    async def run() -> None:
        r = new_router()
        c_stats = {"slot": 2}
        a, b, c = fake_replica("A", {"slot": 0}), fake_replica("B", {"slot": 1}), fake_replica("C", c_stats)
        for x in (a, b, c):
            x.set_queue_len_response(0)
        r.update_replicas([a, b, c])
        r.update_replicas([a, c])  # B scaled down
        c_stats["slot"] = 1  # Ray renumbers C to rank 1
        r.update_replicas([a, c])
        d = fake_replica("D", {"slot": 2})
        d.set_queue_len_response(0)
        r.update_replicas([a, c, d])
        assert (r.slot_of(c.replica_id), r.slot_of(d.replica_id)) == (slot_name(2), slot_name(1))
        homes = sessions_by_home(n_slots=3, per_slot=1)
        for replica, rank, slot in ((c, 1, 2), (d, 2, 1)):
            sid = homes[slot_name(slot)][0]
            request = pending(sid, f"q-{sid}", RouteHints())
            assert await r._choose_replica_for_request(request) is replica
            hints = request.kwargs["route"]
            assert hints.slot == slot
            monkeypatch.setattr(engine, "replica_rank", lambda rank=rank: rank)  # what the replica's Ray rank is now
            serving = StandInEngine("w", POOL, replica_id=replica.replica_id.unique_id)
            answer = await serving.complete("/v1/chat/completions", b"{}", {"x-session-id": sid}, route=hints)
            assert served_by(answer, 1)["x-kvsched-replica"] == f"slot-{slot}"
            assert serving.describe()["slot"] == slot and serving.describe()["rank"] == rank  # broadcasts too

    asyncio.run(run())
