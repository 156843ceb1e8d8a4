"""A worker's fetch thread for the levels under the FP8 host tier, and the fetches it owes the scheduler: each fetch
queued on it is reported over (`collect`) whatever happens to it, so its host slot and its file's pin are released.

- Read, or failed (a chunk that raises an Exception reports its blocks unfilled): reported by the thread's job.
- Given up: a fetch still queued when the scheduler stops counting on it (`Fetch.keep_s`, sent by the scheduler's
  `FetchBook.started`: its wait deadline plus `STUCK_AFTER_S`, tier_fetches) is reported unfilled, never read. The
  one fetch thread reads in order, so a read that hangs (a dead NFS server) holds every fetch queued behind it; each
  is given up as its own time comes, the moment the scheduler takes it for stuck (found by review: the worker gave
  them up once a read had run 30 s, whatever the fetches' own deadlines, so it kept a fetch the scheduler had long
  given up on, or gave up one it still counted on). The hung read itself stays unreported, its slot and pin held:
  it may still write its slot.
- The thread killed: a BaseException that is not an Exception (a library's SystemExit, asyncio's CancelledError, a
  greenlet's exit) ends the thread, which the writer's loop does not catch. It left every fetch queued behind it
  unreported: pins and host slots held for good, requests waiting to their deadline (found by review). Now the
  next report finds the thread dead (`fetch_thread_deaths`, logged once), reports the chunk it held and every fetch
  queued on it unfilled (their slots fail the host checksum), and starts a new thread: an operator expects the disk
  and shared levels to keep serving after one odd failure, as the engine does, rather than read as empty for the
  rest of the process. A killer that comes back at every read would kill a thread per chunk: after
  MAX_FETCH_RESTARTS deaths no thread is started and every later fetch is refused at once (reported unfilled in the
  step that planned it, `levels_dropped_fetch_jobs`), so no request waits for a fetch nothing will run; logged once.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from kvsched.adapters.vllm.tier_level_ops import Fetch
from kvsched.adapters.vllm.tier_writer import BackgroundWriter

logger = logging.getLogger("vllm.kvsched.fp8_tier")
MAX_FETCH_RESTARTS = 3  # fetch threads started after a death; then every later fetch is refused
Outcome = tuple[Fetch, bool]  # (fetch, slot filled)


class FetchThread(BackgroundWriter):
    """The writer's bounded queue and thread, whose death can be seen."""

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class WorkerFetches:
    """The fetch thread of one worker (`thread`), the fetches queued on it and those over since the last `collect`.
    `read(chunk, taken)` reads a chunk on the thread, taking each fetch (`take`) just before its read and adding it
    to `taken`; `invalidate(slots)` makes slots fail the host checksum."""

    def __init__(self, name: str, read: Callable[[list[Fetch], list[Fetch]], list[Outcome]],
                 invalidate: Callable[[list[int]], None], clock: Callable[[], float]) -> None:
        self.name = name
        self._read = read
        self._invalidate = invalidate
        self._clock = clock
        self.thread = FetchThread(name)
        self.counters: Counter[str] = Counter()
        self._carried: Counter[str] = Counter()  # the counters of threads that died
        self._lock = threading.Lock()  # a queued fetch is either taken by the thread or given up, never both
        self._queued: dict[Fetch, float] = {}  # on the thread's queue, not yet taken: when it is given up
        self._next_give_up = math.inf  # no queued fetch is due before then
        self._in_hand: list[Fetch] = []  # taken by the thread's current job, not reported yet
        self._died: str | None = None  # what killed the thread, set on its way out
        self.refusing = False  # MAX_FETCH_RESTARTS threads died: every fetch is refused

    def submit(self, chunk: list[Fetch]) -> list[Outcome]:
        """Queue one chunk; returns it unfilled at once if it is not queued (a full queue, or no thread left)."""
        if self.refusing:
            self.counters["refused_fetch_jobs"] += 1
            return [(f, False) for f in chunk]
        now = self._clock()
        with self._lock:
            for f in chunk:
                self._queued[f] = now + f.keep_s
            self._next_give_up = min(self._next_give_up, *(now + f.keep_s for f in chunk))
        if self.thread.submit(lambda: self._job(chunk)):
            return []
        with self._lock:
            for f in chunk:
                self._queued.pop(f, None)
        return [(f, False) for f in chunk]

    def take(self, fetches: Sequence[Fetch]) -> list[Fetch]:
        """On the fetch thread: of `fetches`, those still queued, now being read (no longer to be given up)."""
        with self._lock:
            taken = [f for f in fetches if self._queued.pop(f, None) is not None]
            self._in_hand += taken
        return taken

    def collect(self) -> list[Outcome]:
        """In the step (the worker's report): the fetches over since the last call; a dead thread's too."""
        out: list[Outcome] = []
        if self._died is not None or not self.thread.alive:
            out += self._bury()
        out += self._give_up_due()
        out += [r for batch in self.thread.drain() for r in batch]
        return out

    def thread_counters(self) -> Counter[str]:
        """The fetch threads' own counters (dropped and failed jobs), the dead ones' included."""
        return self._carried + self.thread.counters

    # ---- internals ----------------------------------------------------------------------------------------------
    def _job(self, chunk: list[Fetch]) -> list[Outcome]:
        """On the fetch thread: one chunk, every fetch of it reported whatever happens (a chunk that raised was never
        reported: its slots stayed held and its files pinned for good). A BaseException ends the thread: `_bury`
        reports what it held."""
        taken: list[Fetch] = []
        try:
            try:
                out = self._read(chunk, taken)
            except Exception:  # noqa: BLE001 - a cache never fails: those blocks are recomputed
                self.counters["failed_fetch_jobs"] += 1
                logger.exception("kvsched disk/shared tier: a fetch of %d blocks failed", len(chunk))
                out = [(f, False) for f in taken + self.take(chunk)]  # and those not taken yet: never read
        except BaseException as exc:  # not ours to swallow: the thread ends, its fetches are reported (`_bury`)
            self._died = f"{type(exc).__name__}: {exc}"
            raise
        with self._lock:
            self._in_hand.clear()
        return out

    def _bury(self) -> list[Outcome]:
        """The thread died: what it held and every fetch queued on it are over, unfilled (their jobs sit in its queue
        and will never run); then a new thread, or none past MAX_FETCH_RESTARTS."""
        dead = self.thread
        out = [r for batch in dead.drain() for r in batch]  # jobs done before it died
        with self._lock:
            owed, self._in_hand = self._in_hand + list(self._queued), []
            self._queued.clear()
            self._next_give_up = math.inf
        try:
            self._invalidate([f.slot for f in owed])  # a fill cut short must never verify
        except Exception:  # noqa: BLE001 - reported unfilled either way
            logger.exception("kvsched disk/shared tier: invalidating the slots of a dead fetch thread failed")
        out += [(f, False) for f in owed]
        self.counters["fetch_thread_deaths"] += 1
        self._carried += dead.counters
        deaths, cause = self.counters["fetch_thread_deaths"], self._died or "killed"
        self._died = None
        if deaths <= MAX_FETCH_RESTARTS:
            self.thread = FetchThread(self.name)
        else:
            self.refusing = True
        if deaths == 1 or self.refusing:
            logger.error("kvsched disk/shared tier: the fetch thread %s died (%s); %d fetches it held or had queued "
                         "are reported unfilled (recomputed); %s (levels_fetch_thread_deaths)", self.name, cause,
                         len(owed), "a new one runs" if not self.refusing else
                         f"{deaths} died: no new one, every later fetch of this worker is refused (recomputed)")
        return out

    def _give_up_due(self) -> list[Outcome]:
        """Fetches still queued past their time (`Fetch.keep_s`): the scheduler no longer counts on them. Over,
        unfilled, never read (the thread skips them); their files stay."""
        now = self._clock()
        if now < self._next_give_up:
            return []
        with self._lock:
            due = [f for f, at in self._queued.items() if at <= now]
            for f in due:
                del self._queued[f]
            self._next_give_up = min(self._queued.values(), default=math.inf)
        if due and not self.counters["fetches_given_up"]:
            logger.warning("kvsched disk/shared tier: %d fetches still queued when the scheduler stopped waiting for "
                           "them (a hung or slow disk or store?) are given up, recomputed (further ones are counted "
                           "in levels_fetches_given_up, not logged)", len(due))
        self.counters["fetches_given_up"] += len(due)
        return [(f, False) for f in due]
