"""TTL expiry of session pins: one heap entry per session, not one per finished turn (a session's later turns only
move its expiry later, so its entry is re-queued when it comes due instead of pushed on every turn)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping

from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import SessionKey

MIN_RECHECK_S = 1.0  # an expired pin whose session has a request queued is looked at again after its TTL, at least this


class ExpiryQueue:
    """(time, sequence, session) entries; a record's `expiry_queued` is the earliest time it is queued at."""

    __slots__ = ("heap", "_seq")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, SessionKey]] = []
        self._seq = itertools.count()

    def push(self, rec: SessionRecord, at: float) -> None:
        rec.expiry_queued = at
        heapq.heappush(self.heap, (at, next(self._seq), rec.key))

    def queue(self, rec: SessionRecord) -> None:
        """The session's pin expires at `rec.expires_at`: queue it unless an entry at or before then already is."""
        if rec.expiry_queued is None or rec.expires_at < rec.expiry_queued:
            self.push(rec, rec.expires_at)

    def clamp(self, sessions: Mapping[SessionKey, SessionRecord], ttl_s: float) -> int:
        """Held pins' TTLs bounded by `ttl_s` (the pin ledger's fallen cap), queued for their new expiry (those now
        past it are released by the next `due`). O(sessions), at most once per halving of the cap. Returns how many
        pins it shortened."""
        n = 0
        for rec in sessions.values():
            if rec.pinned_blocks and rec.ttl_s > ttl_s:
                rec.ttl_s = ttl_s
                self.queue(rec)
                n += 1
        return n

    def due(self, sessions: Mapping[SessionKey, SessionRecord], now: float) -> list[SessionRecord]:
        """The pinned sessions whose TTL has run out by `now`, except those whose next request is already queued: the
        session is back (its turn's start hands the blocks to the request; a prefetch from the tier may have made
        that pin after the TTL ran out, and releasing it would waste the restore), and those whose running turn hit
        all of the pin (its request holds the blocks: a release frees nothing, and the turn's end pins them again).
        Those are looked at again a TTL later (the pin still expires if the request is abandoned); sessions a later
        turn extended, at their expiry. A pin beyond the session's running requests (made when a turn finished beside
        another of it) expires: found by review, a side request running on kept the turn's pin past its TTL."""
        heap = self.heap
        out: list[SessionRecord] = []
        back: list[SessionRecord] = []
        taken: set[SessionKey] = set()
        while heap and heap[0][0] <= now:
            t, _, key = heapq.heappop(heap)
            rec = sessions.get(key)
            if rec is None:
                continue
            if rec.expiry_queued == t:
                rec.expiry_queued = None
            if not rec.pinned_blocks:
                continue
            if rec.expires_at > now:
                if rec.expiry_queued is None:
                    self.push(rec, rec.expires_at)
            elif key not in taken:  # `clamp` can leave a session two entries due at once (found by review: skipping
                # the second before this check left a re-pinned session with no entry, its pin never expiring)
                taken.add(key)
                (back if rec.waiting or rec.pin_all_running else out).append(rec)
        for rec in back:
            if rec.expiry_queued is None:
                self.push(rec, now + max(rec.ttl_s, MIN_RECHECK_S))
        return out
