"""kvsched's Ray Serve request router: the pure `SessionRouter` fed with Ray's replica set, the replicas' own
routing stats (slot, sessions whose KV they hold), the requests this router has in flight and the ingress's hints.

Slots: each engine replica reports `slot` (its Ray Serve rank, which Ray hands to the replica that replaces a dead
one) in `record_replica_metadata` and `record_routing_stats`; a replica that has not reported yet gets the lowest free
slot, which is where Ray's rank allocator puts it too. Loads: requests this router routed and not yet completed. The
ingress runs one replica, so its router sees every request to the engines; with several ingress replicas each would
bound its own share. The first tries offer only the chosen replica (`HOME_ONLY_ATTEMPTS`); Ray calls
`choose_replicas` again with backoff when it refuses or misses the queue-length probe deadline, and after those tries
the other replicas are a fallback rank (so a busy moment does not move a session).

Failures (`kvsched.adapters.ray.hints.RouteHints`, from the ingress): a retried request names the replicas that
failed it and never goes back to them; a replica whose engine is gone is out for every request until Ray removes it
(a replacement is a new replica, in the same slot). A request that ends its session makes the router forget the
session once it completes. Ray itself reports replica actors that died (`on_replica_actor_died`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvsched.adapters.ray.hints import RouteHints
from kvsched.core.routing import NoLiveReplicas, RouteDecision, RouterConfig, SessionRouter
from kvsched.core.routing_ring import SlotName, slot_name

logger = logging.getLogger("ray.serve")
MAX_UNDISPATCHED = 10_000
# Tries on which a session's request is offered to its chosen replica alone. Ray asks again when that replica refuses
# (max_ongoing_requests) or misses the queue-length probe deadline (0.1 s, doubling per try up to 1 s); on a busy
# host a probe can miss 0.1 s and 0.2 s while the replica is healthy, and moving the session then costs a re-prefill
# of its whole context. Three tries wait out ~0.7 s of probes; a dead replica leaves the set at once anyway.
HOME_ONLY_ATTEMPTS = 3


def reported_slot(replica: RunningReplica) -> int | None:
    for source in (replica.routing_stats, replica.replica_metadata):
        slot = source.get("slot") if isinstance(source, dict) else None
        if isinstance(slot, int) and slot >= 0:
            return slot
    return None


class KVSchedRequestRouter(RequestRouter):
    """Kwargs (`RequestRouterConfig.request_router_kwargs`): `load_factor` (default 1.25), `virtual_nodes` (100),
    `kv_preference` (true), `load_floor` (0); see `kvsched.core.routing.RouterConfig`."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._core = SessionRouter(RouterConfig(**kwargs))
        self._slot_of: dict[ReplicaID, SlotName] = {}
        self._replica_of: dict[SlotName, RunningReplica] = {}
        self._kv_index: dict[str, list[SlotName]] = {}
        self._loads: Counter[SlotName] = Counter()
        # (replica, internal request id) -> slot. Ray gives every handle call of one ingress request the same internal
        # id (a retry too), so the replica is part of the key.
        self._in_flight: dict[tuple[ReplicaID, str], SlotName] = {}
        self._decisions: dict[str, RouteDecision] = {}  # internal request id -> decision awaiting dispatch
        self._attempts: dict[str, int] = {}  # internal request id -> choose_replicas calls so far
        self._gone: set[ReplicaID] = set()  # engines reported gone, until Ray drops the replica
        self._ending: dict[tuple[ReplicaID, str], str] = {}  # in-flight requests that end their session

    def _state(self) -> None:
        if not hasattr(self, "_core"):  # initialize_state is only called when kwargs are configured
            self.initialize_state()

    # ---- replica set ------------------------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state()
        self._gone &= {r.replica_id for r in replicas}
        slot_of: dict[ReplicaID, SlotName] = {}
        taken: set[SlotName] = set()
        for r in replicas:  # reported slots first, then keep known assignments, then the lowest free slot
            n = reported_slot(r)
            # A replacement can start while its predecessor still holds its rank, so it gets a rank past the end;
            # Ray moves it into the free rank below once the predecessor is gone, and so does this router at once.
            # (A replica already known under its rank keeps it: a survivor's rank is past the end during an outage.)
            past_end = n is not None and n >= len(replicas) and self._slot_of.get(r.replica_id) != slot_name(n)
            if n is not None and not past_end and slot_name(n) not in taken:
                slot_of[r.replica_id] = slot_name(n)
                taken.add(slot_name(n))
        for r in replicas:
            known = self._slot_of.get(r.replica_id)
            if r.replica_id not in slot_of and known is not None and known not in taken:
                slot_of[r.replica_id] = known
                taken.add(known)
        free = (slot_name(i) for i in range(10_000) if slot_name(i) not in taken)
        for r in replicas:
            if r.replica_id not in slot_of:
                slot_of[r.replica_id] = next(free)
        self._slot_of = slot_of
        self._replica_of = {slot_of[r.replica_id]: r for r in replicas}
        kv: dict[str, list[SlotName]] = {}
        for r in replicas:
            stats = r.routing_stats if isinstance(r.routing_stats, dict) else {}
            for sid in stats.get("kv_sessions", ()) or ():
                kv.setdefault(str(sid), []).append(slot_of[r.replica_id])
        self._kv_index = kv
        self._core.set_live(slot for slot, r in self._replica_of.items() if r.replica_id not in self._gone)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        slot = self._slot_of.get(replica_id)
        if slot is not None:
            self._core.mark_down(slot)
            self._replica_of.pop(slot, None)
            self._loads.pop(slot, None)
            logger.warning(f"kvsched router: {slot} ({replica_id}) died; its sessions go to ring successors")

    def _find(self, key: str) -> ReplicaID | None:
        """A replica by its unique id or its actor id (hex), as the ingress names a replica that failed."""
        for replica_id, r in self.curr_replicas.items():
            if key == replica_id.unique_id or key == _actor_hex(r):
                return replica_id
        return None

    def _apply_hints(self, hints: RouteHints) -> set[SlotName]:
        """Mark engines reported gone as down; the slots this request must avoid."""
        avoid: set[SlotName] = set()
        for key in {*hints.exclude, *hints.gone}:
            replica_id = self._find(key)
            slot = self._slot_of.get(replica_id) if replica_id is not None else None
            if replica_id is None or slot is None:
                continue
            avoid.add(slot)
            if key in hints.gone and replica_id not in self._gone:
                self._gone.add(replica_id)
                self._core.mark_down(slot)
                logger.warning(f"kvsched router: the engine of {slot} ({replica_id.unique_id}) is gone; no request "
                               f"goes there until Ray replaces it")
        return avoid

    # ---- routing ----------------------------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._state()
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True
        rid = pending_request.metadata.internal_request_id
        sid = pending_request.metadata.session_id or None
        avoid = self._apply_hints(hints_of(pending_request))
        allowed = [r for r in candidate_replicas if r.replica_id not in self._gone
                   and self._slot_of.get(r.replica_id) not in avoid]
        if not allowed:
            return []  # Ray backs off and asks again; the ingress's deadline bounds the wait
        try:
            decision = self._core.route(sid, self._loads, self._kv_index.get(sid, ()) if sid else (), avoid)
        except NoLiveReplicas:
            return [allowed]
        attempts = self._attempts.get(rid, 0) + 1
        self._attempts[rid] = attempts
        while len(self._attempts) > MAX_UNDISPATCHED:  # cancelled before dispatch: drop the oldest
            self._attempts.pop(next(iter(self._attempts)))
        self._decisions[rid] = decision
        while len(self._decisions) > MAX_UNDISPATCHED:
            self._decisions.pop(next(iter(self._decisions)))
        first = self._replica_of.get(decision.slot)
        if first is None or first not in allowed:
            return [allowed]
        if attempts <= HOME_ONLY_ATTEMPTS or sid is None:
            return [[first]]
        # The chosen replica refused (max_ongoing_requests) or did not answer the queue-length probe in time on
        # every home-only try: from then on the others are a fallback rank, least loaded first.
        rest = sorted((r for r in allowed if r is not first),
                      key=lambda r: self._loads.get(self._slot_of.get(r.replica_id, SlotName("")), 0))
        return [[first], rest] if rest else [[first]]

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        """Ray's entry point that returns the replica a request goes to: the one place that sees every assignment
        (Ray calls `on_request_routed` only when replicas may reject requests)."""
        replica: RunningReplica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        self._assigned(pending_request, replica.replica_id)
        return replica

    def _assigned(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        self._state()
        rid = pending_request.metadata.internal_request_id
        self._attempts.pop(rid, None)
        decision = self._decisions.pop(rid, None)
        slot = self._slot_of.get(replica_id)
        if slot is None:
            return
        sid = pending_request.metadata.session_id
        if sid and hints_of(pending_request).end_session:
            self._ending[(replica_id, rid)] = sid
        if decision is not None and decision.session_id is not None:
            before = self._core.last_slot(decision.session_id)
            if before is not None and before != slot:
                logger.info(f"kvsched router: session {decision.session_id} moved {before} -> {slot} "
                            f"({decision.reason}, chosen {decision.slot}, in flight {dict(self._loads)})")
        if decision is not None:
            self._core.record(decision if decision.slot == slot else dataclasses.replace(decision, slot=slot))
        if (replica_id, rid) not in self._in_flight:
            self._in_flight[(replica_id, rid)] = slot
            self._loads[slot] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Ray calls this once per dispatched attempt, answered, rejected or failed."""
        self._state()
        slot = self._in_flight.pop((replica_id, internal_request_id), None)
        if slot is not None and self._loads.get(slot, 0) > 0:
            self._loads[slot] -= 1
        ended = self._ending.pop((replica_id, internal_request_id), None)
        if ended is not None:
            self._core.forget_session(ended)
            logger.info(f"kvsched router: session {ended} ended; forgotten")

    def residents(self) -> dict[SlotName, int]:
        """Sessions living on each slot."""
        return self._core.residents()

    def loads(self) -> dict[SlotName, int]:
        """Requests this router has in flight per slot."""
        return dict(self._loads)

    def slot_of(self, replica_id: ReplicaID) -> SlotName | None:
        return self._slot_of.get(replica_id)


def hints_of(pending_request: PendingRequest) -> RouteHints:
    hints = pending_request.kwargs.get("route") if isinstance(pending_request.kwargs, dict) else None
    return hints if isinstance(hints, RouteHints) else RouteHints()


def _actor_hex(replica: RunningReplica) -> str | None:
    try:
        return str(replica.actor_id.hex())
    except Exception:  # noqa: BLE001 - a fake or not-yet-started replica has no actor
        return None
