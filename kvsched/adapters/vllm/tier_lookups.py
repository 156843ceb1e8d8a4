"""The shared level's reads at a request's arrival, off the scheduler thread once the store is slow: the session's
metadata (its first request on this engine: did another replica serve its last turn?) and which of the blocks past what
the pool holds the store has (a pipelined EXISTS; from the pool's end, not the host tier's or the disk's, whose blocks
can leave while the lookup is out).

A fast store is read inline, on vLLM's scheduler thread, and the fetch is planned at the arrival (tier_levels,
`kvsched.core.store_health.ReadCost`). Inline, a slow or hung store would cost every running request up to the store's
socket timeout (0.5 s) per arrival. So once its reads are slow (or a step's inline reads used their budget) the
arrival queues a `Lookup` and returns; one daemon thread asks the store; the scheduler takes the answers once a step
(`poll`) and plans the fetches they found (tier_levels). The request whose blocks the store may hold waits meanwhile (the connector answers vLLM's `get_num_new_matched_tokens` with
None, as for a fetch: tier_fetches), at most `WAIT_S`; then it is scheduled with what the other levels hold and a late
answer only counts the session (moved or not). A lookup of the metadata alone makes no request wait.

Why a thread of its own: the levels' fetch threads run on the workers (an answer there comes back a step later, once
per rank) behind reads of megabytes, and the session-metadata writer's queue holds up to 4096 writes; a lookup behind
either would miss its deadline. The queue is bounded (`MAX_QUEUED`): a lookup that does not fit is not made (counted),
and its request goes on as with the store down. A store that hangs costs the thread one timeout, after which the
store's backoff (kvsched.core.store_health) skips the calls queued behind it.

Nothing the store holds or does raises here: a read that raises is an absent answer carrying the error, which the
scheduler counts (`store_bad_values`) and logs once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsched.adapters.vllm.tier_fetches import WAIT_FLOOR_S

logger = logging.getLogger("vllm.kvsched.fp8_tier")
WAIT_S = WAIT_FLOOR_S  # as a fetch: covers two store calls at their timeouts (0.5 s each) and a step or two
MAX_QUEUED = 256  # arrivals queued at once; a hung store answers them at the speed of its backoff's skips
MAX_BATCH = 64  # lookups asked in one round trip


@dataclass(frozen=True, slots=True)
class Lookup:
    """What to ask the store for `owner`'s request `request_id` (None: no request waits for the answer)."""

    request_id: str | None
    owner: Any
    meta_key: str | None  # the session's metadata key (its first request here), or None
    keys: tuple[bytes, ...] = ()  # blocks whose presence to check, prefix order
    names: tuple[str, ...] = ()  # their store keys, `len(names) // len(keys)` (the world size) per block
    moved: bool = False  # the session's metadata, read inline, named another replica (counted there)


@dataclass(slots=True)
class Answer:
    lookup: Lookup
    meta: Any = None  # the metadata value read (None: absent or not asked)
    present: list[bool] = field(default_factory=list)  # per name; empty: not asked, or the read failed
    errors: list[str] = field(default_factory=list)  # reads that raised (served as absent)
    live: bool = False  # its request was still waiting when the scheduler took the answer
    seconds: float | None = None  # the store's time for one read (a round trip) of its batch (ReadCost); None: down
    meta_failed: bool = False  # the metadata read failed (raised, or the store went down): the session is asked again

    def held(self) -> dict[bytes, bool]:
        """Block -> the store holds every rank's frame of it (a short or failed answer holds nothing)."""
        keys, names = self.lookup.keys, self.lookup.names
        if not keys or len(self.present) != len(names) or len(names) % len(keys):
            return {}
        per = len(names) // len(keys)
        return {k: all(self.present[i * per:(i + 1) * per]) for i, k in enumerate(keys)}


