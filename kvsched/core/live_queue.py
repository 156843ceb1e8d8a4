"""Sessions in recency order with a live subset, whose members come out least recent first in O(log n) each:
the disk level's eviction visits only the sessions it may take a block from (kvsched.core.disk_tier)."""

from __future__ import annotations

import heapq
from collections.abc import Hashable

Owner = Hashable


class LiveQueue:
    """`touch` makes an owner the most recent; `mark` makes it live (queued at its recency), `drop` not live, `gone`
    forgets it. `first` is the least recent live owner, `pop_first` takes it off the queue and out of the live set.
    A heap of (recency stamp, owner) with lazy deletion: `_queued` holds each owner's current entry, the others are
    stale and skipped; rebuilt when mostly stale, so its size stays O(live)."""

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
        """Live (an owner never touched cannot be: it has no place in the order). A live owner is always queued at
        its stamp (`touch`; `pop_first` takes it out of both), so marking it again does nothing."""
        if owner not in self.live and owner in self._stamp:
            self.live.add(owner)
            self._push(owner)

    def drop(self, owner: Owner) -> None:
        self.live.discard(owner)

    def gone(self, owner: Owner) -> None:
        self.live.discard(owner)
        self._stamp.pop(owner, None)

    def first(self) -> Owner | None:
        """The least recent live owner, left queued (None: no live owner is queued); `pop_first` takes it off."""
        heap = self._heap
        while heap:
            stamp, owner = heap[0]
            current = self._queued.get(owner) == stamp
            if current and owner in self.live:
                return owner
            heapq.heappop(heap)  # stale (the owner touched since, queued again, or gone) or not live any more
            if current:
                del self._queued[owner]
        return None

    def pop_first(self) -> None:
        """Takes the owner `first` returned off the queue and out of the live set (`mark` puts it back)."""
        owner = heapq.heappop(self._heap)[1]
        del self._queued[owner]
        self.live.discard(owner)

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
