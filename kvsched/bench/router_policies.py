"""The routers `kvsched bench router` compares on a simulated fleet, behind one small interface.

- `kvsched`: `kvsched.core.routing.SessionRouter`, the routing core the Ray Serve deployment runs, on the
  simulation's clock.
- `consistent_hash` and `pow2`: Ray 2.60's own router classes (`ray.serve.experimental.consistent_hash_router.
  ConsistentHashRouter`, `PowerOfTwoChoicesRequestRouter`, Ray Serve's default), built directly with fake running
  replicas as Ray's unit tests build them (`ray.serve._private.test_utils.FakeRunningReplica`), and asked
  `choose_replicas` for every turn. Ray's framework then takes, from the first rank that has one, the replica with
  the shortest queue below `max_ongoing_requests` (`RequestRouter._select_from_candidate_replicas`); that step runs
  here on the simulated queue lengths. A replica that comes back is a new actor with a new unique id, as in Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import Any, Protocol

from kvsched.core.routing import RouterConfig, SessionRouter
from kvsched.core.routing_ring import SlotName

# `consistent_hash_bounded` is Ray's consistent-hash router again, its replicas' max_ongoing_requests at kvsched's load
# bound (see kvsched.bench.router.make_policy): the ring whose fallback fires where kvsched's bound does.
POLICIES = ("kvsched", "consistent_hash", "consistent_hash_bounded", "pow2")
RAY_ROUTERS = {
    "consistent_hash": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
    "consistent_hash_bounded": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
    "pow2": "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
}


class Policy(Protocol):
    name: str

    def tick(self, now: float) -> None: ...
    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None: ...
    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName: ...
    def peek(self, session: str, holder: SlotName | None) -> SlotName: ...
    def close(self) -> None: ...


class KVSchedPolicy:
    name = "kvsched"

    def __init__(self, load_factor: float) -> None:
        self.now = 0.0  # the simulation's clock, in seconds of turn time
        self.router = SessionRouter(RouterConfig(load_factor=load_factor), clock=lambda: self.now)

    def tick(self, now: float) -> None:
        self.now = now

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None:
        self.router.set_live(slots)

    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName:
        d = self.router.route(session, loads, (holder,) if holder is not None else ())
        self.router.record(d)
        return d.slot

    def peek(self, session: str, holder: SlotName | None) -> SlotName:
        return self.router.route(session, {}, (holder,) if holder is not None else ()).slot

    def close(self) -> None:
        pass


class RayRouterPolicy:
    """One of Ray's RequestRouter classes on fake replicas (one per slot), driven on a private event loop."""

    def __init__(self, name: str, max_ongoing: int, seed: int) -> None:
        import importlib

        from ray.serve._private.common import DeploymentHandleSource
        from ray.serve._private.test_utils import FAKE_REPLICA_DEPLOYMENT_ID

        module, cls = RAY_ROUTERS[name].split(":")
        self.name = name
        self.max_ongoing = max_ongoing
        self.loop = asyncio.new_event_loop()

        async def build() -> Any:  # on its loop: Ray's router and replicas look for the running loop
            router = getattr(importlib.import_module(module), cls)(
                deployment_id=FAKE_REPLICA_DEPLOYMENT_ID, handle_source=DeploymentHandleSource.UNKNOWN)
            router.initialize_state()
            return router

        self.router: Any = self.loop.run_until_complete(build())
        self.replicas: dict[SlotName, Any] = {}
        self.slot_of: dict[Any, SlotName] = {}
        self.rng = random.Random(seed)
        self.ids = itertools.count()

    def tick(self, now: float) -> None:
        pass  # Ray's routers keep no time-based state the simulation exercises

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None:
        from ray.serve._private.test_utils import FakeRunningReplica

        async def update() -> None:
            for s in slots:
                if s not in self.replicas or s == revived:  # a replacement is a new actor, a new unique id
                    r = FakeRunningReplica(f"{self.rng.getrandbits(32):08x}", max_ongoing_requests=self.max_ongoing)
                    r.set_queue_len_response(0)
                    self.replicas[s] = r
                    self.slot_of[r.replica_id] = s
            self.router.update_replicas([self.replicas[s] for s in slots])

        serve_log = logging.getLogger("ray.serve")
        level = serve_log.level
        serve_log.setLevel(logging.WARNING)  # Ray logs every ring rebuild and replica-set change at INFO
        try:
            self.loop.run_until_complete(update())
        finally:
            serve_log.setLevel(level)

    def _ranks(self, session: str) -> list[list[Any]]:
        from ray.serve._private.common import RequestMetadata
        from ray.serve._private.request_router.common import PendingRequest

        rid = f"r{next(self.ids)}"

        async def choose() -> list[list[Any]]:  # a PendingRequest makes its future on the running loop
            pr = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
                request_id=rid, internal_request_id=rid, session_id=session))
            ranks: list[list[Any]] = await self.router.choose_replicas(list(self.router.curr_replicas.values()), pr)
            return ranks

        return self.loop.run_until_complete(choose())

    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName:
        ranks = self._ranks(session)
        for rank in ranks:
            open_ = [r for r in rank if loads.get(self.slot_of[r.replica_id], 0) < self.max_ongoing]
            if open_:
                return min((self.slot_of[r.replica_id] for r in open_), key=lambda s: loads.get(s, 0))
        return self.slot_of[ranks[0][0].replica_id]  # every rank full: Ray backs off and retries the first

    def peek(self, session: str, holder: SlotName | None) -> SlotName:
        return self.slot_of[self._ranks(session)[0][0].replica_id]

    def close(self) -> None:
        async def drain() -> None:  # Ray's queue-length probes started by update_replicas
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.loop.run_until_complete(drain())
        self.loop.close()


def make_policy(name: str, load_factor: float, max_ongoing: int, seed: int) -> Policy:
    if name == "kvsched":
        return KVSchedPolicy(load_factor)
    if name in RAY_ROUTERS:
        random.seed(seed + 1)  # Ray's pow2 draws from the module-level generator
        return RayRouterPolicy(name, max_ongoing, seed + 1)
    raise ValueError(f"unknown policy {name!r}")
