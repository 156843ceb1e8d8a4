"""The release order's index: which sessions hold pins, and in what order they lose them, without scanning the table.

The retention policy's session table holds every session it has seen (up to `max_sessions`, 100,000 by default), most
of them without a pin; the order only concerns the pinned ones. This index keeps them apart, and keeps a heap of
(value, activity, version, key) entries, one pushed whenever a session's value may have changed (its pin, a hit, a
partial release, any event of its own: `changed`). An entry whose version is not the session's is stale and dropped
when it reaches the top (lazy invalidation); the heap is rebuilt when stale entries outnumber live ones.

Up to `exact_limit` pinned sessions, the order is the exact scan: every candidate scored at the decision's time,
through the policy's selector (the C++/Triton kernels in the engine). Beyond it a decision takes entries off the heap
(O(log n) each): each one reaching the top is scored again at the decision's time and pushed back if its value rose
meanwhile, so the order is exact whenever values have not fallen since their session's last event (a value falls as an
idle session's expected return recedes; its pin's TTL bounds how long that can last). With unchanged values both
paths give the same order (tests/core/test_release_index.py checks it against the scan).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence

from kvsched.core.retention_records import SessionRecord
from kvsched.core.scoring import Candidate
from kvsched.core.sessions import SessionKey

EXACT_LIMIT = 32  # pinned sessions up to which a decision scans them all (~5 us per session, with the value)

Score = Callable[[SessionRecord, float], float]
CandidateOf = Callable[[SessionRecord, float], Candidate]
Selector = Callable[[Sequence[Candidate], int], list[int]]
Entry = tuple[float, int, int, SessionKey]


class ReleaseIndex:
    """Pinned sessions and their release order. `candidate(rec, now)` describes a session for the selector and
    `score(rec, now)` is its value (the selector's sort key); both come from the policy."""

    def __init__(self, candidate: CandidateOf, score: Score, selector: Selector, exact_limit: int = EXACT_LIMIT
                 ) -> None:
        self.candidate = candidate
        self.score = score
        self.selector = selector
        self.exact_limit = exact_limit
        self.pinned: dict[SessionKey, SessionRecord] = {}
        self._heap: list[Entry] = []
        self._versions = itertools.count(1)
        self.counters = {"heap_pops": 0, "rescored": 0, "rebuilds": 0}

    def __len__(self) -> int:
        return len(self.pinned)

    def changed(self, rec: SessionRecord, now: float) -> None:
        """The session's pin, value inputs or activity changed (call after every event of the session)."""
        rec.version = next(self._versions)
        if not rec.pinned:
            self.pinned.pop(rec.key, None)
            return
        self.pinned[rec.key] = rec
        if len(self._heap) > 2 * len(self.pinned) + 64:
            self._rebuild(now)
        else:
            heapq.heappush(self._heap, (self.score(rec, now), rec.activity, rec.version, rec.key))

    def forget(self, key: SessionKey) -> None:
        self.pinned.pop(key, None)

    def order(self, now: float, skip: set[SessionKey]) -> Iterator[SessionKey]:
        """Pinned sessions not in `skip` and with no request running, lowest value first (ties: least recently
        active first), then those with a request waiting to be scheduled, latest arrival first. Lazy: a caller that
        stops early pays for what it took; close the iterator when done (entries set aside go back then)."""
        if len(self.pinned) <= self.exact_limit:
            return iter(self._scan(now, skip))
        return self._from_heap(now, skip)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _scan(self, now: float, skip: set[SessionKey]) -> list[SessionKey]:
        keys: list[SessionKey] = []
        cands: list[Candidate] = []
        queued: list[tuple[float, int, SessionKey]] = []
        for rec in sorted(self.pinned.values(), key=lambda r: r.activity):
            if rec.key in skip or rec.active_requests > 0:
                continue
            if rec.waiting:
                queued.append((-(rec.waiting_since or now), len(queued), rec.key))
                continue
            keys.append(rec.key)
            cands.append(self.candidate(rec, now))
        order = [keys[i] for i in self.selector(cands, len(cands))] if cands else []
        return order + [key for *_, key in sorted(queued)]

    def _from_heap(self, now: float, skip: set[SessionKey]) -> Iterator[SessionKey]:
        heap = self._heap
        aside: list[Entry] = []  # valid entries of sessions not releasable now: pushed back when the caller is done
        queued: list[tuple[float, int, SessionKey]] = []
        taken: set[SessionKey] = set()
        try:
            while heap:
                entry = heap[0]
                value, activity, version, key = entry
                rec = self.pinned.get(key)
                self.counters["heap_pops"] += 1
                if rec is None or rec.version != version:
                    heapq.heappop(heap)  # stale
                    continue
                if key in taken or key in skip or rec.active_requests > 0 or rec.waiting:
                    aside.append(heapq.heappop(heap))
                    if rec.waiting and key not in taken and key not in skip and not rec.active_requests:
                        queued.append((-(rec.waiting_since or now), activity, key))
                    continue
                fresh = self.score(rec, now)
                if fresh > value:  # its value rose since it was keyed: take its place again
                    self.counters["rescored"] += 1
                    heapq.heapreplace(heap, (fresh, activity, version, key))
                    continue
                aside.append(heapq.heappop(heap))
                taken.add(key)
                yield key
            for *_, key in sorted(queued):
                rec = self.pinned.get(key)
                if rec is not None and key not in taken:
                    yield key
        finally:
            for entry in aside:
                heapq.heappush(heap, entry)

    def _rebuild(self, now: float) -> None:
        self.counters["rebuilds"] += 1
        self._heap = [(self.score(r, now), r.activity, r.version, r.key) for r in self.pinned.values()]
        heapq.heapify(self._heap)
