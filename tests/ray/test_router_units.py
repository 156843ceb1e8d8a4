"""kvsched's Ray request router with fake running replicas (Ray's own `FakeRunningReplica`), no cluster: slots,
KV preference, home-only tries, and the ingress's hints (failed replicas, engines gone, sessions ending)."""

from __future__ import annotations

import asyncio

from kvsched.adapters.ray.hints import RouteHints
from kvsched.core.routing_ring import HashRing, slot_name


# ---- the request router with fake replicas ---------------------------------------------------------------------
def fake_replica(uid: str, stats: dict | None = None, metadata: dict | None = None):  # noqa: ANN201
    from ray.serve._private.test_utils import FakeRunningReplica

    class Replica(FakeRunningReplica):
        @property
        def routing_stats(self) -> dict:
            return stats or {}

        @property
        def replica_metadata(self) -> dict:
            return metadata or {}

    return Replica(uid)


def pending(sid: str, rid: str, hints: RouteHints | None = None):  # noqa: ANN201
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    return PendingRequest(args=["/v1/chat/completions", b"{}", {}], kwargs={"route": hints} if hints else {},
                          metadata=RequestMetadata(request_id=rid, internal_request_id=rid, session_id=sid))


async def peek(r, replicas, sid: str, rid: str):  # noqa: ANN001, ANN201
    """The replica Ray is offered first for a request that is then dropped before dispatch (its slot is released)."""
    chosen = (await r.choose_replicas(replicas, pending(sid, rid)))[0][0]
    r._release(rid)
    return chosen


