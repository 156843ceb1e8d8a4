"""Session routing across engine replicas: sessions placed by consistent hashing with bounded loads, then kept on the
replica that holds their KV; failover and return by stable slots.

A session's *home* is its owner on a ring of every slot the router knows (`routing_ring.HashRing`), dead or alive, so
homes never change while slots come and go. Two loads are kept apart:
- *residents*: the sessions living on each replica (routed there within `session_idle_s`). A session that lives
  nowhere (new, forgotten, or its replica died) is *placed* on the first slot clockwise from its hash whose residents
  are within the bound: no replica holds more than `c` times the average number of sessions, so as long as sessions
  keep it, no replica serves much more than `c` times the average of the work. Placement costs nothing: the session
  has no KV anywhere yet.
- *in flight*: requests now on each replica, passed in by the adapter. A session leaves the replica where it lives
  only when that replica is over `max(load_floor, ceil(c * (L + 1) / n))` requests in flight (`L` in flight on `n`
  live replicas). Below the floor a replica batches an extra request at little cost, while moving the session costs a
  prefill of its whole context elsewhere; at a handful of requests in flight the bound alone is one request above
  the average and moved sessions back and forth between two replicas (measured: BENCHMARKS.md, router section).

A turn goes to, in order:
1. the slot it was failed over from, within the in-flight bound, when the same replica is back there (it was only
   avoided, or down for a blip) or the slot's replica now reports the session's KV; a replacement (a new replica in the
   slot: an empty cache) does not take back sessions that rebuilt their KV where they failed over to, except as many
   as bring the replica they live on back within the resident bound (a crash's survivor holds its sessions too). Only
   on the turn right after the failover: once another turn is sent (not as a failover), the session has built its KV
   where it went and stays (found by review: 20 turns on, it was pulled back to the replica it left, re-prefilling);
   so a survivor keeps the sessions that ran such a turn before the replacement came up (until they idle out or its
   in-flight bound moves them);
2. the replica it lives on (where this router last sent it; not a replacement of it: `set_live`), within the
   in-flight bound;
3. a live replica reporting the session's KV, within the in-flight bound (a router that does not know the session:
   restarted, or the session idled out); within both bounds when the report may be another session's (`kv_shared`);
4. the first live slot clockwise from its hash within both bounds (home, else successors), else within the
   in-flight bound alone.
Both bounds are "Consistent Hashing with Bounded Loads" (Mirrokni, Thorup and Zadimoghaddam, SODA 2018), with sessions
as the balls of the first and requests as the balls of the second. Requests without a session go to the least-loaded
replica.

Pure policy: loads and KV holders come in as arguments, time from an injected clock, a frozen decision comes out,
`record()` updates the state.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from kvsched.core.routing_ring import HashRing, SlotName


class RoutingConfigError(ValueError):
    """A routing setting is out of range (the config loader reports it with the offending key)."""


class NoLiveReplicas(RuntimeError):
    """No live replica to route to (the adapter retries after the replica set changes)."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """`load_factor` is c in the bound above (> 1; 1.25 is the sizing guide's tolerance); `virtual_nodes` per slot;
    `kv_preference` honours replicas' KV reports and the router's own memory of where each session last went (reports
    lag by a stats period); `session_memory` caps the sessions remembered (least recently routed forgotten first);
    `load_floor`: requests any replica may hold in flight whatever the average before a session living there is moved
    (0: the bound alone). At low load the bound is tight (with 2 requests in flight on one of 2 replicas, a third may
    not join them) and moves sessions off their KV for no gain; a floor near the engine's comfortable batch keeps them
    home until a replica is really busy. `session_idle_s`: a session not routed for this long no longer counts as
    living on its replica (nor is remembered there; kvsched's longest pin TTL is 600 s)."""

    load_factor: float = 1.25
    virtual_nodes: int = 100
    kv_preference: bool = True
    session_memory: int = 1_000_000
    load_floor: int = 0
    session_idle_s: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.load_factor, int | float) or not math.isfinite(self.load_factor) \
                or self.load_factor <= 1.0:
            raise RoutingConfigError(f"load_factor must be a finite number > 1, got {self.load_factor!r}")
        if not isinstance(self.virtual_nodes, int) or not 1 <= self.virtual_nodes <= 10_000:
            raise RoutingConfigError(f"virtual_nodes must be an integer in 1..10000, got {self.virtual_nodes!r}")
        if not isinstance(self.load_floor, int) or self.load_floor < 0:
            raise RoutingConfigError(f"load_floor must be an integer >= 0, got {self.load_floor!r}")
        if not isinstance(self.session_memory, int) or self.session_memory < 0:
            raise RoutingConfigError(f"session_memory must be an integer >= 0, got {self.session_memory!r}")
        if not isinstance(self.session_idle_s, int | float) or not self.session_idle_s > 0:
            raise RoutingConfigError(f"session_idle_s must be a number > 0, got {self.session_idle_s!r}")


class RouteReason(StrEnum):
    HOME = "home"  # the session's ring owner, within the bound
    KV = "kv"  # a replica off the home that holds the session's KV
    RETURN = "return"  # back on the replica it was failed over from, now live again
    OVERFLOW = "overflow"  # the home is over the bound: a ring successor
    FAILOVER = "failover"  # the replica it ran on (or its home) is dead: a ring successor
    LEAST_LOADED = "least_loaded"  # no session


@dataclass(frozen=True, slots=True)
class RouteDecision:
    slot: SlotName
    reason: RouteReason
    session_id: str | None = None
    home: SlotName | None = None
    failed_over_from: SlotName | None = None  # the dead slot the session left (it may return there: `route`)
    failed_over_replica: str | None = None  # the replica that held that slot then (`set_live`'s `holders`)


def load_bound(in_flight: int, live: int, load_factor: float) -> int:
    """Most requests one replica may hold once the next request is placed: ceil(c * (L + 1) / n)."""
    return math.ceil(load_factor * (in_flight + 1) / live)


class SessionRouter:
    def __init__(self, config: RouterConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or RouterConfig()
        self._clock = clock
        self._ring = HashRing(virtual_nodes=self.config.virtual_nodes)
        self._live: set[SlotName] = set()
        # session -> (dead slot it was failed over from, the replica that held the slot then)
        self._displaced: OrderedDict[str, tuple[SlotName, str | None]] = OrderedDict()
        self._holder: dict[SlotName, str] = {}  # slot -> the replica that holds it (or last held it, when down)
        self._replaced: Counter[SlotName] = Counter()  # slot -> how many times a new replica took it (`set_live`)
        # session -> (slot it lives on, that slot's `_replaced` count when the session was routed there), least recent
        # first: a count behind the slot's means the replica the session lived on was replaced since (`route`)
        self._last: OrderedDict[str, tuple[SlotName, int]] = OrderedDict()
        self._seen: dict[str, float] = {}  # session -> when it was last routed
        self._residents: Counter[SlotName] = Counter()  # slot -> sessions in `_last` living there

    # ---- membership ---------------------------------------------------------------------------------------------
    @property
    def live(self) -> frozenset[SlotName]:
        return frozenset(self._live)

    @property
    def known(self) -> frozenset[SlotName]:
        return self._ring.slots

    def set_live(self, slots: Iterable[SlotName], holders: Mapping[SlotName, str] | None = None) -> None:
        """The slots that can take requests now; new names join the ring, missing ones are down (not forgotten).
        `holders`: which replica (any id that changes when the replica is replaced) holds each live slot; without
        it a slot's replica is taken to be the one it had. The sessions living on a slot that gets a new holder (a
        replacement: an empty cache) lived on the replica that died: their next turn goes where their KV is reported,
        else is placed (`route`, rules 3-4), not to the replacement as to their replica. They still count among the
        slot's residents until then: most come back to it (counted nowhere, the survivor looked over the resident
        bound: all three sessions the Ray kill test failed over went back to the empty replacement, away from the KV
        they had rebuilt)."""
        live = set(slots)
        if holders is not None:
            for s in live:
                if s in holders:
                    if self._holder.get(s, holders[s]) != holders[s]:
                        self._replaced[s] += 1  # the sessions living there lived on the replica it replaces
                    self._holder[s] = holders[s]
        for s in sorted(live - self._ring.slots):
            self._ring.add(s)
        self._live = live

    def mark_down(self, slot: SlotName) -> None:
        self._live.discard(slot)

    def forget(self, slot: SlotName) -> None:
        """Drop a slot from the ring for good (scaled down and not coming back): its sessions re-home."""
        self.vacate(slot)
        self._ring.remove(slot)

    def vacate(self, slot: SlotName) -> None:
        """The slot's replica left on purpose (scaled down, drained), its KV with it: the sessions living there live
        nowhere now (placed afresh on their next turn, by KV reports and the ring) and none returns to the slot,
        whichever replica takes it next. The slot stays on the ring for that replica. Found by review: a graceful
        leave was treated like a death, the sessions were recorded as failed over from the slot, and the next
        scale-up pulled them all to the new, empty replica there, away from the KV they had rebuilt meanwhile."""
        self._live.discard(slot)
        for sid in [s for s, (h, _) in self._displaced.items() if h == slot]:
            del self._displaced[sid]
        for sid in [s for s, (h, _) in self._last.items() if h == slot]:
            self._drop(sid)

    # ---- routing ------------------------------------------------------------------------------------------------
    def home(self, session_id: str) -> SlotName | None:
        return self._ring.owner(session_id)

    def residents(self) -> dict[SlotName, int]:
        """Sessions living on each slot (routed there within `session_idle_s`)."""
        self._expire()
        return {s: n for s, n in self._residents.items() if n > 0}

    def route(self, session_id: str | None, loads: Mapping[SlotName, int],
              kv_slots: Collection[SlotName] = (), unavailable: Collection[SlotName] = (),
              kv_shared: bool = False) -> RouteDecision:
        """Where the next request goes. `loads`: requests in flight per slot; `kv_slots`: slots reporting the
        session's KV; `unavailable`: live slots this request must avoid (they failed it: the session fails over as
        from a dead slot); `kv_shared`: the reports may be other sessions' (replicas report by a plain id that other
        tenants' sessions share), so a holder takes the session only within the session bound too (found by review:
        one tenant's KV for "main" pulled 40 tenants' new "main" sessions onto its replica). Raises NoLiveReplicas
        when no slot is left."""
        live = self._live - set(unavailable) if unavailable else self._live
        if not live:
            raise NoLiveReplicas("no live replica")
        if session_id is None:
            slot = min(live, key=lambda s: (loads.get(s, 0), s))
            return RouteDecision(slot, RouteReason.LEAST_LOADED)
        self._expire()
        bound = max(self.config.load_floor, load_bound(sum(max(0, loads.get(s, 0)) for s in live),
                                                       len(live), self.config.load_factor))

        def fits(s: SlotName) -> bool:
            return s in live and loads.get(s, 0) + 1 <= bound

        walk = self._ring.walk(session_id)
        home = next(walk)
        last, replaced_then = self._last.get(session_id, (None, 0))
        back, back_replica = self._displaced.get(session_id, (None, None))
        # Back only to the replica it left, or to a slot whose (new) replica reports its KV: found by review, a
        # replacement (empty cache) pulled every failed-over session back, away from the KV they rebuilt meanwhile.
        # Or to a replacement when the replica it lives on holds more sessions than the resident bound (the survivor
        # of a crash holds the dead replica's sessions too): as many go back as rebalance it, no more.
        if back is not None and fits(back) and (self._holder.get(back) == back_replica or (
                self.config.kv_preference and back in kv_slots
                and (not kv_shared or self._room(session_id, live)(back)))
                or (last is not None and last in live and not self._room(session_id, live)(last))):
            return RouteDecision(back, RouteReason.RETURN, session_id, home)
        # A session whose replica died (the one it lived on) is failing over. One that lives nowhere is placed: never
        # recorded as displaced from its dead home (found by review: after a scale-down every new session homed on
        # the removed slot was, and the next scale-up moved them all to the new, empty replica there).
        lost = last if last is not None and last not in live else None
        left = self._holder.get(lost) if lost is not None else None
        if self.config.kv_preference and last is not None and lost is None and fits(last) \
                and replaced_then == self._replaced[last]:  # the replica it lived on still holds the slot
            # Where the session lives holds its newest KV; a replica that served an earlier turn may still report
            # (older, shorter) pinned KV for it until the pin expires.
            reason = RouteReason.HOME if last == home else RouteReason.KV
            return RouteDecision(last, reason, session_id, home, lost, left)
        room = self._room(session_id, live)
        if self.config.kv_preference and kv_slots:
            holders = [s for s in kv_slots if fits(s) and (not kv_shared or room(s))]
            if holders:
                slot = holders[0] if len(holders) == 1 else self._first_in_ring(session_id, holders)
                reason = RouteReason.HOME if slot == home else RouteReason.KV
                return RouteDecision(slot, RouteReason.FAILOVER if lost else reason, session_id, home, lost, left)
        ranked = [home, *walk]
        placed = next((s for s in ranked if fits(s) and room(s)), None) or next((s for s in ranked if fits(s)), None)
        if placed is None:  # pragma: no cover - the in-flight bound always leaves room on some live replica
            raise AssertionError("the load bound always leaves room on some live replica")
        if lost is not None:
            reason = RouteReason.FAILOVER
        else:
            reason = RouteReason.HOME if placed == home else RouteReason.OVERFLOW
        return RouteDecision(placed, reason, session_id, home, lost, left)

    def _room(self, session_id: str, live: set[SlotName]) -> Callable[[SlotName], bool]:
        """Whether a slot may take the session as a resident: within ceil(c * (S + 1) / n) sessions, S living on the
        live slots without this one."""
        current = self.last_slot(session_id)
        others = sum(n for s, n in self._residents.items() if s in live) - (current in live)
        cap = load_bound(others, len(live), self.config.load_factor)
        return lambda s: self._residents.get(s, 0) - (s == current) + 1 <= cap

    def record(self, decision: RouteDecision) -> None:
        """Apply a decision the adapter acted on: where the session lives now, and whether it failed over (and so may
        return on its next turn: after that turn it lives where it went, see `route`)."""
        sid = decision.session_id
        cap = self.config.session_memory
        if sid is None or cap == 0:
            return
        previous = self.last_slot(sid)
        if previous is not None:
            self._residents[previous] -= 1
        self._last[sid] = (decision.slot, self._replaced[decision.slot])
        self._last.move_to_end(sid)
        self._seen[sid] = self._clock()
        self._residents[decision.slot] += 1
        while len(self._last) > cap:
            self._drop(next(iter(self._last)))
        if decision.failed_over_from is not None:
            _remember(self._displaced, sid, (decision.failed_over_from, decision.failed_over_replica), cap)
        else:
            # Back where it failed over from, or a turn after the failover anywhere else: its newest KV is where it
            # lives now, and a return would cost a prefill of everything since (`route`, rule 1).
            self._displaced.pop(sid, None)

    def last_slot(self, session_id: str) -> SlotName | None:
        """Where the session lives (None: never routed, idled out or forgotten)."""
        lived = self._last.get(session_id)
        return lived[0] if lived is not None else None

    def forget_session(self, session_id: str) -> None:
        """The session ended (`X-Session-End`, `DELETE /kvsched/sessions/{id}`): it lives nowhere now."""
        self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        """Forget the session whole: where it lives and the dead slot it failed over from (found by review: idle
        expiry left the latter behind, growing to its cap, and pulled a session back after hours)."""
        self._displaced.pop(session_id, None)
        lived = self._last.pop(session_id, None)
        self._seen.pop(session_id, None)
        if lived is not None:
            self._residents[lived[0]] -= 1

    def _expire(self) -> None:
        """Sessions not routed for `session_idle_s` (the least recent come first in `_last`) live nowhere now."""
        horizon = self._clock() - self.config.session_idle_s
        while self._last:
            sid = next(iter(self._last))
            if self._seen.get(sid, horizon) > horizon:
                return
            self._drop(sid)

    def _first_in_ring(self, session_id: str, candidates: Collection[SlotName]) -> SlotName:
        wanted = set(candidates)
        for s in self._ring.walk(session_id):
            if s in wanted:
                return s
        return min(wanted)  # pragma: no cover - candidates are always known slots


def _remember(table: OrderedDict[str, tuple[SlotName, str | None]], key: str, value: tuple[SlotName, str | None],
              cap: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > cap:
        table.popitem(last=False)
