"""Session routing across engine replicas: consistent hashing with bounded loads, KV preference and failover.

A session's *home* is its owner on a ring of every slot the router knows (`routing_ring.HashRing`), dead or alive, so
homes never change while slots come and go. A turn goes to, in order:
1. the replica it was failed over from, when that replica is back (same slot) and within the bound;
2. the replica this router last sent it to, else a live replica reporting the session's KV, while within the bound
   (KV preference: no re-prefill; the last one holds the newest KV, earlier ones may still report an older pin);
3. the first live slot clockwise from the session's hash that is within the bound (home, else successors).
The bound is `ceil(c * (L + 1) / n)` requests per replica for `L` requests in flight on `n` live replicas
("Consistent Hashing with Bounded Loads", Mirrokni, Thorup and Zadimoghaddam, SODA 2018): no replica exceeds `c`
times the average, and overflow spills to ring successors. Requests without a session go to the least-loaded replica.

Pure policy: loads and KV holders come in as arguments, a frozen decision comes out, `record()` updates the state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
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
    `load_floor`: requests any replica may hold whatever the average (0: the bound alone). At low load the bound is
    tight (with 2 requests in flight on one of 2 replicas, a third may not join them) and moves sessions off their KV for no gain;
    a floor near the engine's comfortable batch keeps them home until a replica is really busy."""

    load_factor: float = 1.25
    virtual_nodes: int = 100
    kv_preference: bool = True
    session_memory: int = 1_000_000
    load_floor: int = 0

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
    failed_over_from: SlotName | None = None  # the dead replica the session left (it returns there when back)


def load_bound(in_flight: int, live: int, load_factor: float) -> int:
    """Most requests one replica may hold once the next request is placed: ceil(c * (L + 1) / n)."""
    return math.ceil(load_factor * (in_flight + 1) / live)


class SessionRouter:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._ring = HashRing(virtual_nodes=self.config.virtual_nodes)
        self._live: set[SlotName] = set()
        self._displaced: OrderedDict[str, SlotName] = OrderedDict()  # session -> dead slot it was failed over from
        self._last: OrderedDict[str, SlotName] = OrderedDict()  # session -> slot it was last sent to

    # ---- membership ---------------------------------------------------------------------------------------------
    @property
    def live(self) -> frozenset[SlotName]:
        return frozenset(self._live)

    @property
    def known(self) -> frozenset[SlotName]:
        return self._ring.slots

    def set_live(self, slots: Iterable[SlotName]) -> None:
        """The slots that can take requests now; new names join the ring, missing ones are down (not forgotten)."""
        live = set(slots)
        for s in sorted(live - self._ring.slots):
            self._ring.add(s)
        self._live = live

    def mark_down(self, slot: SlotName) -> None:
        self._live.discard(slot)

    def forget(self, slot: SlotName) -> None:
        """Drop a slot from the ring for good (scaled down and not coming back): its sessions re-home."""
        self._live.discard(slot)
        self._ring.remove(slot)
        for table in (self._displaced, self._last):
            for sid in [s for s, h in table.items() if h == slot]:
                del table[sid]

    # ---- routing ------------------------------------------------------------------------------------------------
    def home(self, session_id: str) -> SlotName | None:
        return self._ring.owner(session_id)

    def route(self, session_id: str | None, loads: Mapping[SlotName, int],
              kv_slots: Collection[SlotName] = ()) -> RouteDecision:
        """Where the next request goes. `loads`: requests in flight per slot; `kv_slots`: slots reporting the
        session's KV. Raises NoLiveReplicas when no slot is live."""
        if not self._live:
            raise NoLiveReplicas("no live replica")
        if session_id is None:
            slot = min(self._live, key=lambda s: (loads.get(s, 0), s))
            return RouteDecision(slot, RouteReason.LEAST_LOADED)
        bound = max(self.config.load_floor, load_bound(sum(max(0, loads.get(s, 0)) for s in self._live),
                                                       len(self._live), self.config.load_factor))

        def fits(s: SlotName) -> bool:
            return s in self._live and loads.get(s, 0) + 1 <= bound

        walk = self._ring.walk(session_id)
        home = next(walk)
        last = self._last.get(session_id)
        back = self._displaced.get(session_id)
        if back is not None and fits(back):
            return RouteDecision(back, RouteReason.RETURN, session_id, home)
        # A session whose replica died (its last one, or its home before it ever ran) is failing over.
        lost = last if last is not None and last not in self._live else None
        if last is None and home not in self._live:
            lost = home
        if self.config.kv_preference and last is not None and lost is None and fits(last):
            # Where this router last sent the session holds its newest KV; a replica that served an earlier turn
            # may still report (older, shorter) pinned KV for it until the pin expires.
            reason = RouteReason.HOME if last == home else RouteReason.KV
            return RouteDecision(last, reason, session_id, home, lost)
        if self.config.kv_preference and kv_slots:
            holders = [s for s in kv_slots if fits(s)]
            if holders:
                slot = holders[0] if len(holders) == 1 else self._first_in_ring(session_id, holders)
                reason = RouteReason.HOME if slot == home else RouteReason.KV
                return RouteDecision(slot, RouteReason.FAILOVER if lost else reason, session_id, home, lost)
        if fits(home):
            return RouteDecision(home, RouteReason.FAILOVER if lost else RouteReason.HOME, session_id, home, lost)
        reason = RouteReason.FAILOVER if lost is not None else RouteReason.OVERFLOW
        for s in walk:
            if fits(s):
                return RouteDecision(s, reason, session_id, home, lost)
        raise AssertionError("the load bound always leaves room on some live replica")  # pragma: no cover

    def record(self, decision: RouteDecision) -> None:
        """Apply a decision the adapter acted on: where the session's KV now is, and whether it failed over."""
        sid = decision.session_id
        cap = self.config.session_memory
        if sid is None or cap == 0:
            return
        _remember(self._last, sid, decision.slot, cap)
        if decision.failed_over_from is not None:
            _remember(self._displaced, sid, decision.failed_over_from, cap)
        elif self._displaced.get(sid) == decision.slot:
            del self._displaced[sid]

    def forget_session(self, session_id: str) -> None:
        self._last.pop(session_id, None)
        self._displaced.pop(session_id, None)

    def _first_in_ring(self, session_id: str, candidates: Collection[SlotName]) -> SlotName:
        wanted = set(candidates)
        for s in self._ring.walk(session_id):
            if s in wanted:
                return s
        return min(wanted)  # pragma: no cover - candidates are always known slots


def _remember(table: OrderedDict[str, SlotName], key: str, value: SlotName, cap: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > cap:
        table.popitem(last=False)