def new_router():  # noqa: ANN201
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from kvsched.adapters.ray.router import KVSchedRequestRouter

    r = KVSchedRequestRouter(deployment_id=DeploymentID(name="engine"), handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(load_factor=1.25)
    return r


def sessions_by_home(n_slots: int = 2, per_slot: int = 3) -> dict[str, list[str]]:
    ring = HashRing([slot_name(i) for i in range(n_slots)])
    out: dict[str, list[str]] = {slot_name(i): [] for i in range(n_slots)}
    i = 0
    while any(len(v) < per_slot for v in out.values()):
        sid = f"wf{i}/worker"
        home = ring.owner(sid)
        assert home is not None
        if len(out[home]) < per_slot:
            out[home].append(sid)
        i += 1
    return out


def test_router_sends_sessions_to_the_replica_in_their_reported_slot_even_after_replacement() -> None:
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
        r.update_replicas([a, b])
        lived: dict[str, list[str]] = {slot_name(0): [], slot_name(1): []}
        for sids in sessions_by_home().values():
            for sid in sids:
                chosen = (await r.choose_replicas([a, b], pending(sid, sid)))[0][0]
                r._assigned(pending(sid, sid), chosen.replica_id)  # it lives there now (as Ray reports it)
                r.on_request_completed(chosen.replica_id, sid)
                lived[r.slot_of(chosen.replica_id)].append(sid)
        assert lived[slot_name(1)]
        # replica in slot-1 dies; its sessions go to slot-0
        r.on_replica_actor_died(b.replica_id)
        for sid in lived[slot_name(1)]:
            ranks = await r.choose_replicas([a], pending(sid, sid + "-2"))
            assert ranks[0][0] is a
            r._assigned(pending(sid, sid + "-2"), a.replica_id)
            r.on_request_completed(a.replica_id, sid + "-2")
        # a replacement with a NEW unique id reports slot 1 (its rank): new sessions homed there go to it; the
        # failed-over ones rebuilt their KV on a and stay, but for one whose KV it reports, and as many as bring a
        # back within the resident bound (it holds all six now: at most 4 each on two replicas)
        c_stats: dict = {}
        c = fake_replica("ccc", c_stats, metadata={"slot": 1})
        r.update_replicas([a, c])
        assert r.slot_of(c.replica_id) == slot_name(1)
        offered = [await peek(r, [a, c], sid, sid + "-3") for sid in lived[slot_name(1)]]
        assert offered == [c] * len(offered)  # a over its bound: each would rebalance (nothing recorded yet)
        went = []
        for sid in lived[slot_name(1)]:
            chosen = (await r.choose_replicas([a, c], pending(sid, sid + "-3")))[0][0]
            r._assigned(pending(sid, sid + "-3"), chosen.replica_id)
            r.on_request_completed(chosen.replica_id, sid + "-3")
            went.append(chosen)
        assert went == [c, c] + [a] * (len(went) - 2)  # 6 on a, bound 4: two go back, the others stay
        for sid in sessions_by_home(per_slot=5)[slot_name(1)][3:]:
            assert await peek(r, [a, c], sid, sid + "-n") is c
        c_stats["kv_sessions"] = lived[slot_name(1)][:1]
        r.update_replicas([a, c])
        assert await peek(r, [a, c], lived[slot_name(1)][0], "back") is c

    asyncio.run(run())


def test_sessions_started_after_a_scale_down_stay_put_when_the_slot_comes_back() -> None:
    """Found by review: after 3 -> 2 replicas, every new session homed on the removed slot was recorded as failed
    over from it, and the next scale-up (a new replica in that slot) moved all of them there, away from their KV."""
    async def run() -> None:
        r = new_router()
        a, b, c = fake_replica("A", {"slot": 0}), fake_replica("B", {"slot": 1}), fake_replica("C", {"slot": 2})
        r.update_replicas([a, b, c])
        r.update_replicas([a, b])  # scaled down
        where = {}
        for k in range(3):
            for i in range(60):
                sid = f"conv-{i}"
                chosen = (await r.choose_replicas([a, b], pending(sid, f"{sid}-{k}")))[0][0]
                r._assigned(pending(sid, f"{sid}-{k}"), chosen.replica_id)
                r.on_request_completed(chosen.replica_id, f"{sid}-{k}")
                assert where.setdefault(sid, chosen) is chosen
        d = fake_replica("D", {"slot": 2})
        r.update_replicas([a, b, d])  # scaled up again: slot 2 is back, empty
        for sid, rep in where.items():
            assert await peek(r, [a, b, d], sid, f"{sid}-9") is rep

    asyncio.run(run())


def test_router_prefers_the_replica_reporting_the_sessions_kv_and_bounds_load() -> None:
    async def run() -> None:
        r = new_router()
        sid = sessions_by_home()[slot_name(0)][0]
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1, "kv_sessions": [sid]})
        r.update_replicas([a, b])
        assert (await r.choose_replicas([a, b], pending(sid, "r0")))[0][0] is b
        for i in range(3):  # three requests in flight on b, none on a: b is over the bound for one more
            r._assigned(pending(f"x{i}", f"x{i}"), b.replica_id)
        assert r.loads() == {slot_name(1): 3}
        assert (await r.choose_replicas([a, b], pending(sid, "r1")))[0][0] is a
        for i in range(3):
            r.on_request_completed(b.replica_id, f"x{i}")
        assert (await r.choose_replicas([a, b], pending(sid, "r2")))[0][0] is b

    asyncio.run(run())


def test_router_without_slot_reports_assigns_lowest_free_slots_and_sessionless_goes_least_loaded() -> None:
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa"), fake_replica("bbb")
        r.update_replicas([a, b])
        assert {r.slot_of(a.replica_id), r.slot_of(b.replica_id)} == {slot_name(0), slot_name(1)}
        r._assigned(pending("", "q"), a.replica_id)
        assert (await r.choose_replicas([a, b], pending("", "n")))[0][0] is b

    asyncio.run(run())


def test_router_offers_other_replicas_only_after_the_home_only_tries() -> None:
    from kvsched.adapters.ray.router import HOME_ONLY_ATTEMPTS

    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
        r.update_replicas([a, b])
        sid = sessions_by_home()[slot_name(0)][0]
        for _ in range(HOME_ONLY_ATTEMPTS):  # a slow queue-length probe does not move the session at once
            assert await r.choose_replicas([a, b], pending(sid, "t")) == [[a]]
        assert await r.choose_replicas([a, b], pending(sid, "t")) == [[a], [b]]
        r._assigned(pending(sid, "t"), b.replica_id)  # Ray sent it to b: the session's KV is there now
        assert (await r.choose_replicas([a, b], pending(sid, "t2")))[0] == [b]

    asyncio.run(run())


