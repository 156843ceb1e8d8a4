"""Sessions in recency order with a live subset, whose members come out least recent first in O(log n) each:
the disk level's eviction visits only the sessions it may take a block from (kvsched.core.disk_tier)."""

from __future__ import annotations

import heapq
from collections.abc import Hashable

Owner = Hashable


class LiveQueue:
    """`touch` makes an owner the most recent; `mark` makes it live (queued at its recency), `drop` not live, `gone`
    forgets it. `pop` takes the least recent live owner off the queue (it stays live: `mark` queues it again, `drop`
    ends it). A heap of (recency stamp, owner) with lazy deletion: `_queued` holds each owner's current entry, the
    others are stale and skipped; rebuilt when mostly stale, so its size stays O(live)."""

    def __init__(self) -> None:
        self._clock = 0
        self._stamp: dict[Owner, int] = {}
        self.live: set[Owner] = set()
        self._heap: list[tuple[int, Owner]] = []
        self._queued: dict[Owner, int] = {}

    def touch(self, owner: Owner) -> None:
        self._clock += 1
        self._stamp[owner] = self._clock
        if owner in self.live:
            self._push(owner)

    def mark(self, owner: Owner) -> None:
        """Live (an owner never touched cannot be: it has no place in the order)."""
        if owner in self._stamp:
            self.live.add(owner)
            self._push(owner)

    def drop(self, owner: Owner) -> None:
        self.live.discard(owner)

    def gone(self, owner: Owner) -> None:
        self.live.discard(owner)
        self._stamp.pop(owner, None)

    def pop(self) -> Owner | None:
        """The least recent live owner, off the queue; None when no live owner is queued."""
        while self._heap:
            stamp, owner = heapq.heappop(self._heap)
            if self._queued.get(owner) != stamp:
                continue  # stale: the owner was touched since (queued again), or is gone
            del self._queued[owner]
            if owner in self.live:
                return owner
        return None

    def _push(self, owner: Owner) -> None:
        stamp = self._stamp[owner]
        if self._queued.get(owner) == stamp:
            return
        if len(self._heap) > 2 * len(self.live) + 64:  # mostly stale: rebuilt from the live owners, amortised O(1)
            self._queued = {o: self._stamp[o] for o in self.live}
            self._heap = [(t, o) for o, t in self._queued.items()]
            heapq.heapify(self._heap)
            if self._queued.get(owner) == stamp:
                return
        self._queued[owner] = stamp
        heapq.heappush(self._heap, (stamp, owner))
