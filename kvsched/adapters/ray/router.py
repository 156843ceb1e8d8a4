"""kvsched's Ray Serve request router: the pure `SessionRouter` fed with Ray's replica set, the replicas' own
routing stats (slot, sessions whose KV they hold), the requests this router has in flight and the ingress's hints.

Slots (`kvsched.adapters.ray.slots`): each engine replica reports `slot` (its Ray Serve rank, which Ray hands to the
replica that replaces a dead one) in `record_replica_metadata` and `record_routing_stats`. A replica keeps the slot it
was given for as long as it lives, whatever Ray renumbers it to; a new one takes its rank's slot, or the dead slot it
replaces. Sessions are keyed by the ingress's routing key (`hints.routing_session`: the session id, scoped by tenant
and cache salt when the request has them); the replicas report their KV by the plain id, so for a scoped key a report
may be another owner's session of that id: it attracts the session only within the session bound.

Loads: requests this router routed and not yet completed, each counted from the moment its decision is made (Ray
assigns it only after an awaited probe, routing several at once) until Ray assigns or drops it. The ingress runs one
replica, so its router sees every request to the engines; with several ingress replicas each would bound its own
share. The first tries offer only the chosen replica (`HOME_ONLY_ATTEMPTS`); Ray calls `choose_replicas` again with
backoff when it refuses or misses the queue-length probe deadline, and after those tries the other replicas are a
fallback rank (so a busy moment does not move a session). A request without a session has no KV to keep: it is offered
the least-loaded replica and the others as a fallback rank from the first try.

Failures (`kvsched.adapters.ray.hints.RouteHints`, from the ingress): a retried request names the replicas that failed
it and goes back to one of them only when every live replica did (none for good); a replica whose engine is gone is
out for every request until Ray removes it (a replacement is a new replica, in the same slot). A request that ends its
session makes the router forget the session once it completes; a session not routed for `session_idle_s` is forgotten
whole. Ray itself reports replica actors that died (`on_replica_actor_died`). A replica that leaves Ray's set
otherwise (a scale-down; also a crash Ray's health check saw before any request did) vacates its slot: its sessions
are placed afresh, never pulled back there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvsched.adapters.ray.hints import RouteHints, plain_session
from kvsched.adapters.ray.slots import assign_slots, slot_index
from kvsched.core.routing import NoLiveReplicas, RouteDecision, RouterConfig, SessionRouter
from kvsched.core.routing_ring import SlotName

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
        # internal request id -> the slot its decision chose, counted in flight there until Ray assigns the request or
        # drops it (`_reserved_load`: the count per slot)
        self._reserved: dict[str, SlotName] = {}
        self._reserved_load: Counter[SlotName] = Counter()
        self._attempts: dict[str, int] = {}  # internal request id -> choose_replicas calls so far
        self._gone: set[ReplicaID] = set()  # engines reported gone or actors dead, until Ray drops the replica
        self._ending: dict[tuple[ReplicaID, str], str] = {}  # in-flight requests that end their session

    def _state(self) -> None:
        if not hasattr(self, "_core"):  # initialize_state is only called when kwargs are configured
            self.initialize_state()

    # ---- replica set ------------------------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state()
        listed = {r.replica_id for r in replicas}
        # A replica that leaves Ray's set without dying (scaled down, drained) took its KV away on purpose: its slot is
        # vacated, so no session goes back there (a death, reported or hinted gone, is a failover instead).
        for replica_id, slot in self._slot_of.items():
            if replica_id not in listed and replica_id not in self._gone:
                self._core.vacate(slot)
                logger.info(f"kvsched router: {slot} ({replica_id}) left; its sessions are placed afresh")
        self._gone &= listed
        replicas = [r for r in replicas if r.replica_id not in self._gone]  # they hold no slot (slots.py)
        slot_of = assign_slots([(r.replica_id, reported_slot(r)) for r in replicas], self._slot_of, self._core.known)
        self._slot_of = slot_of
        self._replica_of = {slot_of[r.replica_id]: r for r in replicas}
        kv: dict[str, list[SlotName]] = {}
        for r in replicas:
            stats = r.routing_stats if isinstance(r.routing_stats, dict) else {}
            for sid in stats.get("kv_sessions", ()) or ():
                kv.setdefault(str(sid), []).append(slot_of[r.replica_id])
        self._kv_index = kv
        # a replacement is a new replica in the slot: its cache is empty, so failed-over sessions stay where they are
        self._core.set_live(self._replica_of, {s: r.replica_id.unique_id for s, r in self._replica_of.items()})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._gone.add(replica_id)  # out for every request, and its slot free for its replacement
        slot = self._slot_of.get(replica_id)
        # Its requests count nowhere now. Ray still reports each one completed (ActorDiedError) later: found by review,
        # those late completions were taken off its replacement's count, in the same slot, which then read as idle.
        for key in [k for k in self._in_flight if k[0] == replica_id]:
            del self._in_flight[key]
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
        usable = [r for r in candidate_replicas if r.replica_id not in self._gone]
        allowed = [r for r in usable if self._slot_of.get(r.replica_id) not in avoid]
        if not allowed and usable:
            # Every live replica failed this request before, none of them for good (a reset connection, an actor
            # unreachable for a moment): try them again rather than none. Found by review: the router offered
            # nothing, and Ray's routing loop backed off until the request's deadline (300 s) with the replicas
            # healthy. The ingress bounds these retries (request_retries, with backoff).
            avoid, allowed = set(), usable
            logger.info(f"kvsched router: request {rid} failed on every live replica; trying them again")
        if not allowed:
            return []  # every replica is gone: Ray backs off and asks again; the ingress's deadline bounds the wait
        self._release(rid)  # an earlier try's choice
        loads = self._loads + self._reserved_load
        try:
            plain = plain_session(sid) if sid else None
            kv = self._kv_index.get(plain, ()) if plain else ()
            # A scoped key (tenant, salt) shares its plain id, and so the replicas' reports, with other owners'
            # sessions; a plain key is the one session of its id.
            decision = self._core.route(sid, loads, kv, avoid, kv_shared=plain != sid)
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
        self._reserve(rid, decision.slot)
        if attempts <= HOME_ONLY_ATTEMPTS and sid is not None:
            return [[first]]
        # The chosen replica refused (max_ongoing_requests) or did not answer the queue-length probe in time on
        # every home-only try, or the request has no session (no KV to keep: found by review, a sessionless request
        # offered the least-loaded replica alone waited to its deadline while that replica's probe kept failing):
        # the others are a fallback rank, least loaded first.
        rest = sorted((r for r in allowed if r is not first),
                      key=lambda r: loads.get(self._slot_of.get(r.replica_id, SlotName("")), 0))
        return [[first], rest] if rest else [[first]]

    def _reserve(self, rid: str, slot: SlotName) -> None:
        """Count a decision in flight on its slot from the moment it is made. Found by review: loads changed only once
        Ray assigned a request, after its awaited queue-length probe, and Ray routes up to twice as many requests at
        once as there are replicas: decisions made in that window saw the same loads and overran the bound."""
        self._reserved[rid] = slot
        self._reserved_load[slot] += 1
        while len(self._reserved) > MAX_UNDISPATCHED:  # never assigned nor dropped through Ray's entry point
            self._release(next(iter(self._reserved)))

    def _release(self, rid: str) -> None:
        slot = self._reserved.pop(rid, None)
        if slot is not None:
            self._reserved_load[slot] -= 1
            if self._reserved_load[slot] <= 0:
                del self._reserved_load[slot]

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        """Ray's entry point that returns the replica a request goes to: the one place that sees every assignment
        (Ray calls `on_request_routed` only when replicas may reject requests), and every request dropped before one
        (cancelled, or its routing failed): its reservation goes either way."""
        try:
            replica: RunningReplica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        finally:
            self._state()
            self._release(pending_request.metadata.internal_request_id)
        self._assigned(pending_request, replica.replica_id)
        slot = self._slot_of.get(replica.replica_id)
        if slot is not None and isinstance(pending_request.kwargs, dict) and "route" in pending_request.kwargs:
            # Ray sends the request with these kwargs next (`try_send_request`): the replica names this slot in its
            # answer. Found by review: it named its Ray rank, which differs from its slot once Ray renumbered it.
            pending_request.kwargs["route"] = dataclasses.replace(hints_of(pending_request), slot=slot_index(slot))
        return replica

    def _assigned(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        self._state()
        rid = pending_request.metadata.internal_request_id
        self._release(rid)
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