def test_a_request_without_a_session_is_offered_every_replica_at_once() -> None:
    """Found by review: a sessionless request was offered only the least-loaded replica, on every try; while that
    replica's queue-length probe kept failing it waited to its deadline with another replica idle. Through Ray's own
    routing loop (probes with backoff): A never answers its probe, B answers 0."""
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
        b.set_queue_len_response(0)
        r.update_replicas([a, b])
        assert await r.choose_replicas([a, b], pending(None, "n0")) == [[a], [b]]  # least loaded first, then the rest
        chosen = await asyncio.wait_for(r._choose_replica_for_request(pending(None, "n1")), 5)
        assert chosen is b

    asyncio.run(run())


# ---- the ingress's hints -----------------------------------------------------------------------------------------
async def two_replicas():  # noqa: ANN201
    r = new_router()
    a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
    r.update_replicas([a, b])
    return r, a, b


async def routed(r, replicas, sid: str, rid: str, hints: RouteHints | None = None):  # noqa: ANN001, ANN201
    """Route like Ray: choose, then assign the first replica offered; returns it."""
    ranks = await r.choose_replicas(replicas, pending(sid, rid, hints))
    chosen = ranks[0][0]
    r._assigned(pending(sid, rid, hints), chosen.replica_id)
    return chosen


def test_a_retry_never_goes_back_to_the_replica_that_failed_it_and_the_session_returns_after() -> None:
    async def run() -> None:
        r, a, b = await two_replicas()
        sid = sessions_by_home()[slot_name(0)][0]
        assert await routed(r, [a, b], sid, "t1") is a
        r.on_request_completed(a.replica_id, "t1")
        for _ in range(3):  # every try of the retry avoids a, however often Ray asks
            assert await r.choose_replicas([a, b], pending(sid, "t2", RouteHints(exclude=("aaa",)))) == [[b]]
        assert await routed(r, [a, b], sid, "t2", RouteHints(exclude=("aaa",))) is b
        r.on_request_completed(b.replica_id, "t2")
        assert await routed(r, [a, b], sid, "t3") is a  # a was not gone: the session goes back where it lived
        # failed on both, neither for good: both are offered again (its home first) rather than none
        assert await r.choose_replicas([a, b], pending(sid, "t4", RouteHints(exclude=("aaa", "bbb")))) == [[a]]

    asyncio.run(run())


def test_a_session_that_lived_on_after_a_retry_elsewhere_is_not_pulled_back_when_its_first_replica_is_free() -> None:
    """Found by review (test_stale_return.py): one transient failure on a, the retry went to b, then 20 turns on b
    while a was busy with other work; once a was free the next turn went back to a, away from 21 turns of KV."""
    async def run() -> None:
        r, a, b = await two_replicas()
        sid = sessions_by_home()[slot_name(0)][0]
        assert await routed(r, [a, b], sid, "t0") is a
        r.on_request_completed(a.replica_id, "t0")
        assert await routed(r, [a, b], sid, "t1", RouteHints(exclude=("aaa",))) is b
        r.on_request_completed(b.replica_id, "t1")
        for i in range(10):  # a busy: the session stays on b
            r._assigned(pending(None, f"bg{i}"), a.replica_id)
        for turn in range(20):
            assert await routed(r, [a, b], sid, f"u{turn}") is b
            r.on_request_completed(b.replica_id, f"u{turn}")
        for i in range(10):
            r.on_request_completed(a.replica_id, f"bg{i}")
        assert await routed(r, [a, b], sid, "v") is b

    asyncio.run(run())


def test_a_retry_that_failed_on_every_live_replica_is_routed_again_instead_of_waiting_to_its_deadline() -> None:
    """Found by review: a one-replica pool whose replica failed a request once, transiently (a reset connection):
    the retry excluded it, the router offered no replica, and Ray's routing loop backed off until the request's
    deadline (300 s) with the replica healthy. Through Ray's own routing loop. A replica whose engine is gone is
    still never offered."""
    async def run() -> None:
        r = new_router()
        a = fake_replica("aaa", {"slot": 0})
        a.set_queue_len_response(0)
        r.update_replicas([a])
        retry = pending("s", "t", RouteHints(exclude=("aaa",)))
        assert await asyncio.wait_for(r._choose_replica_for_request(retry), 5) is a
        r, a, b = await two_replicas()
        gone = RouteHints(exclude=("aaa", "bbb"), gone=("aaa", "bbb"))
        assert await r.choose_replicas([a, b], pending("s", "g", gone)) == []

    asyncio.run(run())


