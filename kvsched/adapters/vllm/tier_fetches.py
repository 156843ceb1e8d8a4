"""The scheduler side of the levels' background fetches: which host-tier slots a worker's fetch (tier_levels_worker) may
still be writing, until every worker reported it over, and whether a request waits for them.

A session's request whose prefix continues into blocks being fetched waits (the connector answers vLLM's
`get_num_new_matched_tokens` with None: "ask again next step"; vLLM 0.32's scheduler then skips it this step and keeps
it at the head of the waiting queue, and schedules the requests behind it) until the fetch has landed; kvsched's
prefetch then restores the blocks into the pool and the request runs on them as prefix-cache hits. Every other request
runs meanwhile: the fetch costs the engine's steps nothing.

The wait is bounded. A fetch that has not landed by its deadline (`WAIT_FLOOR_S` plus the bytes queued on the fetch
thread, its own included, at `WAIT_BYTES_PER_S`) means a stalled store or disk rather than a transfer: the request is
then scheduled without the blocks still missing and vLLM computes them, as with no level at all; the fetch goes on
and its blocks serve the session's next turn. The floor covers the store's own timeouts (0.5 s a call) and a step or
two of any engine; 200 MB/s is well under what one Redis client reached here (500-900 MiB/s, docs/shared_store.md),
so a healthy store lands first.

A fetch some worker has still not reported `STUCK_AFTER_S` past its deadline (a read hung on one rank) is taken as
stuck: its session's blocks may be evicted again (else the one fetch kept the whole session in the tier for good,
found by review), while its slot stays held until every report is in, since the stuck read may still write it.

One rule for both sides: the worker gives a fetch still queued (not yet being read) up at the same moment,
`STUCK_AFTER_S` past its deadline. `started` sends each fetch its time (`Fetch.keep_s`, seconds from the moment it is
planned: the worker counts them from when it queues the fetch, later, so it never gives up a fetch this book still
counts on), and the request waits only until the deadline, before. Found by review: the worker gave queued fetches
up once the read in front of them had run 30 s, whatever their deadlines: a fetch planned behind a read 29.9 s old was
given up while its request still waited for it, and one queued behind slow but returning reads was kept after the
book had stopped counting on it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

WAIT_FLOOR_S = 2.0
WAIT_BYTES_PER_S = 200e6
STUCK_AFTER_S = 30.0  # far beyond a slow store (0.5 s a call) or a loaded disk; a fetch unreported then has hung
logger = logging.getLogger("vllm.kvsched.fp8_tier")


@dataclass(slots=True)
class InFlight:
    key: Any
    deadline: float
    source: str  # the level it is read from (tier_levels.DISK, SHARED)
    reports: int = 0
    ok: bool = True
    stuck: bool = False  # unreported `STUCK_AFTER_S` past its deadline


class FetchBook:
    """Slots being filled in the background (the directory holds them: `TierDirectory.hold`), their deadlines, and the
    workers' reports. Owned by the connector's scheduler side, which outlives the levels (a prefix-cache reset turns
    them off while fetches may still be in flight)."""

    def __init__(self, directory: Any, world_size: int, block_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.world_size = world_size
        self.block_bytes = block_bytes
        self.clock = clock
        self.slots: dict[int, InFlight] = {}
        self.counters: Counter[str] = Counter()
        self._waited: set[str] = set()  # requests that waited for a fetch (counted once)
        self._overdue: set[str] = set()  # requests scheduled without blocks a fetch had not delivered (counted once)
        self._next_stuck = math.inf  # no fetch can be stuck before then
        self.lookups: Any = None  # the shared store's lookups at arrivals (tier_lookups.StoreLookups), if a store

    def started(self, fetches: Sequence[Any]) -> float:
        """`fetches` (tier_levels.Fetch) were planned into held slots this step. Returns how long a worker keeps them
        queued (`Fetch.keep_s`): until this book takes them for stuck, `STUCK_AFTER_S` past their deadline."""
        if not fetches:
            return math.inf
        now = self.clock()
        queued = len(self.slots) + len(fetches)  # one fetch thread per worker: those queued before go first
        deadline = now + WAIT_FLOOR_S + queued * self.block_bytes / WAIT_BYTES_PER_S
        for f in fetches:
            self.slots[f.slot] = InFlight(f.key, deadline, f.source)
        self._next_stuck = min(self._next_stuck, deadline + STUCK_AFTER_S)
        self.counters["fetches_started"] += len(fetches)
        return deadline + STUCK_AFTER_S - now

    def reported(self, landed: Sequence[tuple[Any, int, bool]]) -> list[tuple[Any, str, bool]]:
        """Workers' reports (key, slot, filled): a fetch is over once every worker reported it; only then may its slot
        be read (if filled everywhere) or given to another key. Returns the fetches over, (key, source, filled
        everywhere): each block once, whatever the number of workers (the levels count them)."""
        over: list[tuple[Any, str, bool]] = []
        for key, slot, ok in landed:
            f = self.slots.get(slot)
            if f is None or f.key != key:
                continue  # never expected: a slot is planned again only after its fetch is over
            f.reports += 1
            f.ok = f.ok and bool(ok)
            if f.reports >= self.world_size:
                del self.slots[slot]
                self.directory.landed(slot, key, f.ok)
                self.counters["fetches_landed" if f.ok else "fetches_failed"] += 1
                over.append((key, f.source, f.ok))
        return over

    def cancel(self, fetches: Sequence[Any]) -> None:
        """`fetches` were planned but will never reach a worker (the levels went off before the step was built):
        over, unfilled, now."""
        for f in fetches:
            entry = self.slots.get(f.slot)
            if entry is not None and entry.key == f.key:
                del self.slots[f.slot]
                self.directory.landed(f.slot, f.key, False)
                self.counters["fetches_cancelled"] += 1

    def expire(self) -> None:
        """Once a step: fetches unreported `STUCK_AFTER_S` past their deadline stop protecting their sessions
        (`TierDirectory.overdue`); their slots stay held until reported. Counted, logged once."""
        now = self.clock()
        if now < self._next_stuck:
            return
        stuck = [slot for slot, f in self.slots.items() if not f.stuck and now >= f.deadline + STUCK_AFTER_S]
        for slot in stuck:
            self.slots[slot].stuck = True
        self._next_stuck = min((f.deadline + STUCK_AFTER_S for f in self.slots.values() if not f.stuck), default=math.inf)
        if stuck:
            self.directory.overdue(stuck)
            if not self.counters["stuck_fetches"]:
                logger.warning("kvsched disk/shared tier: %d fetches unreported %.0f s past their deadline (a hung "
                               "read?): their sessions' blocks may be evicted; their slots stay held until reported "
                               "(further ones are counted in levels_fetch_stuck, not logged)", len(stuck), STUCK_AFTER_S)
            self.counters["stuck_fetches"] += len(stuck)

    def must_wait(self, request_id: str, key: Any) -> bool:
        """Should the request whose next prefix block is `key` wait for it (being fetched, or the store being asked
        whether it holds it, before the deadline)?"""
        if self.lookups is not None and self.lookups.must_wait(request_id):
            return True
        slot = self.directory.slot_of.get(key)
        f = self.slots.get(slot) if slot is not None else None
        if f is None:
            return False
        if self.clock() < f.deadline:
            if request_id not in self._waited:
                self._waited.add(request_id)
                self.counters["waited_requests"] += 1
            return True
        if request_id not in self._overdue:
            self._overdue.add(request_id)
            self.counters["overdue_requests"] += 1
        return False

    def forget_request(self, request_id: str) -> None:
        if self.lookups is not None:
            self.lookups.forget(request_id)
        self._waited.discard(request_id)
        self._overdue.discard(request_id)

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {"levels_fetching_blocks": float(len(self.slots)), "levels_fetch_waits": float(c["waited_requests"]),
                "levels_fetch_overdue": float(c["overdue_requests"]), "levels_fetch_stuck": float(c["stuck_fetches"])}
