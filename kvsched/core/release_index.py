"""The release order's index: which sessions hold pins, and in what order they lose them, without scanning the table.

The retention policy's session table holds every session it has seen (up to `max_sessions`, 100,000 by default), most
of them without a pin; the order only concerns the pinned ones. This index keeps them apart, and a heap of (value,
activity, version) entries (ints: `rank`). Any event of a session marks it (`changed`, O(1)); a decision that needs
the heap first keys the marked sessions at its own time (O(log n) each). An entry whose version is not its session's
is stale and dropped when it reaches the top (lazy invalidation); the heap is rebuilt from its live entries when stale
ones outnumber them.
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
import math
from collections.abc import Callable, Generator, Iterator, Sequence

from kvsched.core.retention_records import SessionRecord
from kvsched.core.scoring import Candidate, select_lowest
from kvsched.core.sessions import SessionKey

INF = math.inf
EXACT_LIMIT = 32  # pinned sessions up to which a decision scans them all (~5 us per session, with the value)
REKEY_GROWTH = 3.0  # a key keyed at idle time i is looked at again at idle 4i + REKEY_FLOOR_S (one quadrupling)
REKEY_FLOOR_S = 1.0

Score = Callable[[SessionRecord, float], float]
CandidateOf = Callable[[SessionRecord, float], Candidate]
Selector = Callable[[Sequence[Candidate], int], list[int]]
# The heaps' entries are ints, compared as the tuples they stand for: (value's rank, activity, version) in the release
# heap, (due time's rank, version) in the due heap; a version names its session (`_keyed`). A rank keeps its float's
# order (`rank`); activity and version are counters, each below 2**64 (one per event of a session, or per re-keying:
# 2**64 is ~580,000 years at a million a second). Past it, or negative, a field runs into its neighbour (found by
# review: the sessions keyed past 2**64 versions were not offered; a negative activity read as a value just below 0),
# so a keying refuses it (OverflowError). They were lists [value, activity, version, session]: each heap step compared
# two lists element by element (a rich comparison each), and each list was a container the garbage collector counts
# and walks (BENCHMARKS.md, "The release index's heap entries and the garbage collector"); an int is neither.
LOW = (1 << 64) - 1  # an entry's low 64 bits: its version
ACTIVITY_AND_VERSION = (1 << 128) - 1
ACTIVITY = 64  # where a release entry's activity starts; its value's rank starts at VALUE
VALUE = 128
TWO53 = 9007199254740992.0
EXP_BIAS = 1100  # above -frexp's lowest exponent (-1073, subnormals): a positive finite value's rank is above 0
INF_RANK = (2 * EXP_BIAS) << 53  # above every finite value's (frexp's highest exponent: 1024)
NAN_RANK = INF_RANK + 1  # NaN last, as the selector orders it


def rank(v: float) -> int:
    """An int in the order of the float `v` (0.0 and -0.0 alike, NaN above +inf): m x 2**e, 0.5 <= m < 1, as
    (e + EXP_BIAS, m's 53 bits), negated for a negative value."""
    if v > 0.0:
        if v == INF:
            return INF_RANK
        m, e = math.frexp(v)
        return ((e + EXP_BIAS) << 53) | int(m * TWO53)
    if v < 0.0:
        return -rank(-v)
    return 0 if v == 0.0 else NAN_RANK


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
        self._heap: list[int] = []  # idle pinned sessions (no request running or waiting), keyed when last seen
        self._queued: dict[SessionKey, SessionRecord] = {}  # pinned, a request waiting
        self._running: dict[SessionKey, SessionRecord] = {}  # pinned beyond its running requests, none waiting
        self._dirty: dict[SessionKey, SessionRecord] = {}  # changed since the heap last looked: keyed at the next one
        self._due: list[int] = []  # (when its key is due again, version)
        # version -> its session, for the versions of the due heap's entries (each keying has one there, until it is
        # popped or dropped): a heap entry whose version is not here, or not its session's, is stale.
        self._keyed: dict[int, SessionRecord] = {}
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
        close the iterator when done (entries set aside go back then). Compiled (mypyc), a generator dropped unclosed
        never runs that: the sessions it took or skipped are left out of the heap until their key is due again or
        their next event (found by review; pure Python's finalizer closes it)."""
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
        due, dirty, keyed = self._due, self._dirty, self._keyed
        versions = self._versions
        rekeyed = 0
        if due:
            now_rank = rank(now)
            pop = heapq.heappop
            while due and due[0] >> 64 <= now_rank:
                version = pop(due) & LOW
                rec = keyed.pop(version, None)  # its release entry is stale from here, whichever way
                if rec is not None and rec.version == version and rec.key not in dirty:
                    rec.version = next(versions)
                    dirty[rec.key] = rec
                    rekeyed += 1
        if rekeyed:
            self.counters["rekeyed"] += rekeyed
        if not dirty:
            return
        heap, push, score = self._heap, heapq.heappush, self.score
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
                if (rec.activity | version) >> ACTIVITY:  # negative, or past the 64 bits an entry gives each
                    raise OverflowError(f"session {key}: activity {rec.activity} or version {version} is outside "
                                        "[0, 2**64): it would run into its neighbour in a heap entry")
                entry = (rank(score(rec, now)) << VALUE) | (rec.activity << ACTIVITY) | version
                keyed[version] = rec  # (after the score: a score that raised left a version no due entry drops)
                push(heap, entry)
                last = rec.last_finished
                idle = now - last if last is not None and now > last else 0.0
                push(due, (rank(now + REKEY_GROWTH * idle + REKEY_FLOOR_S) << 64) | version)
        dirty.clear()

    def _live(self, entry: int) -> SessionRecord | None:
        """The session of a heap entry still current (its session unchanged since it was keyed), else None."""
        version = entry & LOW
        rec = self._keyed.get(version)
        return rec if rec is not None and rec.version == version else None

    def _drop_stale(self) -> None:
        """Rebuild both heaps from their current entries alone (a session's latest keying), in O(n) and without
        scoring anything: the order is the one the stale entries hid. (It used to key every pinned session again: at
        `kvsched bench sched`'s 10,000 sessions, one rebuild every ~300 steps scored ~10,000 sessions in one step.)"""
        self.counters["rebuilds"] += 1
        keyed = self._keyed
        due: list[int] = []
        for d in self._due:  # (a version is in `_keyed` while its due entry is in the due heap)
            version = d & LOW
            if (r := keyed.get(version)) is not None:
                if r.version == version:
                    due.append(d)
                else:
                    del keyed[version]
        # In place: a decision in progress holds the heap (and pushes back the entries it set aside when done).
        self._heap[:] = [e for e in self._heap if self._live(e) is not None]
        self._due[:] = due
        heapq.heapify(self._heap)
        heapq.heapify(self._due)

    def _from_heap(self, now: float, skip: set[SessionKey]) -> Iterator[SessionKey]:
        self._flush(now)
        heap, score = self._heap, self.score
        keyed = self._keyed
        pop, replace = heapq.heappop, heapq.heapreplace
        aside: list[int] = []  # valid entries not taken now (excluded): pushed back when the caller is done
        taken: set[SessionKey] = set()
        pops = rescored = 0  # (added to the counters once, at the end)
        try:
            while heap:
                top = heap[0]
                version = top & LOW
                rec = keyed.get(version)
                pops += 1
                if rec is None or rec.version != version:
                    pop(heap)  # stale
                    continue
                key = rec.key
                if key in taken or key in skip:
                    aside.append(pop(heap))
                    continue
                fresh = rank(score(rec, now))
                value = top >> VALUE
                if fresh > value and fresh != NAN_RANK and value != NAN_RANK:  # its value rose since it was keyed:
                    rescored += 1  # take its place again
                    replace(heap, (fresh << VALUE) | (top & ACTIVITY_AND_VERSION))
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
            # so its entry would only be popped again as stale (or dropped by a rebuild).
            push = heapq.heappush
            for entry in aside:
                if self._live(entry) is not None:
                    push(heap, entry)
