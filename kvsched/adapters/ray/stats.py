"""What an engine replica reports about itself, read from its own vLLM server: queue depth, recent P95 TTFT and the
sessions whose KV kvsched keeps pinned there.

TTFT comes from vLLM's `vllm:time_to_first_token_seconds` histogram (bucket deltas), in two readings:
- `ttft_p95_s`: the P95 of the requests that had their first token since the previous poll, held for `hold_s` (the
  pool's `autoscaling: {ttft_hold_s}`, as the fleet's P95 is held) when nothing new arrived, so an idle poll does not
  read as "fast": it may keep a pool from scaling down;
- `fresh_ttft_p95()`: the P95 of the first tokens since the previous autoscaling report that gave one, once there are
  MIN_TTFT_SAMPLES of them (None before; fewer gather for up to `span_s`): the only TTFT a pool scales up on (found
  by review: the held value scaled an idle pool from 2 to 8 replicas).
`span_s` (`SERIES_SPAN_S`) is the counting's own limit, not the pool's hold: a short `ttft_hold_s` must not make
every poll (Ray asks every 10 s) a new baseline of the counts, nor shorten what a fresh P95 gathers from.
Both difference cumulative counts (`kvsched.core.ttft_histogram.ServerCounts`, as Prometheus's `rate()` does): the
first scrape is a baseline only (an engine that served for hours before the replica first read it adds none of
those first tokens); a restarted vLLM server's counts start over: a drop is a counter reset, and what the server
counts after it is new; under data parallelism each engine's series (labels `engine`, `model_name`) resets on its
own. A series missing some of its last buckets, none of its counts lower, is skipped (`lacks_buckets`).
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvsched.adapters.ray.deadline_get import get
from kvsched.adapters.ray.poll_settings import POLL_DEADLINE_S
from kvsched.core.ttft_histogram import (
    SERIES_SPAN_S,
    TTFT_HOLD_S,
    ScrapeHealth,
    SeriesKey,
    ServerCounts,
    counter_increase,
    histogram_quantile,
    merge,
)

TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"
# First tokens a fresh P95 needs before it counts: with fewer, the "P95" is the slowest one or two (found by review:
# one cold 30k-token prefill was the whole P95 and asked an idle pool for three replicas); at 20, one sample lies
# above it. Fewer carry over to the next report, for up to `span_s`; a trickle below that is left to queue depth.
MIN_TTFT_SAMPLES = 20
GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running")


@dataclass(frozen=True, slots=True)
class Scrape:
    """The samples a replica reports: gauges by name summed over label sets (engines), TTFT buckets by bound per
    series (its labels but `le`: one series per engine), as counter resets are per engine."""

    gauges: dict[str, float]
    ttft_series: dict[SeriesKey, dict[float, float]]

    @property
    def ttft_buckets(self) -> dict[float, float]:
        """The TTFT buckets summed over engines."""
        return merge(self.ttft_series.values())


def read_metrics(text: str) -> Scrape:
    gauges: dict[str, float] = {}
    series: dict[SeriesKey, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GAUGES:
                gauges[sample.name] = gauges.get(sample.name, 0.0) + sample.value
            elif sample.name == TTFT_BUCKET and "le" in sample.labels:
                bound = float(sample.labels["le"])  # "+Inf" parses as inf
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                buckets = series.setdefault(key, {})
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Scrape(gauges, series)


def pinned_sessions(body: Any) -> list[str]:
    """The sessions an engine's `GET /kvsched/sessions` answer names as holding pinned KV, sorted: its
    `pinned_session_ids` (`?pinned_ids=1`), else its rows with pinned blocks. ValueError for an answer of another
    shape (a proxy's page, another server's JSON): it keeps the last list, as a failed read does."""
    if not isinstance(body, Mapping):
        raise ValueError(f"a session listing is a JSON object, got {type(body).__name__}")
    if "pinned_session_ids" in body:
        ids = body["pinned_session_ids"]
        if not isinstance(ids, list):
            raise ValueError(f"pinned_session_ids is a list, got {type(ids).__name__}")
        return sorted(str(s) for s in ids)
    rows = body.get("sessions", [])
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("sessions is a list of objects")
    return sorted(str(r["session_id"]) for r in rows if "session_id" in r and _pinned(r.get("pinned_blocks")))


def _pinned(blocks: Any) -> bool:
    return isinstance(blocks, int | float) and not isinstance(blocks, bool) and blocks > 0


@dataclass
class ReplicaStats:
    """Polled from one vLLM server; `snapshot()` is what the replica reports to Ray."""

    base_url: str
    admin_key: str | None = None  # lists every tenant's and salt's sessions (else only unsalted ones of no tenant)
    hold_s: float = TTFT_HOLD_S  # the held `ttft_p95_s`: the pool's `autoscaling: {ttft_hold_s}`
    span_s: float = SERIES_SPAN_S  # the counts' bookkeeping (`ServerCounts.hold_s`) and the fresh P95's gathering
    clock: Callable[[], float] = time.monotonic
    timeout_s: float = POLL_DEADLINE_S  # a poll's deadline: each read, whole (connect to last byte), within it
    queue_depth: float = 0.0
    running: float = 0.0
    ttft_p95_s: float | None = None
    kv_sessions: list[str] = field(default_factory=list)
    _counts: ServerCounts = field(init=False)  # every scrape's increase added up since the first (resets taken out)
    health: ScrapeHealth = field(default_factory=ScrapeHealth)  # whether the engine's metrics are being read
    _ttft_at: float = -math.inf
    _reported_buckets: dict[float, float] = field(default_factory=dict)  # `ttft_buckets` at the last fresh P95
    _reported_at: float = -math.inf
    _polling: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # Held only to apply a read or to read what was applied (never across the network): a snapshot is one poll's.
    _state: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._counts = ServerCounts(self.span_s)

    def update(self, metrics_text: str, sessions: Mapping[str, Any] | None) -> None:
        """Applies a scrape and, unless None, a session listing (`pinned_sessions`)."""
        self._apply(read_metrics(metrics_text), None if sessions is None else pinned_sessions(sessions))

    def _apply(self, scrape: Scrape, kv_sessions: list[str] | None) -> None:
        """(Parsed before taking the lock: only applying holds it.)"""
        with self._state:
            self.queue_depth = scrape.gauges.get("vllm:num_requests_waiting", 0.0)
            self.running = scrape.gauges.get("vllm:num_requests_running", 0.0)
            now = self.clock()
            delta = self._counts.add(scrape.ttft_series, now)
            p95 = histogram_quantile(delta, 0.95)
            if p95 is not None:
                self.ttft_p95_s, self._ttft_at = p95, now
            elif now - self._ttft_at > self.hold_s:
                self.ttft_p95_s = None
            if kv_sessions is not None:
                self.kv_sessions = kv_sessions

    def poll(self, timeout_s: float | None = None) -> None:
        """Blocking: read /metrics and /kvsched/sessions (run it in a thread), each within one deadline, `timeout_s`
        (default `self.timeout_s`, the router's `poll_deadline_s`) from now: past it, TimeoutError and a failed read.
        Found by review: a timeout per socket read let a /metrics sending a byte every 0.5 s hold a poll for as long
        as it dripped. The reads hold no lock; only applying them does (`_state`). One poll at a time: while one is in
        flight, another returns at once, the one in flight bringing the news. Found by review: Ray cancels
        record_autoscaling_stats after 10 s, but its thread runs on; the next poll ran beside it, and the older
        scrape applied after the newer read as a counter reset, counting the engine's history as new.

        The two reads run side by side, each given the whole deadline, and the session list applies whether or not
        /metrics was read. They feed different consumers: the router reads only the session list (which sessions
        this replica pins is what keeps a session's turns where its KV is), autoscaling the scrape. Read one after
        the other, the sessions read got what /metrics left of the deadline, and a slow /metrics starved it (found
        by review): the router kept a stale list, and a /metrics that hung or dripped kept it stale for as long as
        it did. Side by side, the poll still ends by the deadline, and a split of it would starve whichever read was
        given the smaller share."""
        if not self._polling.acquire(blocking=False):
            return
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        listed: list[list[str] | None | BaseException] = []  # what the sessions read ended with
        kv_sessions: list[str] | None = None
        read = False
        try:
            reader = threading.Thread(target=self._read_sessions, args=(deadline, listed), name="kvsched-sessions",
                                      daemon=True)
            reader.start()
            try:
                text = get(self.base_url + "/metrics", {}, deadline).decode()
            finally:
                reader.join()  # (its read ends by the same deadline)
                outcome = listed[0] if listed else None
                if isinstance(outcome, BaseException):
                    raise outcome  # not a failed read: a fault of this code, which must not pass unseen
                kv_sessions = outcome
            self._apply(read_metrics(text), kv_sessions)
            read = True
        finally:
            with self._state:
                if not read and kv_sessions is not None:  # the list read whatever /metrics did
                    self.kv_sessions = kv_sessions
                self.health.record(read, self.clock())  # a failed read: the counts reported are not current
            self._polling.release()

    def _read_sessions(self, deadline: float, out: list[list[str] | None | BaseException]) -> None:
        """The sessions read of a poll, run beside its /metrics read: its outcome appended to `out` (None: the list
        could not be read: an OSError or TimeoutError, a status other than 2xx, a reply cut short (IncompleteRead)
        or one that is not the engine's listing)."""
        try:
            out.append(pinned_sessions(self._all_sessions(deadline)))
        except (OSError, ValueError, http.client.HTTPException):
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - raised again in the poll's own thread
            out.append(exc)

    def _all_sessions(self, deadline: float) -> Any:
        """The ids of every session holding pinned KV on the engine (all salts and tenants with the admin key), in one
        call that walks the session table once (pages of the listing would walk it once per page)."""
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        return json.loads(get(self.base_url + "/kvsched/sessions?pinned_ids=1", headers, deadline))

    def fresh_ttft_p95(self) -> float | None:
        """The P95 TTFT of the first tokens counted since the previous call that returned one, None while they are
        fewer than MIN_TTFT_SAMPLES (they count in the next call's, unless they gathered for longer than `span_s`)."""
        with self._state:
            return self._fresh_ttft_p95()

    def _fresh_ttft_p95(self) -> float | None:
        buckets, now = self.ttft_buckets, self.clock()
        if self._reported_at == -math.inf:  # the first window starts at the first call
            self._reported_at = now
        delta = counter_increase(self._reported_buckets, buckets)  # a reset only if the buckets changed: start over
        if max(delta.values(), default=0.0) < MIN_TTFT_SAMPLES:  # cumulative: the top bucket counts them all
            if now - self._reported_at > self.span_s:  # too few for too long: no longer fresh, start over
                self._reported_buckets, self._reported_at = dict(buckets), now
            return None
        self._reported_buckets, self._reported_at = dict(buckets), now
        return histogram_quantile(delta, 0.95)

    @property
    def ttft_buckets(self) -> dict[float, float]:
        """The first tokens counted since the first scrape, cumulative by upper bound, summed over engines, resets
        taken out (the fleet's P95 merges these across replicas: `fleet_ttft.py`)."""
        with self._state:
            return dict(self._counts.total)

    def unread_s(self) -> float:
        """For how long the engine's metrics have gone unread (0: the last read succeeded, or none was tried)."""
        with self._state:
            return self.health.unread_s(self.clock())

    def snapshot(self) -> dict[str, Any]:
        """What the last poll applied, read whole (under `_state`: not half of one poll and half of the next)."""
        with self._state:
            return {"queue_depth": self.queue_depth, "running": self.running, "ttft_p95_s": self.ttft_p95_s,
                    "kv_sessions": list(self.kv_sessions), "ttft_unread_s": self.unread_s()}
