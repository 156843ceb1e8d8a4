"""What the router makes of the replicas' KV reports, with fake running replicas (no cluster): a report names a plain
session id, which several tenants' sessions may share, and a slot's report outlives the replica that made it."""

from __future__ import annotations

import asyncio
from collections import Counter

from kvsched.adapters.ray.hints import routing_session
from kvsched.core.routing import load_bound
from kvsched.core.routing_ring import slot_name
from tests.ray.test_router_membership import turn
from tests.ray.test_router_units import fake_replica, new_router


def test_one_tenants_kv_for_an_id_does_not_pull_every_tenants_session_of_that_id_past_the_bound() -> None:
    """Found by review: engines report KV by the plain id, and a KV holder needed only in-flight room, so one tenant's
    pinned "main" pulled 40 other tenants' new "main" sessions onto its replica. A holder needs session room too."""
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("A", {"slot": 0, "kv_sessions": ["main"]}), fake_replica("B", {"slot": 1})
        r.update_replicas([a, b])
        placed: Counter[str | None] = Counter()
        for i in range(1, 41):  # 40 other tenants, each starting its own session "main"
            chosen = await turn(r, [a, b], routing_session("main", f"Bearer key-{i}"), f"r{i}")
            placed[r.slot_of(chosen.replica_id)] += 1
        cap = load_bound(39, 2, r._core.config.load_factor)
        assert max(placed.values()) <= cap and placed[slot_name(1)] > 0, placed
        # The tenant whose KV it is: its session still goes where the KV is (the bound has room for it).
        owner = routing_session("main", "Bearer key-0")
        assert await turn(r, [a, b], owner, "owner") is a
        assert max(r.residents().values()) <= load_bound(40, 2, r._core.config.load_factor)

    asyncio.run(run())
