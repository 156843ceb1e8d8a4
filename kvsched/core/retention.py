"""The retention policy: which idle sessions keep their KV pinned, and which lose it first.

Events in (a turn started or finished, a session ended, time passed, memory is short), decisions out (Pin, Release).
The policy updates its own bookkeeping as it decides; the adapter (vLLM scheduler, simulator) must apply every
decision it receives. No engine types and no wall clock: time comes from the injected `clock`, so tests and the
simulator replay exact decisions.

"May it be released?" and "in what order?" are separate: a session whose running request holds all its pin is never a
victim (releasing frees nothing); among the others the order is `kvsched.core.scoring.retention_value`, lowest first,
fed with the session's expected time to its next turn given how long it has been idle
(`RetentionPolicy.expected_next_use_s`). Sessions with a request running and a pin beyond it (a turn that finished
beside another of its session) come after the idle ones, and those whose next request has already arrived and waits
to be scheduled come last, latest arrival first: their next use is now (in a burst, releasing one to admit another
only swaps whose history is prefilled again), and the engine serves its queue in arrival order
(`kvsched.core.release_index`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable

from kvsched.core.config import RetentionConfig
from kvsched.core.expiry import ExpiryQueue
from kvsched.core.next_use import GapModel
from kvsched.core.pin_payback import PinPayback
from kvsched.core.release_index import ReleaseIndex, Selector
from kvsched.core.retention_records import RELEASE_COUNTERS as COUNTER_NAMES
from kvsched.core.retention_records import Decision, Pin, Release, ReleaseReason, SessionRecord, SessionView, view_of
from kvsched.core.retention_values import ReleaseValues
from kvsched.core.return_model import ReturnModel
from kvsched.core.scoring import select_lowest
from kvsched.core.sessions import KNOWN_ROLES, SessionKey, TurnHints
from kvsched.core.shared_turns import shared_arrival, shared_finish_hints

__all__ = ["Clock", "Decision", "Pin", "Release", "ReleaseReason", "RetentionPolicy", "SessionRecord", "SessionView"]

Clock = Callable[[], float]
Applied = Callable[[Release], int]  # applies a release at once; returns the distinct blocks it freed
BUDGET_SLACK_DIVISOR = 128  # a budget release goes 1/128 of the budget below it (see budget_low_water_blocks)


class RetentionPolicy(ReleaseValues):
    """Session table + pin decisions for one KV block pool of `total_blocks` blocks."""

    TRIM_SCAN = 1024  # records looked past the excess when making room in the table

    def __init__(self, config: RetentionConfig, clock: Clock, total_blocks: int, bytes_per_token: float,
                 selector: Selector = select_lowest) -> None:
        if total_blocks <= 0:
            raise ValueError("total_blocks must be positive")
        self.config = config
        self.clock = clock
        self.total_blocks = total_blocks
        self.bytes_per_token = bytes_per_token
        self.selector = selector
        self.sessions: OrderedDict[SessionKey, SessionRecord] = OrderedDict()  # least recently active first
        self.pinned_blocks_total = 0
        self.expiry = ExpiryQueue()
        self.counters: Counter[str] = Counter()
        self.gaps = GapModel(self.GAP_WINDOW, self.MIN_TAIL_SAMPLES, roles=(*KNOWN_ROLES, *config.role_weights))
        self._activity = itertools.count(1)
        self.index = ReleaseIndex(self.candidate, self.score, selector)  # the pinned sessions and their order
        self.payback = PinPayback(config.payback(), total_blocks)  # the online fallback to LRU
        # Learned always, every turn's outcome awaited: a turn's value carries its class's learned return share
        # (`weight_of`); it decides pins only with a threshold (0 without one: every turn is likely).
        self.returns = ReturnModel(config.return_threshold or 0.0, config.default_ttl_s,
                                   inferred_prior=config.inferred_first_turn_weight)

    # ---- events -------------------------------------------------------------------------------------------------
    def request_arrived(self, key: SessionKey, hints: TurnHints, shared: bool = False, repeats: bool = False) -> None:
        """A request of the session reached the engine (counted; its hints refresh the session's role, unless it is
        `shared` and the session has one; `repeats` its last prompt: it keeps its pin: `kvsched.core.shared_turns`)."""
        rec = self.sessions.get(key)
        if rec is None:
            rec = self._new_record(key)
            self.counters["sessions_seen"] += 1
        self.counters["requests_with_session"] += 1
        shared_arrival(rec, hints.role, shared, repeats, self.counters)
        rec.waiting += 1
        rec.ended = False  # a request after the end: the id's next conversation
        if rec.waiting_since is None:
            rec.waiting_since = self.clock()
        self.returns.arrived(key, self.clock())  # the outcome of the session's last turn is known
        self._touch(rec)
        self.index.changed(rec)

    def request_abandoned(self, key: SessionKey) -> None:
        """A request of the session left the engine before it was ever scheduled (aborted, rejected)."""
        rec = self.sessions.get(key)
        if rec is not None:
            self._not_waiting(rec)
            self.index.changed(rec)

    def turn_started(self, key: SessionKey, cached_tokens: int) -> list[Decision]:
        """The session's request was scheduled with `cached_tokens` from the prefix cache.

        The pin stays while the turn runs (the request holds the same blocks, so it costs nothing) and is extended
        when the turn finishes; whatever part of the pin the request did not hit is released now (not a shared
        session's other answer, which a turn repeating its last prompt keeps: `kvsched.core.shared_turns`).
        Counted alike by engine and simulator: a retained hit is a turn hitting the pin kept in the pool since its last
        turn, its tokens that part (LRU may have kept some too); hits on tier prefetches are `prefetch_hit_tokens`."""
        rec = self.sessions.get(key) or self._new_record(key)
        now = self.clock()
        rec.active_requests += 1
        self._not_waiting(rec)
        if rec.last_finished is not None:
            self._observe_gap(rec, max(now - rec.last_finished, 0.0))
        if rec.pinned_blocks > 0 and cached_tokens > 0:
            kept = rec.pinned_tokens - rec.prefetched_tokens  # retained between turns; the rest came from the tier
            self.counters["retained_hits"] += kept > 0  # (found at stop 55: a pin the tier restored whole counted)
            self.counters["retained_hit_tokens"] += min(cached_tokens, kept)
            self.counters["prefetch_hit_tokens"] += min(max(cached_tokens - kept, 0), rec.prefetched_tokens)
        rec.prefetched_tokens = 0
        if cached_tokens > 0:
            rec.hits += 1
            rec.hit_tokens += cached_tokens
        self._touch(rec)
        decisions: list[Decision] = []
        if rec.pinned_blocks > 0 and cached_tokens < rec.pinned_tokens and not rec.keeps_pin:
            keep = rec.pinned_blocks * max(cached_tokens, 0) // max(rec.pinned_tokens, 1)
            decisions.append(self._release(rec, ReleaseReason.TURN, rec.pinned_blocks - keep if keep else None))
        rec.pin_beyond_running = rec.keeps_pin and cached_tokens < rec.pinned_tokens  # else the request holds the rest
        self.index.changed(rec)
        return decisions

    def prompt_seen(self, keys: Iterable[Hashable], cached_blocks: int, hittable: int | None = None) -> list[Decision]:
        """A request started with prompt block keys `keys` (prefix order), the first `cached_blocks` hit, for the pins'
        payback tracker: its switch releases every pin; its ledger caps new and held pins' TTLs (past: released now)."""
        switched, out = self.payback.observe(keys, cached_blocks, hittable), []
        if (cap := self.payback.clamp_due()) is not None:  # the ledger's cap fell (`PinLedger.clamp_due`)
            self.counters["payback_clamped_pins"] += self.expiry.clamp(self.sessions, cap)
            out = self.expire()
        if switched is not False:
            return out
        self.counters["payback_suspended"] += 1
        for key in self.release_order():  # lowest value first: its blocks are evicted first
            out.append(self._release(rec := self.sessions[key], ReleaseReason.PAYBACK))
            self.index.changed(rec)
        return out

    def finish_hints(self, key: SessionKey, hints: TurnHints, shared: bool = False) -> TurnHints:
        """A finishing request's hints as its session now stands: a session ended while the request ran ends with it
        (no pin). The engine and the simulator both ask here (found by review: the simulator pinned it again).
        `shared`: its turn joined an inferred session another conversation may continue (`Lineage.shared_join`): its
        end is not the other's (ignored, counted; the TTL expires the pin), its TTL does not shorten the other's, and
        its role does not replace the session's (`kvsched.core.shared_turns`)."""
        rec = self.sessions.get(key)
        if rec is not None and rec.ended:
            return hints if hints.end else dataclasses.replace(hints, end=True)
        if not shared or rec is None:
            return hints
        return shared_finish_hints(rec, hints, self.config.ttl_for(hints.ttl_s), self.counters)

    def turn_finished(self, key: SessionKey, hints: TurnHints, tokens: int, blocks: int,
                      whole_only: bool = False) -> list[Decision]:
        """A turn ended holding `blocks` full blocks (`tokens` tokens) of reusable prefix: pin it, within budget.
        `whole_only`: a release takes the whole pin, never its tail (`PinApplier.turn_finished`)."""
        rec = self.sessions.get(key) or self._new_record(key)
        now = self.clock()
        overlapped = rec.active_requests > 1 or rec.pin_overlapped
        rec.kept_over = False
        rec.active_requests = max(rec.active_requests - 1, 0)
        rec.turns += 1
        rec.burst_turns += 1
        if hints.end:  # its last turn: not awaited (an earlier one that finished while it ran did come back)
            self.returns.last_turn(key, now)
        likely = hints.end or self.returns.turn_finished(key, rec.turns, blocks, rec.last_finished, now, key.inferred)
        rec.last_gap_s = None if rec.last_finished is None else max(now - rec.last_finished, 0.0)  # its class's gap
        rec.last_finished = now
        if hints.role:
            rec.role = hints.role
        rec.ttl_s = self.payback.ttl(self.config.ttl_for(hints.ttl_s))  # capped while pins have not paid
        self._touch(rec)
        if hints.end:
            return self.end(key)
        if (overlapped or blocks <= 0) and tokens < rec.pinned_tokens and rec.ttl_s > 0 and self.payback.pinning \
                and likely:  # found by review: a turn preempted, then aborted, holds nothing; its hit pin stays
            # A turn that ran beside another of the session (a title or side request sent with the conversation's
            # turn) does not replace a longer pin: the session's next turn continues the longer prefix as likely.
            rec.pin_overlapped = rec.pin_beyond_running = rec.active_requests > 0
            rec.kept_over = True
            self.counters["pins_kept_over_overlapping_turn"] += 1
            self.expiry.queue(rec)
            self.index.changed(rec)
            return []
        if blocks <= 0 or rec.ttl_s <= 0 or blocks > self.budget_blocks or not self.payback.pinning or not likely:
            released: list[Decision] = [self._release(rec, ReleaseReason.TURN)] if rec.pinned else []
            self.index.changed(rec)
            return released
        # The new prefix replaces the old pin (the adapter only touches the difference).
        self.pinned_blocks_total += blocks - rec.pinned_blocks
        rec.pinned_blocks, rec.pinned_tokens, rec.whole_only = blocks, tokens, whole_only
        rec.pin_overlapped = rec.pin_beyond_running = rec.active_requests > 0
        decisions: list[Decision] = [Pin(key)]
        self.counters["pins"] += 1
        self.expiry.queue(rec)
        self.index.changed(rec)
        return decisions

    def prefetched(self, key: SessionKey, tokens: int, blocks: int) -> list[Decision]:
        """The adapter restored the session's prefix from the FP8 tier ahead of its next turn: its pin grows to
        `blocks` full blocks (`tokens` tokens). The TTL still runs from the session's last turn."""
        rec = self.sessions.get(key)
        if rec is None or blocks <= rec.pinned_blocks or blocks > self.budget_blocks:
            return []
        self.pinned_blocks_total += blocks - rec.pinned_blocks
        rec.prefetched_tokens += tokens - rec.pinned_tokens
        rec.pinned_blocks, rec.pinned_tokens = blocks, tokens
        rec.whole_only = False  # a restored pin is one group (`PinApplier.adopt`)
        rec.pin_beyond_running = True  # no request holds the restored blocks yet
        self.expiry.queue(rec)
        self.index.changed(rec)
        self.counters["prefetches"] += 1
        return [Pin(key)]

    def end(self, key: SessionKey) -> list[Decision]:
        """The client ended the session: release its pin and forget it. Its awaited turn, if no request of it is in
        the engine, never returns (a request in flight already said how the last turn ended)."""
        rec = self.sessions.get(key)
        if rec is None or not (rec.active_requests or rec.waiting):
            self.returns.ended(key, self.clock())
        if rec is None:
            return []
        decisions: list[Decision] = [self._release(rec, ReleaseReason.END)] if rec.pinned else []
        self.index.changed(rec)
        self.counters["sessions_ended"] += not rec.ended  # once, not again at a request's finish after the end
        if rec.active_requests == 0 and rec.waiting == 0:
            del self.sessions[key]
        else:  # found by review: a request running at the end pinned the session again when it finished
            rec.ended = True
        return decisions

    def release_every_pin(self, reason: ReleaseReason) -> list[Release]:
        """Release every pin; the sessions go on (records, ended flags): e.g. the engine's prefix cache is reset."""
        out = []
        for rec in list(self.index.pinned.values()):
            out.append(self._release(rec, reason))
            self.index.changed(rec)
        return out

    def expire(self) -> list[Decision]:
        """Release every pin whose TTL has run out (`ExpiryQueue.due`: not those of sessions already back)."""
        decisions: list[Decision] = []
        for rec in self.expiry.due(self.sessions, self.clock()):
            decisions.append(self._release(rec, ReleaseReason.TTL))
            self.index.changed(rec)
        return decisions

    @property
    def budget_blocks(self) -> int:
        return int(self.config.pin_budget_fraction * self.total_blocks)

    @property
    def budget_low_water_blocks(self) -> int:
        """Where a release for the budget stops: the budget less 1/128 of it (nothing less below 128 blocks). Past
        the budget, every finished turn's new pin would otherwise cost a release pass of its own; with thousands of
        sessions pinned that cost more than vLLM's whole scheduler step (`kvsched bench sched`, 10,000 sessions)."""
        budget = self.budget_blocks
        return budget - budget // BUDGET_SLACK_DIVISOR

    def release_over_budget(self, distinct_pinned_blocks: int, applied: Applied | None = None) -> list[Release]:
        """Pins hold `distinct_pinned_blocks` blocks (shared prefixes counted once, as the adapter sees them); if that
        is over the budget, release down to the low-water mark, lowest-value pins first, tail blocks first.
        `applied(release)`: the adapter applies each release as it is decided and says how many distinct blocks it
        freed (a pin's shared head frees none), so one pass reaches the mark."""
        if distinct_pinned_blocks <= self.budget_blocks:
            return []
        return self.release_blocks(distinct_pinned_blocks - self.budget_low_water_blocks, ReleaseReason.BUDGET,
                                   applied=applied)

    def release_for_pressure(self, blocks: int, exclude: Iterable[SessionKey] = (),
                             idle_only: bool = False) -> list[Release]:
        """A live request is short of blocks: release about `blocks` blocks of pins (not of `exclude`), lowest-value
        pins first. The adapter retries the allocation and asks again if that was not enough. `idle_only`: stop at the
        first session with a request waiting or running (the order puts them after the idle ones)."""
        return self.release_blocks(blocks, ReleaseReason.PRESSURE, exclude, idle_only)

    def pressure_bound(self, own: SessionKey | None) -> int:
        """At least the blocks that releasing every pin a shortage of a request of `own` may release could free
        (pins the order offers, and `own`'s: `release_running_pin`), in O(1)."""
        rec = self.sessions.get(own) if own is not None else None
        return self.index.releasable_blocks + (rec.pinned_blocks if rec is not None else 0)

    def release_running_pin(self, key: SessionKey) -> list[Release]:
        """A request short of blocks with no other pin left: its own running session's pin, which no release order
        offers when its running request hit all of it. Blocks the request holds stay allocated to it."""
        rec = self.sessions.get(key)
        if rec is None or not rec.pinned_blocks:
            return []
        out = [self._release(rec, ReleaseReason.PRESSURE)]
        self.index.changed(rec)
        return out

    def release_blocks(self, blocks: int, reason: ReleaseReason, exclude: Iterable[SessionKey] = (),
                       idle_only: bool = False, applied: Applied | None = None) -> list[Release]:
        """One pass over the release order: whole pins, then the tail of the last one, until `blocks` are released
        (as `applied` counts them, when given: it applies each release at once and returns the blocks it freed)."""
        out: list[Release] = []
        if blocks <= 0:
            return out
        now = self.clock()
        order = self.index.order(now, set(exclude))
        try:
            for key in order:
                rec = self.sessions[key]
                if idle_only and (rec.waiting or rec.active_requests):
                    break
                take = rec.pinned_blocks if rec.whole_only else min(blocks, rec.pinned_blocks)
                if rec.waiting:  # nothing idle was left: a queued request will prefill this part again
                    self.counters[COUNTER_NAMES[reason][3]] += take
                release = self._release(rec, reason, take)
                out.append(release)
                self.index.changed(rec)
                blocks -= take if applied is None else applied(release)
                if blocks <= 0:
                    break
        finally:
            order.close()  # entries the heap set aside go back
        return out

    def release_order(self, exclude: Iterable[SessionKey] = ()) -> list[SessionKey]:
        """Pinned sessions in the order they would be released: lowest retention value first, then those with a
        request waiting to be scheduled, the latest arrival first (`kvsched.core.release_index`)."""
        return list(self.index.order(self.clock(), set(exclude)))

    # ---- views --------------------------------------------------------------------------------------------------
    def views(self) -> list[SessionView]:
        now = self.clock()
        return [self.view_of(r, now) for r in self.sessions.values()]

    view_of = staticmethod(view_of)

    @property
    def pinned_sessions(self) -> int:
        return len(self.index)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _new_record(self, key: SessionKey) -> SessionRecord:
        self._trim_table(1)
        rec = SessionRecord(key=key, ttl_s=self.config.default_ttl_s,
                            expected_gap_s=min(self.config.default_next_use_s, self.config.default_ttl_s))
        self.sessions[key] = rec
        rec.activity = next(self._activity)
        return rec

    def _touch(self, rec: SessionRecord) -> None:
        """The session was active: it moves to the end of the table (and of the release order's ties)."""
        self.sessions.move_to_end(rec.key)
        rec.activity = next(self._activity)

    @staticmethod
    def _not_waiting(rec: SessionRecord) -> None:
        rec.waiting = max(rec.waiting - 1, 0)
        rec.waiting_since = rec.waiting_since if rec.waiting else None

    def _observe_gap(self, rec: SessionRecord, gap: float) -> None:
        a = self.config.gap_ewma_alpha if rec.gaps_seen else 1.0
        rec.expected_gap_s = a * gap + (1.0 - a) * rec.expected_gap_s
        rec.gaps_seen += 1
        if self.gaps.observe(rec.role, rec.burst_turns, gap):
            rec.burst_turns = 0  # the turn starting now opens a new burst

    def _release(self, rec: SessionRecord, reason: ReleaseReason, blocks: int | None = None) -> Release:
        whole, partial, released_blocks, _ = COUNTER_NAMES[reason]
        if blocks is not None and 0 < blocks < rec.pinned_blocks and not rec.whole_only:
            kept = rec.pinned_blocks - blocks
            tokens = rec.pinned_tokens * kept // rec.pinned_blocks
            rec.prefetched_tokens = max(0, rec.prefetched_tokens - (rec.pinned_tokens - tokens))  # tail goes first
            rec.pinned_tokens = tokens
            rec.pinned_blocks = kept
            self.pinned_blocks_total -= blocks
            self.counters[partial] += 1
            self.counters[released_blocks] += blocks
            return Release(rec.key, reason, blocks)
        self.pinned_blocks_total -= rec.pinned_blocks
        self.counters[released_blocks] += rec.pinned_blocks
        rec.pinned_blocks = rec.pinned_tokens = rec.prefetched_tokens = 0
        self.counters[whole] += 1
        return Release(rec.key, reason)

    def _trim_table(self, room: int = 0) -> None:
        """Make `room` for new records under max_sessions: drop the least recently active idle, unpinned ones,
        looking at no more than TRIM_SCAN records past the excess (those with a pin or a request in flight are
        skipped, and pins are bounded by the KV pool, not by traffic), so a new record costs O(1) amortised. Found by
        review: trimmed only when a turn pinned, the table grew without bound on turns that never pin (prompts under
        a block, aborted requests, TTL 0), and each trim built a list of the whole table (45 ms a pin at 100,000)."""
        excess = len(self.sessions) + room - self.config.max_sessions
        if excess <= 0:
            return
        drop = []
        for key, r in itertools.islice(self.sessions.items(), excess + self.TRIM_SCAN):
            if not r.pinned and not r.active_requests and not r.waiting:
                drop.append(key)
                if len(drop) >= excess:
                    break
        for key in drop:
            del self.sessions[key]
