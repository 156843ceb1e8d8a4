"""Session-aware prefetch from the FP8 tier: a session's KV is restored into the pool before its turn is scheduled.

Two triggers, both for sessions whose prefix continues into blocks the tier holds:
- queued: a request of the session arrives (kvsched's `add_request` hook runs before vLLM schedules anything), so its
  restore is planned at once instead of when the scheduler admits the request, however long it waits in the queue.
  Blocks of its prefix that only the disk or shared level holds are fetched into the tier in the background first
  (tier_fetches; a slow store is asked which it holds off the scheduler thread too, tier_lookups, and the fetch is
  planned in the step its answer is in): the restore is planned in the first step after they landed (the request
  waits till then).
  Other sessions' pins yield blocks for it only as far as the tier has free slots for them: releasing into a full
  tier evicts KV whose owners may return before this request runs (a tier of half the pool, `kvsched bench agents
  --quick --fp8-tier-gb 0.015`: 15,744 and 13,216 prefill tokens with the release, 12,224 and 12,164 without, 11,935
  with no prefetch at all; BENCHMARKS.md, "The tier, predicted from a recording");
- due: the policy's next-use estimate (kvsched.core.next_use via `RetentionPolicy.expected_next_use_s`) says the
  session's next turn arrives within the time a restore takes (or one scheduler step), so its blocks are restored
  before its request exists. This one only takes free blocks beyond a reserve (it must not evict what live requests
  will need) and only when the engine can cache blocks without their request (no KV events).

A prefetch takes free blocks, enters them into vLLM's prefix cache under the session's block hashes and pins them to
the session, with the loads in this step's connector metadata; the worker runs them before the step's forward pass
(`handle_preemptions`, complete before the forward on a GPU), so the session's request finds them as
ordinary prefix-cache hits. On an engine that schedules a step ahead (GPU async scheduling) the blocks are entered into
the prefix cache only after the worker has reported the step that loaded them; a block whose slot failed its checksum
is taken out of the prefix cache (vLLM recomputes a request that already used it in that step).

Counters: prefetches by trigger, prefetched blocks, blocks the session's turn then hit (useful) and blocks released or
missed before any turn used them (wasted).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.core.sessions import SessionKey

RESTORE_BYTES_PER_S = 10e9  # host -> device (PCIe gen4 x16 effective, conservatively): sets the "due" horizon
DUE_RESERVE_FRACTION = 0.0625  # a due prefetch leaves at least this share of the pool free


@dataclass(slots=True)
class Prefetch:
    key: SessionKey
    blocks: list[Any]
    chain: list[Any]
    first: int  # chain index of blocks[0]
    due_step: int  # entered into the prefix cache once the connector has seen this many step outputs
    request: Any = None
    cached: bool = False
    failed_from: int | None = None  # index of the first block whose load failed its checksum


@dataclass(slots=True)
class StepClock:
    """Seconds per scheduler step (EWMA), for the smallest useful prefetch horizon."""

    last: float | None = None
    step_s: float = 0.05

    def tick(self, now: float) -> None:
        if self.last is not None:
            self.step_s = 0.8 * self.step_s + 0.2 * min(max(now - self.last, 0.0), 10.0)
        self.last = now


@dataclass
class TierPrefetcher:
    """Owned by SessionPins (engine-core thread); `pins.tier` is the connector."""

    pins: Any
    counters: Counter[str] = field(default_factory=Counter)
    pending: dict[SessionKey, Prefetch] = field(default_factory=dict)
    chains: dict[SessionKey, list[Any]] = field(default_factory=dict)  # each session's last request's block hashes
    awaiting: dict[str, tuple[SessionKey, Any]] = field(default_factory=dict)  # request id -> its fetch in flight
    _due: list[tuple[float, int, SessionKey]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    clock: StepClock = field(default_factory=StepClock)

    @property
    def tier(self) -> Any:
        return self.pins.tier

    # ---- triggers ---------------------------------------------------------------------------------------------------
    def on_request_added(self, request: Any, key: SessionKey) -> None:
        limit = (int(request.num_tokens) - 1) // self.pins.block_size  # blocks before the one vLLM always computes
        if getattr(self.tier, "levels", None) is not None:  # blocks only the disk or shared level holds: fetched
            self._promote(request, key, limit)  # into the tier in the background, then prefetched like any tier block
        if self._fetching(request):
            self.awaiting[request.request_id] = (key, request)
        elif self._holds(key):
            self._prefetch(key, list(request.block_hashes), limit, reserve=0, request=request, trigger="queued")

    def _take_lookups(self) -> None:
        """The store lookups' answers: the requests still waiting for theirs are promoted again (what the store holds
        is fetched)."""
        levels = getattr(self.tier, "levels", None)
        for rid in levels.poll() if levels is not None else ():
            if rid in self.awaiting:
                key, request = self.awaiting[rid]
                self._promote(request, key, (int(request.num_tokens) - 1) // self.pins.block_size)

    def on_request_gone(self, request_id: str) -> None:
        self.awaiting.pop(request_id, None)

    def on_turn_finished(self, request: Any, key: SessionKey) -> None:
        """Remember the session's hash chain and when its next turn is due (a due prefetch may then run)."""
        self.chains[key] = list(request.block_hashes)
        rec = self.pins.policy.sessions.get(key)
        if rec is not None:
            horizon = self._horizon(len(self.chains[key]))
            due = self.pins.policy.clock() + self.pins.policy.expected_next_use_s(rec, 0.0) - horizon
            heapq.heappush(self._due, (due, next(self._seq), key))

    def on_step(self) -> None:
        """Before each schedule(): enter confirmed prefetches into the prefix cache, run the due ones."""
        now = self.pins.policy.clock()
        self.clock.tick(now)
        self._take_lookups()  # store lookups answered: fetch what they found
        for rid, (key, request) in list(self.awaiting.items()):  # fetches landed: restore what they brought
            if not self._fetching(request):
                del self.awaiting[rid]
                if self._holds(key):
                    limit = (int(request.num_tokens) - 1) // self.pins.block_size
                    self._prefetch(key, list(request.block_hashes), limit, reserve=0, request=request, trigger="queued")
        if self.pending:
            done = getattr(self.tier, "steps_done", 0)
            for p in self.pending.values():
                if not p.cached and p.due_step <= done:
                    self._cache(p)
        while self._due and self._due[0][0] <= now:
            _, _, key = heapq.heappop(self._due)
            rec = self.pins.policy.sessions.get(key)
            chain = self.chains.get(key)
            if rec is None or chain is None or rec.active_requests or rec.waiting or not self._holds(key):
                continue
            if compat.can_cache_without_request(self.pins.scheduler) and not compat.num_waiting(self.pins.scheduler):
                # free blocks only (no pin yields for a guess), and a share left for the requests that will come
                reserve = int(self.pins.policy.total_blocks * DUE_RESERVE_FRACTION)
                self._prefetch(key, chain, len(chain), reserve=reserve, request=None, trigger="due")

    def on_turn_started(self, key: SessionKey, cached_tokens: int, request_id: str) -> None:
        # Scheduled before its fetch landed (or its lookup was answered). Only this request: another of the session
        # may still wait for its own (found by review: its store answer was dropped, its blocks computed again).
        self.awaiting.pop(request_id, None)
        p = self.pending.pop(key, None)
        if p is None:
            return
        hit = min(max(cached_tokens // self.pins.block_size - p.first, 0), len(p.blocks))
        self.counters["useful_blocks"] += hit
        self.counters["wasted_blocks"] += len(p.blocks) - hit
        if hit < len(p.blocks):
            self.counters["wasted_prefetches"] += 1

    def on_released(self, key: SessionKey) -> None:
        """The session's pin went before its turn used the prefetched blocks."""
        p = self.pending.pop(key, None)
        if p is not None:
            self.counters["wasted_blocks"] += len(p.blocks)
            self.counters["wasted_prefetches"] += 1

    def on_ended(self, key: SessionKey) -> None:
        self.on_released(key)
        self.chains.pop(key, None)
        for rid in [rid for rid, (k, _) in self.awaiting.items() if k == key]:
            del self.awaiting[rid]

    def on_load_failures(self, block_ids: set[int]) -> None:
        """Slots that failed their checksum: the blocks they were restored into, and every later block of the same
        prefetch (a request could only reach them through those), never serve as the session's KV. A prefetch not yet
        cached (async scheduling: the failure arrives with the step count that makes it due) is cached only up to
        them; of a cached one, only blocks still cached under the session's hashes leave the prefix cache (a block a
        release gave back may be another request's by now)."""
        for p in self.pending.values():
            idx = [i for i, b in enumerate(p.blocks) if b.block_id in block_ids]
            if not idx:
                continue
            first = min(idx)
            self.counters["failed_prefetch_blocks"] += len(p.blocks) - first
            if not p.cached:
                p.failed_from = first if p.failed_from is None else min(first, p.failed_from)
                continue
            mine = {b.block_id for i, b in enumerate(p.blocks[first:], p.first + first)
                    if b.block_hash is not None and compat.block_content_key(b) == bytes(p.chain[i])}
            if mine:
                compat.evict_from_prefix_cache(self.pins.scheduler, mine)

    # ---- the prefetch -----------------------------------------------------------------------------------------------
    def _promote(self, request: Any, key: SessionKey, limit: int) -> None:
        chain = request.block_hashes
        head = len(compat.cached_prefix(self.pins.scheduler, chain, limit))
        # a count past the pool's hit, not `limit` itself (found by review: that fetched the block vLLM computes)
        self.tier.promote(key, chain, head, limit - head, request.request_id)

    def _fetching(self, request: Any) -> bool:
        """True if the request's prefix continues into blocks a disk or shared-store fetch is still filling, or the
        shared store is still being asked which of them it holds."""
        tier, chain = self.tier, request.block_hashes
        if tier is None or not tier.enabled:
            return False
        lookups = getattr(getattr(tier, "fetches", None), "lookups", None)
        if lookups is not None and lookups.outstanding(request.request_id):
            return True
        if not tier.directory.inflight:
            return False
        limit = (int(request.num_tokens) - 1) // self.pins.block_size
        head = len(compat.cached_prefix(self.pins.scheduler, chain, limit))
        return bool(tier.directory.fetching(chain, head, limit - head))

    def _holds(self, key: SessionKey) -> bool:
        tier = self.tier
        return tier is not None and tier.enabled and bool(tier.directory.keys_of.get(key))

    def _horizon(self, blocks: int) -> float:
        tier = self.tier
        restore_s = blocks * (tier.directory.block_bytes if tier is not None else 0) / RESTORE_BYTES_PER_S
        return max(restore_s, self.clock.step_s)

    def _prefetch(self, key: SessionKey, chain: list[Any], limit: int, reserve: int, request: Any,
                  trigger: str) -> None:
        if key in self.pending or limit <= 0:
            return
        scheduler = self.pins.scheduler
        head = compat.cached_prefix(scheduler, chain, limit)
        if not self.pins.extends_pin(key, head):
            return  # the request branches off the session's pinned prefix: the turn itself decides what stays
        slots = self.tier.match_prefetch(chain, len(head), limit - len(head))
        n = len(slots)
        if not n:
            return
        # The head is held while blocks are found for the restore: blocks of it may sit in the free queue (an expired
        # or released pin's, or one `make_room` releases now), where `new_blocks` takes first. Found by review: the
        # restore took the head's own blocks, uncached them and pinned them again as later positions.
        compat.hold_blocks(scheduler, head)
        try:
            self._restore(key, chain, head, slots, reserve, request, trigger)
        finally:
            compat.return_blocks(scheduler, head[::-1])  # the pin holds them now (unless refused: tail first)

    def _restore(self, key: SessionKey, chain: list[Any], head: list[Any], slots: list[Any], reserve: int,
                 request: Any, trigger: str) -> None:
        scheduler, n = self.pins.scheduler, len(slots)
        if request is not None:  # queued: its admission needs these blocks anyway, so other pins yield now as then,
            need = n - compat.num_free_blocks(scheduler)  # but only into free tier slots: a release that evicts
            d = self.tier.directory  # from a full tier loses KV its owner may need before this request even runs
            if 0 < need <= d.num_slots - d.used_slots:
                self.pins.make_room(need, exclude=key)
        if compat.num_free_blocks(scheduler) - n < reserve:
            self.counters["prefetches_without_room"] += 1
            return
        blocks = compat.new_blocks(scheduler, n)
        if not {id(b) for b in head}.isdisjoint(map(id, blocks)):  # never, with the head held: a backstop
            self.counters["prefetches_overlapping_head"] += 1
            compat.return_blocks(scheduler, blocks[::-1])
            return
        first = len(head)
        due = getattr(self.tier, "steps_built", 0) + 1
        cached_after = due if compat.async_scheduling(scheduler) else 0  # the request waits for its blocks till then
        self.tier.add_prefetch([(s, b.block_id, chain[first + i]) for i, (s, b) in enumerate(
            zip(slots, blocks, strict=True))], request.request_id if request is not None else None, cached_after)
        p = Prefetch(key, blocks, chain, first, due, request)
        if not compat.async_scheduling(scheduler):
            self._cache(p, fresh=True)  # this step's forward runs after the load; vLLM recomputes a failed slot
        self.pending[key] = p
        self.pins.adopt_prefetch(key, head, blocks)
        self.counters[f"prefetches_{trigger}"] += 1
        self.counters["prefetched_blocks"] += n

    def _cache(self, p: Prefetch, fresh: bool = False) -> None:
        """Enter the prefetch's blocks into the prefix cache: all of them when `fresh` (just allocated for it), else
        the leading run the session's pin still holds. A block a release gave back since (pressure, `make_room` for
        another session's prefetch, a refused adoption) may already hold another request's KV: a reference count
        says nothing about whose, the pin does."""
        n = len(p.blocks) if fresh else 0
        if not fresh and p.failed_from != 0:
            pin = self.pins.pinned.get(p.key)
            held = {id(b) for b in pin[0]} if pin and len(pin) == 1 else set()
            for b in p.blocks:
                if id(b) not in held or b.block_hash is not None:
                    break
                n += 1
            n = n if p.failed_from is None else min(n, p.failed_from)
        if n:
            compat.cache_restored_blocks(self.pins.scheduler, p.blocks[:n], p.chain, p.first, p.request)
        lost = (len(p.blocks) if p.failed_from is None else p.failed_from) - n
        if lost > 0:
            self.counters["released_before_cached_blocks"] += lost
        p.cached = True
        p.request = None