class StoreLookups:
    """The lookup thread and, on the scheduler thread, which requests wait for one and until when."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.monotonic, max_queued: int = MAX_QUEUED,
                 wait_s: float = WAIT_S, name: str = "kvsched-store-lookups") -> None:
        self.store = store
        self.clock = clock
        self.wait_s = wait_s
        self.counters: Counter[str] = Counter()
        self.pending: dict[str, float] = {}  # request id -> its deadline (scheduler thread only)
        self._waited: set[str] = set()  # counted once per request
        self._answers: deque[Answer] = deque()  # appended by the thread, taken by the scheduler
        self._q: queue.Queue[Lookup | None] = queue.Queue(max_queued)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- scheduler thread ---------------------------------------------------------------------------------------
    def submit(self, lookup: Lookup) -> bool:
        """Queue `lookup`; its request (if any) waits for the answer. False if the queue is full (not made)."""
        if self._closed:
            return False
        try:
            self._q.put_nowait(lookup)
        except queue.Full:
            self.counters["dropped"] += 1
            return False
        if lookup.request_id is not None:
            self.pending[lookup.request_id] = self.clock() + self.wait_s
        return True

    def poll(self) -> list[Answer]:
        """The answers in since the last poll; `live` for those whose request still waits (it waits no more)."""
        out: list[Answer] = []
        while self._answers:
            a = self._answers.popleft()
            rid = a.lookup.request_id
            a.live = rid is not None and self.pending.pop(rid, None) is not None
            out.append(a)
        return out

    def waiting(self, request_id: str) -> bool:
        """True if `request_id` waits for its lookup (unanswered, before its deadline). Side-effect free."""
        deadline = self.pending.get(request_id)
        return deadline is not None and self.clock() < deadline

    def outstanding(self, request_id: str) -> bool:
        """True until `request_id`'s answer is taken (`poll`) or its wait ended (`must_wait` past the deadline, `forget`,
        `close`): past the deadline too, while vLLM has not looked at the request (found by review: with the engine
        full, a request whose deadline passed unseen lost its answer, which came while it was still queued)."""
        return request_id in self.pending

    def must_wait(self, request_id: str) -> bool:
        """As `waiting`, counted: a request that waited (once), one whose deadline passed (once; it stops waiting
        and its answer, when it comes, plans nothing)."""
        deadline = self.pending.get(request_id)
        if deadline is None:
            return False
        if self.clock() < deadline:
            if request_id not in self._waited:
                self._waited.add(request_id)
                self.counters["waits"] += 1
            return True
        del self.pending[request_id]
        self._waited.discard(request_id)
        self.counters["overdue"] += 1
        return False

    def forget(self, request_id: str) -> None:
        """The request finished (or was aborted): it waits for nothing."""
        self.pending.pop(request_id, None)
        self._waited.discard(request_id)

    def close(self) -> None:
        """The levels go off (a prefix-cache reset): no request waits, queued lookups are not made."""
        self._closed = True
        self.pending.clear()
        self._waited.clear()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass  # the thread sees `_closed` at its next lookup and ends (found by review: it drained the queue
            # and then waited on it for good)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued lookup was answered (tests), at most `timeout_s`; True if so."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._q.unfinished_tasks

    # ---- the lookup thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            while batch[-1] is not None and len(batch) < MAX_BATCH:  # the lookups queued meanwhile: one round trip
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                if self._closed:
                    return
                lookups = [lk for lk in batch if lk is not None]
                if lookups:
                    self._answers.extend(self._ask(lookups))
                if len(lookups) < len(batch):  # the end marker
                    return
            finally:
                for _ in batch:
                    self._q.task_done()

    def _ask(self, lookups: list[Lookup]) -> list[Answer]:
        """The metadata of every lookup in one MGET and their blocks in one pipelined EXISTS: a store across a network
        answers a queue of lookups in two round trips, not two per lookup (`benchmarks/store_lookup_step.py`)."""
        answers, t, was_up = [Answer(lk) for lk in lookups], time.perf_counter(), self.store.up
        errors: list[str] = []
        metas = [a for a in answers if a.lookup.meta_key is not None]
        if metas:
            got = self._read(lambda: self.store.get_states([a.lookup.meta_key for a in metas]), errors)
            if isinstance(got, Sequence) and not isinstance(got, str) and len(got) == len(metas):
                for a, value in zip(metas, got, strict=True):
                    a.meta = value
            metas[0].errors += errors  # one read: counted once, whichever lookups it served
            if errors or not self.store.up:
                for a in metas:
                    a.meta_failed = True
        errors = []
        asked = [a for a in answers if a.lookup.names]
        names = [n for a in asked for n in a.lookup.names]
        if names:
            present = self._read(lambda: self.store.has_blocks(names), errors)
            if isinstance(present, Sequence) and not isinstance(present, str) and len(present) == len(names):
                at = 0
                for a in asked:
                    a.present = list(present[at:at + len(a.lookup.names)])
                    at += len(a.lookup.names)
            asked[0].errors += errors
        # one round trip's time, as inline; none if the store was down already (its guard skipped the calls at once:
        # they would pull the average down and send the first arrivals after an outage inline); a call that timed
        # out and took the store down counts (the store was slow)
        seconds = (time.perf_counter() - t) / max(bool(metas) + bool(names), 1) if was_up else None
        for a in answers:
            a.seconds = seconds
        return answers

    @staticmethod
    def _read(read: Callable[[], Any], errors: list[str]) -> Any:
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 - the engine must outlive any store value or client error
            errors.append(f"a store read failed ({type(exc).__name__}: {exc})")
            return None