def test_an_engine_reported_gone_takes_no_request_until_ray_replaces_it() -> None:
    async def run() -> None:
        r, a, b = await two_replicas()
        sids = sessions_by_home(per_slot=2)[slot_name(0)]
        for i, sid in enumerate(sids):
            assert await routed(r, [a, b], sid, f"p{i}") is a
        assert await routed(r, [a, b], sids[0], "g", RouteHints(exclude=("aaa",), gone=("aaa",))) is b
        r.update_replicas([a, b])  # Ray has not noticed yet: a stays out for every session
        assert await routed(r, [a, b], sids[1], "h") is b
        r.update_replicas([b])
        c = fake_replica("ccc", metadata={"slot": 0})  # the replacement, in the same slot: an empty cache
        r.update_replicas([b, c])
        assert r.slot_of(c.replica_id) == slot_name(0)
        assert await routed(r, [b, c], sids[0], "k") is b and await routed(r, [b, c], sids[1], "l") is b

    asyncio.run(run())


def test_a_request_that_ends_its_session_makes_the_router_forget_it_once_done() -> None:
    async def run() -> None:
        r, a, b = await two_replicas()
        chosen = await routed(r, [a, b], "wf1/worker", "e", RouteHints(end_session=True))
        assert sum(r.residents().values()) == 1
        r.on_request_completed(chosen.replica_id, "e")
        assert r.residents() == {} and r._core.last_slot("wf1/worker") is None

    asyncio.run(run())


def test_in_flight_counts_follow_each_attempt_of_one_ingress_request() -> None:
    """Ray gives a retry the same internal request id; each attempt is counted on its own replica."""
    async def run() -> None:
        r, a, b = await two_replicas()
        r._assigned(pending("", "x"), a.replica_id)
        r._assigned(pending("", "x"), b.replica_id)
        assert r.loads() == {slot_name(0): 1, slot_name(1): 1}
        r.on_request_completed(a.replica_id, "x")
        assert r.loads()[slot_name(0)] == 0 and r.loads()[slot_name(1)] == 1
        r.on_request_completed(b.replica_id, "x")
        r.on_request_completed(b.replica_id, "x")  # once only
        assert sum(r.loads().values()) == 0

    asyncio.run(run())


def test_slots_follow_ranks_through_an_outage_and_a_replacement_that_starts_past_the_end() -> None:
    async def run() -> None:
        r, a, b = await two_replicas()
        r.update_replicas([b])  # slot-0's replica is gone: the survivor keeps slot-1 although 1 >= one replica
        assert r.slot_of(b.replica_id) == slot_name(1)
        c = fake_replica("ccc", {"slot": 2})  # the replacement started while the dead one still held rank 0
        r.update_replicas([b, c])
        assert (r.slot_of(b.replica_id), r.slot_of(c.replica_id)) == (slot_name(1), slot_name(0))
        r.update_replicas([b, c])  # still rank 2 on its next report: it keeps the slot it took
        assert r.slot_of(c.replica_id) == slot_name(0)

    asyncio.run(run())


def test_a_dead_replicas_late_completions_do_not_count_against_its_replacement() -> None:
    """Found by review: a dead replica's requests stayed in flight in the router's table after its slot's count was
    zeroed; Ray reports each completed later (ActorDiedError), and those completions were taken off the count of the
    replacement in the same slot, which read as idle while busy."""
    async def run() -> None:
        r, a, b = await two_replicas()
        for i in range(3):
            r._assigned(pending(f"s{i}", f"old{i}"), b.replica_id)
        r.on_replica_actor_died(b.replica_id)
        b2 = fake_replica("b2", {"slot": 1})
        r.update_replicas([a, b2])
        for i in range(3):
            r._assigned(pending(f"n{i}", f"new{i}"), b2.replica_id)
        for i in range(3):
            r.on_request_completed(b.replica_id, f"old{i}")
        assert r.loads().get(slot_name(1)) == 3

    asyncio.run(run())
