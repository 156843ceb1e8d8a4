"""The release order's index: which sessions hold pins, and in what order they lose them, without scanning the table.

The retention policy's session table holds every session it has seen (up to `max_sessions`, 100,000 by default), most
of them without a pin; the order only concerns the pinned ones. This index keeps them apart, and a heap of (value,
activity, version, key) entries. Any event of a session marks it (`changed`, O(1)); a decision that needs the heap
first keys the marked sessions at its own time (O(log n) each). An entry whose version is not its session's is stale
and dropped when it reaches the top (lazy invalidation); the heap is rebuilt from its live entries when stale ones
outnumber them.
Sessions with a request waiting are kept apart (released last, latest arrival first), and so are those with a request
running whose pin may hold blocks no running request of theirs holds (`SessionRecord.pin_beyond_running`: a turn that
finished beside another of its session pinned its prefix): released after the idle ones, lowest value first, tail
first, so only what their requests do not hold is freed. Found by review: they were never victims, so a title request
running beside a chat turn kept the turn's pin from every other session's shortage and from its TTL until it finished
(another session's request waited 295 steps on vLLM's scheduler; stock vLLM: 0). A running session whose pin is all
its request hit (a turn's start cuts the pin to that) is not in the order: a release would free nothing.
`releasable_blocks` bounds, in O(1), what releasing every pin in the order could free.

Up to `exact_limit` pinned sessions the order is the exact scan: every candidate scored at the decision's time, through
the policy's selector (the C++/Triton kernels in the engine). Beyond it a decision takes entries off the heap (O(log n)
each); the one at the top is scored again at the decision's time and pushed back if its value rose since it was keyed.
Values also fall: an idle session's expected return recedes with its idle time (past half its expected gap, roughly
as 1/idle). Keyed once, a session long idle kept the high key of its first seconds and outlived a session whose turn
had just ended (found by review: the heap's victim up to 44x the lowest value; on a generated trace at a 600 s TTL,
0.945 of LRU's prefill against the scan's 0.902). So a session keyed at idle time i is keyed again once its idle time
reaches 4i + REKEY_FLOOR_S (a second heap of due times, looked at by each decision): its key is never more than one
quadrupling of idle time old, O(log TTL) keyings per idle spell. That trace at 600 s: 0.907 (heap) against the scan's
0.902; re-keying at each doubling instead, 0.908, and it cost 8% of kvsched's scheduler step at `kvsched bench sched`'s
10,000 sessions against 3% at each quadrupling (lockstep A/B, `python tools/sched_ab.py`, AMD EPYC, stop 45).
tests/core/test_release_index.py checks heap against scan with unchanged values, and the victim's value against the
scan's lowest as time runs. Measured with the heap from 0 / 32 / unbounded pinned sessions (before the re-keying):
`kvsched simulate --generate --quick` 0.924 / 0.920 / 0.918 of OPT's saving; the Mooncake conversation trace (live
3x) 135,120,095 / 135,120,095 / 135,122,143 prefill tokens, replayed in 1.30 / 1.34 / 1.85 s (LRU 0.44 s; Xeon, one
core).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from kvsched.core.retention_records import SessionRecord
from kvsched.core.scoring import Candidate, select_lowest
from kvsched.core.sessions import SessionKey

EXACT_LIMIT = 32  # pinned sessions up to which a decision scans them all (~5 us per session, with the value)
REKEY_GROWTH = 3.0  # a key keyed at idle time i is looked at again at idle 4i + REKEY_FLOOR_S (one quadrupling)
REKEY_FLOOR_S = 1.0

Score = Callable[[SessionRecord, float], float]
CandidateOf = Callable[[SessionRecord, float], Candidate]
Selector = Callable[[Sequence[Candidate], int], list[int]]
# The heaps' entries: [value, activity, version, session] and [when its key is due again, version, session], lists
# compared as the tuples they were. Each allocation of a container counts towards the garbage collector's next run,
# and a rebuild freed thousands at once, more than the count held (CPython 3.11 stops its count at 0): at `kvsched
# bench sched`'s 10,000 sessions kvsched's side ran 22 collections in 300 steps where stock vLLM's ran none, each
# walking every young object, vLLM's new requests' token lists among them (tools/sched_gc.py). So an entry found
# stale (popped, or left out by a rebuild) is kept and filled again by a later keying, and the heaps are typed as
# lists of `list[Any]`: compiled (mypyc), a list of `tuple[float, int, int, SessionKey]` unboxed each entry it read
# and boxed a new tuple for each it stored, so every entry moved (set aside and pushed back, kept by a rebuild) was
# allocated again.
Entry = list[Any]


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
        self._heap: list[Entry] = []  # idle pinned sessions (no request running or waiting), keyed when last seen
        self._queued: dict[SessionKey, SessionRecord] = {}  # pinned, a request waiting
        self._running: dict[SessionKey, SessionRecord] = {}  # pinned beyond its running requests, none waiting
        self._dirty: dict[SessionKey, SessionRecord] = {}  # changed since the heap last looked: keyed at the next one
        self._due: list[Entry] = []  # (when its key is due again, version, session)
        # Entries out of the heaps (found stale), refilled by later keyings: never more than a rebuild found.
        self._spare: list[Entry] = []
        self._spare_due: list[Entry] = []
        self._versions = itertools.count(1)
        self.counters = {"heap_pops": 0, "rescored": 0, "rebuilds": 0, "rekeyed": 0}
        self.releasable_blocks = 0  # pinned blocks of the sessions the order may offer (shared ones counted per pin)

    def __len__(self) -> int:
        return len(self.pinned)

    def changed(self, rec: SessionRecord) -> None:
        """The session's pin, requests, value inputs or activity changed (call after every event of the session).
        O(1): the session is scored when a decision next needs the heap."""
        rec.version = next(self._versions)
        n = rec.pinned_blocks
        if n > 0:  # `pinned`, without the property call (every event of every session)
            self.pinned[rec.key] = self._dirty[rec.key] = rec
            if rec.active_requests and not rec.pin_beyond_running:
                n = 0  # all its running request hit: no release frees any of it
        else:
            self.pinned.pop(rec.key, None)
            self._dirty.pop(rec.key, None)
            self._queued.pop(rec.key, None)
            self._running.pop(rec.key, None)
        if n != rec.releasable:
            self.releasable_blocks += n - rec.releasable
            rec.releasable = n

    def order(self, now: float, skip: set[SessionKey]) -> Generator[SessionKey, None, None]:
        """Pinned sessions not in `skip`: those with no request in flight, lowest value first (ties: least recently
        active first); then those with a request running and a pin beyond it, lowest value first; then those with a
        request waiting to be scheduled, latest arrival first. Lazy: a caller that stops early pays for what it took;
        close the iterator when done (entries set aside go back then)."""
        if len(self.pinned) <= self.exact_limit:
            yield from self._scan(now, skip)
        else:
            yield from self._from_heap(now, skip)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _scan(self, now: float, skip: set[SessionKey]) -> list[SessionKey]:
        recs: list[SessionRecord] = []
        running: list[SessionRecord] = []
        queued: list[tuple[float, int, SessionKey]] = []
        for rec in sorted(self.pinned.values(), key=lambda r: r.activity):
            if rec.key in skip or rec.pin_all_running:
                continue
            if rec.waiting:
                queued.append((-(now if rec.waiting_since is None else rec.waiting_since), len(queued), rec.key))
            elif rec.active_requests:
                running.append(rec)
            else:
                recs.append(rec)
        if not recs:
            order: list[SessionKey] = []
        elif self.selector is select_lowest:  # the scalar reference sorts by the score itself: no Candidate needed
            order = self._by_score(recs, now)
        else:
            order = [recs[i].key for i in self.selector([self.candidate(rec, now) for rec in recs], len(recs))]
        return order + self._by_score(running, now) + [key for *_, key in sorted(queued)]

    def _by_score(self, recs: list[SessionRecord], now: float) -> list[SessionKey]:
        """`recs` (in activity order) lowest value first, ties in their order. (The selector would skip a session with
        a request running: its candidate is marked in use.)"""
        score = self.score
        return [recs[i].key for _, i in sorted((score(rec, now), i) for i, rec in enumerate(recs))]

    def _flush(self, now: float) -> None:
        """Key the sessions changed since the last decision and those whose key is due again (stale entries dropped
        first when they pile up)."""
        if len(self._heap) > 2 * len(self.pinned) + 64 or len(self._due) > 4 * len(self.pinned) + 64:
            self._drop_stale()
        due, pinned, dirty = self._due, self.pinned, self._dirty
        versions = self._versions
        rekeyed = 0
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            _, version, key = entry
            self._spare_due.append(entry)
            rec = pinned.get(key)
            if rec is not None and rec.version == version and key not in dirty:
                rec.version = next(versions)  # its old entry is stale from here
                dirty[key] = rec
                rekeyed += 1
        if rekeyed:
            self.counters["rekeyed"] += rekeyed
        if not dirty:
            return
        heap, push, score = self._heap, heapq.heappush, self.score
        spare, spare_due = self._spare, self._spare_due
        queued, running = self._queued, self._running
        for key, rec in dirty.items():
            if queued:
                queued.pop(key, None)
            if running:
                running.pop(key, None)
            # A pin all its running request hit is never a victim (`pin_all_running`): its next event, the turn's
            # end, keys it again.
            if rec.waiting:
                if not rec.active_requests or rec.pin_beyond_running:
                    queued[key] = rec
            elif rec.active_requests:
                if rec.pin_beyond_running:
                    running[key] = rec
            else:
                version = rec.version
                entry = spare.pop() if spare else [0.0, 0, 0, key]
                entry[0], entry[1], entry[2], entry[3] = score(rec, now), rec.activity, version, key
                push(heap, entry)
                last = rec.last_finished
                idle = now - last if last is not None and now > last else 0.0
                entry = spare_due.pop() if spare_due else [0.0, 0, key]
                entry[0], entry[1], entry[2] = now + REKEY_GROWTH * idle + REKEY_FLOOR_S, version, key
                push(due, entry)
        dirty.clear()

    def _drop_stale(self) -> None:
        """Rebuild both heaps from their current entries alone (a session's latest keying), in O(n) and without
        scoring anything: the order is the one the stale entries hid. (It used to key every pinned session again: at
        `kvsched bench sched`'s 10,000 sessions, one rebuild every ~300 steps scored ~10,000 sessions in one step.)"""
        get = self.pinned.get
        self.counters["rebuilds"] += 1
        # In place: a decision in progress holds the heap (and pushes back the entries it set aside when done).
        heap: list[Entry] = []
        for e in self._heap:
            (heap if (r := get(e[3])) is not None and r.version == e[2] else self._spare).append(e)
        self._heap[:] = heap
        due: list[Entry] = []
        for d in self._due:
            (due if (r := get(d[2])) is not None and r.version == d[1] else self._spare_due).append(d)
        self._due[:] = due
        heapq.heapify(self._heap)
        heapq.heapify(self._due)

    def _from_heap(self, now: float, skip: set[SessionKey]) -> Iterator[SessionKey]:
        self._flush(now)
        heap, pinned, score, spare = self._heap, self.pinned, self.score, self._spare
        pop, replace = heapq.heappop, heapq.heapreplace
        aside: list[Entry] = []  # valid entries not taken now (excluded): pushed back when the caller is done
        taken: set[SessionKey] = set()
        pops = rescored = 0  # (added to the counters once, at the end)
        try:
            while heap:
                value, activity, version, key = heap[0]
                rec = pinned.get(key)
                pops += 1
                if rec is None or rec.version != version:
                    spare.append(pop(heap))  # stale
                    continue
                if key in taken or key in skip:
                    aside.append(pop(heap))
                    continue
                fresh = score(rec, now)
                if fresh > value:  # its value rose since it was keyed: take its place again
                    rescored += 1
                    top = heap[0]
                    top[0] = fresh
                    replace(heap, top)
                    continue
                aside.append(pop(heap))
                taken.add(key)
                yield key
            # The sessions kept apart: O(their number) for a decision that got this far (no idle pin was left).
            dirty = self._dirty
            for *_, key in sorted((score(r, now), r.activity, k) for k, r in self._running.items()
                                  if k not in skip and k not in taken and k not in dirty):
                yield key
            queued = sorted((-(now if r.waiting_since is None else r.waiting_since), r.activity, k)
                            for k, r in self._queued.items() if k not in skip and k not in taken and k not in dirty)
            for *_, key in queued:
                yield key
        finally:
            counters = self.counters
            counters["heap_pops"] += pops
            counters["rescored"] += rescored
            # Only the entries still live: a session the caller released changed (a new version) or left the pins,
            # so its entry would only be popped again as stale (or kept by a rebuild).
            push = heapq.heappush
            for entry in aside:
                rec = pinned.get(entry[3])
                if rec is not None and rec.version == entry[2]:
                    push(heap, entry)
                else:
                    spare.append(entry)
