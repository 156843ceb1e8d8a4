"""A fleet's TTFT quantile from its replicas' histograms: each replica's cumulative bucket counts over a window (the
difference of its first and last scrape in it) as a rate, summed bucket by bucket across replicas, and the quantile
interpolated inside its bucket as Prometheus's `histogram_quantile` does.

Why not the replicas' own P95s: no function of them is the fleet's. Their maximum (what the autoscaling policy used)
is an upper bound (a mixture's quantile lies between its parts'): with one replica of eight slow on 10% of its first
tokens, that replica's P95 is the slow tail while the fleet's is a fast one, and a pool scaled up when it was fine.

A histogram here is `{upper bound in seconds: cumulative count}` with a `+Inf` bound, as vLLM's
`vllm:time_to_first_token_seconds_bucket{le=...}` series give it. A server's scrapes are counted by `ServerCounts`:
its first scrape is a baseline, and each series (one per engine under data parallelism) resets on its own.
Pure logic: no Ray, no vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

Histogram = Mapping[float, float]  # upper bound (s, inf for +Inf) -> cumulative count
# One series of a server's histogram: its labels but `le`, sorted. vLLM 0.32 labels each engine's series
# (`model_name`, `engine`: vllm/v1/metrics/loggers.py), so a data-parallel server exports one per engine.
SeriesKey = tuple[tuple[str, str], ...]
BUCKET_PREFIX = "ttft_le:"  # the replica's per-bucket autoscaling metric: "ttft_le:0.25", "ttft_le:+Inf"
# How long the last P95 TTFT keeps a pool from scaling down once too few first tokens follow it: the default of a
# pool's `autoscaling: {ttft_hold_s}` (`routing_autoscale.AutoscaleTargets`), for the fleet's P95 and, where the buckets
# do not merge, each replica's own held one.
TTFT_HOLD_S = 60.0
# The longest a server's counting carries anything across (`ServerCounts.hold_s`: a series unseen or lacking buckets
# this long starts over; first tokens too few for a fresh P95 gather this long): bookkeeping of the scrapes, not the
# pool's hold. Kept apart from it: a hold shorter than the polls' interval (Ray asks every 10 s) would make every
# scrape a new baseline, and no first token would ever count.
SERIES_SPAN_S = 60.0


def bucket_key(bound: float) -> str:
    return BUCKET_PREFIX + ("+Inf" if math.isinf(bound) and bound > 0 else repr(float(bound)))


def bucket_bound(key: str) -> float | None:
    """The upper bound a `bucket_key` names (None: not a bucket key, or a bound that is not a number)."""
    if not key.startswith(BUCKET_PREFIX):
        return None
    try:
        bound = float(key[len(BUCKET_PREFIX):])
    except ValueError:
        return None
    return None if math.isnan(bound) else bound


def histogram_quantile(buckets: Histogram, q: float) -> float | None:
    """The `q` quantile of a cumulative histogram, as Prometheus's `histogram_quantile` computes it: the rank
    `q * count(+Inf)` located in the first bucket whose cumulative count reaches it, interpolated linearly between
    that bucket's lower bound (the previous bound; 0 for the first, unless that bound is <= 0) and its upper bound; a
    rank in the +Inf bucket gives the highest finite bound. None where Prometheus gives NaN: no +Inf bucket, no
    observations (an empty window is no signal: neither 0 nor inf). Counts that dip are raised to the running
    maximum first (Prometheus's `ensureMonotonic`)."""
    bounds = sorted(b for b in buckets if not math.isnan(b))
    if not bounds or not math.isinf(bounds[-1]) or bounds[-1] < 0 or not 0.0 <= q <= 1.0:
        return None
    counts, top = [], 0.0
    for b in bounds:
        c = buckets[b]
        top = max(top, c if math.isfinite(c) else 0.0)
        counts.append(top)
    total = counts[-1]
    if total <= 0:
        return None
    if len(bounds) < 2:
        return None  # only +Inf: nothing to interpolate in (Prometheus: NaN)
    rank = q * total
    i = next(k for k in range(len(bounds)) if k == len(bounds) - 1 or counts[k] >= rank)
    if i == len(bounds) - 1:
        return bounds[-2]
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0 if i == 0 else bounds[i - 1]
    below = 0.0 if i == 0 else counts[i - 1]
    width = counts[i] - below
    return start + (bounds[i] - start) * ((rank - below) / width if width > 0 else 1.0)


def window_increase(scrapes: Sequence[Histogram]) -> dict[float, float] | None:
    """The counts a replica added over its window, from its scrapes oldest first: the sum of the differences of
    consecutive scrapes (the first scrape is the window's start, so traffic before it is not counted). A scrape with
    any bucket below the previous one's is a restarted server (its counters started over): its counts are all new,
    as Prometheus's `increase()` takes a counter reset. None if the scrapes' bucket bounds are not all the same (a
    changed layout cannot be differenced), a count is not finite, or there are none; one scrape: an empty window
    (all zero)."""
    if not scrapes:
        return None
    bounds = set(scrapes[0])
    if any(set(s) != bounds or not all(math.isfinite(c) for c in s.values()) for s in scrapes):
        return None
    added = dict.fromkeys(bounds, 0.0)
    for prev, cur in zip(scrapes, scrapes[1:], strict=False):
        for b, c in counter_increase(prev, cur).items():
            added[b] += c
    return added


def counter_increase(before: Histogram, now: Histogram) -> dict[float, float]:
    """What a server's cumulative counts added from one scrape (`before`) to the next (`now`), taking a counter reset
    as Prometheus's `rate()` and `increase()` do: a count below the previous one means the counters started over (the
    server restarted), so the whole of the new count is new, never a negative increase. One server's buckets start
    over together, so any bucket dropping (or a bound gone, or one added: a restart with other buckets) makes every
    count of `now` new, also those that grew past their old value (Prometheus, per series, would difference those).
    An empty `before` (no scrape yet): everything in `now` counts."""
    reset = bool(before) and (set(before) != set(now) or any(now[b] < c for b, c in before.items()))
    return dict(now) if reset else {b: c - before.get(b, 0.0) for b, c in now.items()}


def lacks_buckets(before: Histogram, now: Histogram) -> bool:
    """Whether `now` is a scrape missing some of `before`'s buckets, not a counter reset (no count below `before`'s):
    an incomplete scrape, whose counts cannot be differenced bucket by bucket (found by review: `counter_increase` read
    it as a restart with other bounds, so the server's whole history counted as new, in that scrape's increase and
    again in the next one's). Holding the missing buckets at their last counts is no cure either: the next scrape's
    increase in them then spans two scrapes, the others' one."""
    return bool(before) and not set(before) <= set(now) and all(c >= before[b] for b, c in now.items() if b in before)


def add_counts(total: Histogram, increase: Histogram) -> dict[float, float]:
    """A running total of increases (`counter_increase`), which never starts over when the server's counters do. An
    increase over other bounds than the total's (the server restarted with other buckets) starts the total over:
    counts measured against different bounds cannot be added."""
    if total and set(total) != set(increase):
        return dict(increase)
    return {b: total.get(b, 0.0) + c for b, c in increase.items()}


@dataclass(slots=True)
class ServerCounts:
    """One server's histogram counted across its scrapes, as Prometheus's `rate()` counts it. `total`: the first
    tokens counted since the first scrape, cumulative by bound, never starting over when a counter does (what the
    replica reports, so the fleet's windows see no resets); `hold_s`: how long a series may lack buckets of its last
    scrape (`lacks_buckets`) before that is its new layout (`SERIES_SPAN_S`; not the pool's `ttft_hold_s`).

    Why the first scrape is only a baseline: rate() needs two samples. A replica that joins the fleet (or restarts)
    reads an engine that may have served for hours; counting that history as new made the replica's own P95s those
    hours' first tokens (found by review). Why series by series: one engine restarting under data parallelism drops
    only its own counts; differencing the sum over engines read that as the whole server's reset, so every other
    engine's history counted as new (found by review). A series first seen after the server's baseline is its own
    baseline, as rate() needs two samples of each series: vLLM 0.32 exports every engine's series from its start
    (`create_metric_per_engine`, zeros until its first token), so one seen late either is new (an engine added, a
    renamed model: the first tokens of its first poll interval go uncounted) or was missing from the scrapes before
    with a history (counting that in full, as this did, read hours of an engine's first tokens as one scrape's: the
    first-scrape bug by another door). The safe side is the first: it never counts old first tokens as new. One
    missing from a scrape keeps its last counts, so it is differenced against them when it is back.

    A restart starts every count over, so a series whose bounds changed with no count below its last is no restart
    (found by review: each such case counted history again): lacking buckets past `hold_s`, the buckets it still has
    are differenced; with a bucket it did not have (its baseline or last scrape was incomplete), nothing of it can be
    differenced, so that scrape is its new baseline. A series with a bound that is no number, or a count not finite
    or negative, is skipped (found by review: a NaN was kept and made the total NaN for good; a negative one read as
    a reset); one seen broken before it had counts starts from its first countable scrape. A series not scraped for
    longer than `hold_s` (the polls failed, or it was missing) is differenced against nothing that old: that scrape
    is its new baseline, as rate() over a window never spans a longer gap (found by review: the minutes of first
    tokens a gap hid counted as one scrape's, in a 30 s fleet window)."""

    hold_s: float = SERIES_SPAN_S
    total: dict[float, float] = field(default_factory=dict)
    _last: dict[SeriesKey, dict[float, float]] = field(default_factory=dict)
    _complete_at: dict[SeriesKey, float] = field(default_factory=dict)
    _seen_at: dict[SeriesKey, float] = field(default_factory=dict)

    def add(self, scrape: Mapping[SeriesKey, Histogram], now_s: float) -> dict[float, float]:
        """Counts `scrape` (taken at `now_s`, in seconds) and returns what it added since the scrape before, summed
        over series: all zero for the baseline, empty when nothing could be counted (no series, or all lacking
        buckets, new baselines or broken)."""
        broken = [k for k, h in scrape.items() if not _countable(h)]
        scrape = {k: h for k, h in scrape.items() if k not in broken}
        if not self._last:
            if scrape:
                self._last = {k: dict(h) for k, h in scrape.items()}
                self._complete_at = dict.fromkeys(scrape, now_s)
                self._seen_at = dict.fromkeys((*scrape, *broken), now_s)  # a broken one starts when countable
                self.total = dict.fromkeys(merge(scrape.values()), 0.0)
            return dict(self.total)
        for key in broken:  # seen, with no counts to difference against: when countable, it starts from there
            if key not in self._last:
                self._seen_at.setdefault(key, now_s)
        increases = []
        for key, now in scrape.items():
            before = self._last.get(key, {})
            seen_at, self._seen_at[key] = self._seen_at.get(key), now_s
            if not before or (seen_at is not None and now_s - seen_at > self.hold_s):
                self._last[key], self._complete_at[key] = dict(now), now_s  # new, after a gap, or broken: a baseline
                continue
            if lacks_buckets(before, now) and now_s - self._complete_at.get(key, now_s) <= self.hold_s:
                continue  # skipped: its first tokens count in the series' next complete scrape
            self._complete_at[key] = now_s
            self._last[key] = dict(now)
            if before and set(before) != set(now) and all(c >= before[b] for b, c in now.items() if b in before):
                if set(now) <= set(before):  # buckets lost for good, none restarted: the rest are differenced
                    increases.append({b: c - before[b] for b, c in now.items()})
                continue  # else a bucket it had no count for: this scrape is the series' baseline
            increases.append(counter_increase(before, now))
        increase = merge(increases)
        if increase:
            self.total = add_counts(self.total, increase)
        return increase


def _countable(h: Histogram) -> bool:
    """Whether a series' scrape can be counted: some buckets, every bound a number, every count finite and >= 0."""
    return bool(h) and all(not math.isnan(b) and math.isfinite(c) and c >= 0 for b, c in h.items())


UNSCRAPED_GRACE_S = 60.0  # how long a live replica's engine metrics may go unread before the fleet P95 is incomplete


@dataclass(slots=True)
class ScrapeHealth:
    """A replica's reads of its engine's metrics: whether the counts it reports are current. `unread_s`: 0 while the
    last read succeeded, else for how long none has (since its first try, for a replica that never read them: its
    endpoint failing from the start; else since its last good one)."""

    first_try_s: float | None = None
    last_ok_s: float | None = None
    failures: int = 0  # in a row

    def record(self, ok: bool, now_s: float) -> None:
        if self.first_try_s is None:
            self.first_try_s = now_s
        if ok:
            self.last_ok_s, self.failures = now_s, 0
        else:
            self.failures += 1

    def unread_s(self, now_s: float) -> float:
        if not self.failures:
            return 0.0
        since = self.last_ok_s if self.last_ok_s is not None else self.first_try_s
        return max(0.0, now_s - since) if since is not None else 0.0

    def state(self, now_s: float, grace_s: float = UNSCRAPED_GRACE_S) -> str:
        """"not tried" (no poll yet), "ok", "failing" (within `grace_s`), "never read" or "stale" (past it)."""
        if self.unread_s(now_s) <= 0:
            return "ok" if self.last_ok_s is not None else "not tried"
        if self.unread_s(now_s) <= grace_s:
            return "failing"
        return "stale" if self.last_ok_s is not None else "never read"


@dataclass(frozen=True, slots=True)
class FleetQuantile:
    """`value`: the fleet's quantile in seconds (None: no signal: too few first tokens in the window, or not mergeable);
    `samples`: first tokens in the merged windows; `replicas`: how many replicas' windows were merged (one with fewer
    than two scrapes in it has none yet); `merged`: False when the replicas' histograms could not be merged (`note`
    says why): the caller falls back to another signal and says so. `unscraped`: live replicas whose engine metrics
    went unread for longer than the grace (`fleet_quantile`), left out: `value` is then the others' P95 only, not the
    fleet's (`complete` is False), and says nothing of their load. `unread`: every live replica whose engine metrics
    are unread now, within the grace or past it (their load is unknown either way: a pool must not scale down on the
    others' alone)."""

    value: float | None
    samples: float
    replicas: int
    merged: bool
    note: str
    unscraped: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.unscraped


def fleet_quantile(windows: Mapping[object, Sequence[tuple[float, Histogram]]], q: float = 0.95,
                   min_samples: float = 1.0, unread_s: Mapping[object, float] | None = None,
                   grace_s: float = UNSCRAPED_GRACE_S) -> FleetQuantile:
    """`fleet_quantile_of` for the replicas whose engine metrics are being read. `unread_s`: per live replica, for how
    many seconds its scrapes of its engine have been failing (`ScrapeHealth.unread_s`; 0 or absent: read). One unread
    for longer than `grace_s` is left out (its buckets, if any, are old counts: they would read as a replica with no
    first tokens) and named in `unscraped`; one unread for less that has no buckets yet is waited for, as a replica
    with no window yet is. Found by review: a replica whose metrics failed from its start reported no buckets and was
    silently left out, so the fleet's P95 was the healthy replicas' alone and read as complete."""
    unread = {str(r): float(t) for r, t in (unread_s or {}).items() if math.isfinite(t) and t > 0}
    late = tuple(sorted(r for r, t in unread.items() if t > grace_s))
    have = {str(r) for r, timed in windows.items() if timed}
    pending = sorted(r for r, t in unread.items() if t <= grace_s and r not in have)
    fleet = fleet_quantile_of({r: w for r, w in windows.items() if str(r) not in late}, q, min_samples)
    if pending and fleet.merged:
        fleet = FleetQuantile(None, fleet.samples, fleet.replicas, True,
                              f"replica {pending[0]}'s engine metrics not read yet")
    if not late:
        return replace(fleet, unread=tuple(sorted(unread)))
    gone = ", ".join(f"{r} ({unread[r]:.0f} s)" for r in late[:3])
    return FleetQuantile(fleet.value, fleet.samples, fleet.replicas, fleet.merged,
                         f"{fleet.note}; engine metrics unread: {gone}{' ...' if len(late) > 3 else ''}, left out: "
                         f"the P95 is the other replicas' only", late, tuple(sorted(unread)))


def fleet_quantile_of(windows: Mapping[object, Sequence[tuple[float, Histogram]]], q: float = 0.95,
                      min_samples: float = 1.0) -> FleetQuantile:
    """The fleet's `q` quantile from every replica's scrapes over the window (`windows`: replica -> `(time in seconds,
    histogram)` oldest first). Like Prometheus's `histogram_quantile(q, sum by (le) (rate(..._bucket[w])))`: each
    replica's increase over its own window is divided by that window's length, so replicas whose windows span
    different times (Ray keeps each replica's points from its own clock and push times) weigh by their rate of first
    tokens, not by how long their window happens to be. While a replica has fewer than two scrapes in it (just
    started, or its points not pushed yet) there is no fleet value: the others' alone are not the fleet's (found on a
    real Ray cluster: the one replica with a window was the slow one, and the pool scaled up on its P95 alone).
    Merged only if every replica has the same bucket
    bounds (the union of different layouts would put counts under bounds they were not measured against); else not
    merged. Fewer than `min_samples` first tokens in all: no value (a quantile of a handful is its slowest ones)."""
    layouts: list[tuple[object, frozenset[float]]] = []
    rates, samples, waiting = [], 0.0, []
    for replica, timed in windows.items():
        if not timed:
            continue
        inc = window_increase([h for _, h in timed])
        if inc is None:
            return FleetQuantile(None, 0.0, 0, False, f"replica {replica}'s bucket bounds changed within the window, "
                                                      "or a count is not finite")
        layouts.append((replica, frozenset(inc)))
        span = timed[-1][0] - timed[0][0]
        if len(timed) >= 2 and math.isfinite(span) and span > 0:
            rates.append({b: c / span for b, c in inc.items()})
            samples += inc.get(math.inf, 0.0)
        else:
            waiting.append(replica)
    if not layouts:
        return FleetQuantile(None, 0.0, 0, False, "no replica reported TTFT buckets")
    first, bounds = layouts[0]
    for replica, other in layouts[1:]:
        if other != bounds:
            return FleetQuantile(None, 0.0, 0, False,
                                 f"replica {replica}'s bucket bounds differ from replica {first}'s")
    if math.inf not in bounds:
        return FleetQuantile(None, 0.0, 0, False, "no +Inf bucket")
    n = len(rates)
    if waiting:
        return FleetQuantile(None, samples, n, True, f"replica {waiting[0]} has no window yet")
    if samples < max(min_samples, 1e-12):
        return FleetQuantile(None, samples, n, True, f"{samples:g} first token(s) in the window")
    return FleetQuantile(histogram_quantile(merge(rates), q), samples, n, True, f"{samples:g} first tokens")


def merge(histograms: Iterable[Histogram]) -> dict[float, float]:
    """Bucket-wise sum of histograms with the same bounds (cumulative counts add: a bound's count is the number of
    observations at or under it, replica by replica)."""
    out: dict[float, float] = {}
    for h in histograms:
        for b, c in h.items():
            out[b] = out.get(b, 0.0) + c
    return out
