"""Applies the retention policy's decisions to vLLM's block pool: pins are block references held per session.

Lives in the engine-core process, driven by KVSchedScheduler's hooks; every call happens on the engine-core thread.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.tier_prefetch import TierPrefetcher
from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Decision, Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import InvalidSessionInput, SessionKey, TurnHints, validate_session_id
from kvsched.ops.score import select_candidates

# Releases whose blocks go to the FP8 tier (when it is on): the session is still live and comes back. TTL and end mean
# it will not; a turn release drops blocks its own request did not hit.
DEMOTE_REASONS = frozenset({ReleaseReason.PRESSURE, ReleaseReason.BUDGET})


class SessionPins:
    """Session table (policy) + the blocks each pin holds (adapter state)."""

    PRESSURE_CHUNK = 4  # blocks released per try when a live request is short; the allocation is retried after each

    def __init__(self, scheduler: Any, config: RetentionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.block_size = int(scheduler.cache_config.block_size)
        self.policy = RetentionPolicy(
            config, clock, total_blocks=compat.num_total_blocks(scheduler),
            bytes_per_token=compat.kv_bytes_per_token(scheduler), selector=select_candidates,
        )
        self.pinned: dict[SessionKey, list[list[Any]]] = {}  # per KV-cache group, in prefix order
        self.block_refs: Counter[int] = Counter()  # block id -> pins holding it (shared prefixes count once)
        self.requests: dict[str, tuple[SessionKey, TurnHints]] = {}
        self.started: set[str] = set()
        self.enabled = bool(getattr(scheduler.cache_config, "enable_prefix_caching", True))
        # KVSCHED_TRACE=FILE: one JSON line per applied decision, for replaying what the policy did.
        trace = os.environ.get("KVSCHED_TRACE")
        self._trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - lives as long as the engine
        compat.wrap_allocate_slots(scheduler, self.on_shortage)
        # The FP8 tier (if configured): pins released for pressure or budget are demoted there, not dropped.
        self.tier = compat.fp8_tier(scheduler)
        self.prefetcher: TierPrefetcher | None = None
        if self.tier is not None:
            self.tier.attach(self._tier_value)
            if self.tier.enabled and self.enabled:
                self.prefetcher = TierPrefetcher(self)
                self.tier.on_load_failures = self.prefetcher.on_load_failures

    # ---- hooks from the scheduler -------------------------------------------------------------------------------
    def on_request_added(self, request: Any) -> None:
        key, hints = compat.request_session(request, self._known_key)
        if key is None:
            return
        self.policy.request_arrived(key, hints)
        # One key object per session (the policy record's), not one per request: fewer objects for the GC, and
        # dict lookups by the very object the tables hold skip the dataclass __eq__.
        key = self.policy.sessions[key].key
        self.requests[request.request_id] = (key, hints)
        if self.prefetcher is not None:
            self.prefetcher.on_request_added(request, key)

    def _known_key(self, key: SessionKey) -> SessionKey | None:
        rec = self.policy.sessions.get(key)
        return None if rec is None else rec.key

    def on_scheduled(self, scheduler_output: Any) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            entry = self.requests.get(new.req_id)
            if entry is None or new.req_id in self.started:
                continue
            self.started.add(new.req_id)
            if self._trace is not None:
                self._trace.write(json.dumps({"t": round(self.policy.clock(), 4), "session": str(entry[0].session_id),
                                              "op": "start", "cached": int(new.num_computed_tokens),
                                              "prompt": len(new.prompt_token_ids or ())}) + "\n")
            if self.prefetcher is not None:
                self.prefetcher.on_turn_started(entry[0], int(new.num_computed_tokens))
            self.apply(self.policy.turn_started(entry[0], int(new.num_computed_tokens)))

    def on_request_finished(self, request: Any) -> None:
        """Called before vLLM frees a finished request's blocks: pin its reusable prefix for the next turn."""
        entry = self.requests.pop(request.request_id, None)
        if entry is None:
            return
        key, hints = entry
        if request.request_id not in self.started:  # finished (aborted) before it ever ran
            self.policy.request_abandoned(key)
            if hints.end:
                self._end(key)
            return
        self.started.discard(request.request_id)
        groups = compat.reusable_prefix_blocks(self.scheduler, request.request_id) if self.enabled else []
        nblocks = sum(map(len, groups))
        tokens = compat.block_tokens(groups[0], self.block_size) if groups else 0
        self.apply(self.policy.turn_finished(key, hints, tokens, nblocks), pending={key: groups})
        if self.tier is not None:
            if hints.end:
                self.tier.directory.drop_owner(key)
                self.tier.end_session(key)
            elif groups and (tail := compat.partial_tail(self.scheduler, request, groups[0], self.block_size)):
                self.tier.save_tail(key, *tail)
            if groups and not hints.end:  # the disk and shared levels keep a copy (when configured)
                self.tier.publish_turn(key, groups[0], self.policy.sessions.get(key))
            if self.prefetcher is not None and not hints.end:
                self.prefetcher.on_turn_finished(request, key)
        if len(self.block_refs) > self.policy.budget_blocks:  # never, with the default budget (the whole pool)
            while releases := self.policy.release_over_budget(len(self.block_refs)):
                self.apply(releases)

    def on_shortage(self, request: Any, num_new_tokens: int = 0, own_free_hits: int = 0) -> bool:
        """vLLM could not allocate blocks for a live request: release pins, lowest value first, before vLLM preempts
        or queues anything. True if blocks were freed (the allocation is then retried)."""
        own = {entry[0]} if (entry := self.requests.get(request.request_id)) else set()
        before = compat.num_free_blocks(self.scheduler)
        # About the shortfall, not the request's whole size: free blocks still count (released pins stay cached in
        # the free queue only until reused, and the order past the shortfall may change before they are needed, e.g.
        # when a released session's next turn arrives). If it was not enough, vLLM fails again and we come back.
        need = max(self.PRESSURE_CHUNK, -(-num_new_tokens // self.block_size) + 1 + own_free_hits - before)
        while True:
            # Other sessions first. The request's own session last: releasing it frees nothing the request will hit
            # (hit blocks are taken back out of the free queue), but keeping it when nothing else is left would
            # leave a request waiting on its own session's pin forever.
            releases = self.policy.release_for_pressure(need, exclude=own) or self.policy.release_for_pressure(need)
            if not releases:
                return False
            self.apply(releases)
            if compat.num_free_blocks(self.scheduler) > before:
                return True  # retry the allocation; pins that freed nothing (shared blocks) don't count

    def make_room(self, blocks: int, exclude: SessionKey) -> None:
        """Release other sessions' pins, lowest value first, until `blocks` more blocks are free (a queued request's
        prefetch: its admission would release them a moment later)."""
        target = compat.num_free_blocks(self.scheduler) + blocks
        while blocks > 0 and compat.num_free_blocks(self.scheduler) < target:
            releases = self.policy.release_for_pressure(target - compat.num_free_blocks(self.scheduler),
                                                        exclude={exclude})
            if not releases:
                return
            self.apply(releases)

    def expire(self) -> None:
        if self.pinned:
            self.apply(self.policy.expire())

    def before_schedule(self) -> None:
        """Each scheduler step, before vLLM schedules: TTL expiry, then the tier's due prefetches."""
        self.expire()
        if self.prefetcher is not None:
            self.prefetcher.on_step()

    def extends_pin(self, key: SessionKey, head: list[Any]) -> bool:
        """True if the session's pin is a prefix of `head` (blocks of a request's cached prefix, in order)."""
        pin = self.pinned.get(key)
        if not pin:
            return True
        old = pin[0] if len(pin) == 1 else []
        return len(pin) == 1 and len(old) <= len(head) and all(a is b for a, b in zip(old, head, strict=False))

    def adopt_prefetch(self, key: SessionKey, head: list[Any], new: list[Any]) -> None:
        """The session's pin becomes `head` (cached blocks, referenced here as a pin's blocks are) followed by `new`
        (blocks a tier prefetch allocated: they come with the one reference the allocation took)."""
        blocks = len(head) + len(new)
        if not self.policy.prefetched(key, blocks * self.block_size, blocks):
            compat.return_blocks(self.scheduler, list(reversed(new)))  # over the budget: not kept
            return
        self._repin(key, [head])
        self.pinned[key][0].extend(new)
        self.block_refs.update(b.block_id for b in new)
        if self._trace is not None:
            self._trace.write(json.dumps({"t": round(self.policy.clock(), 4), "session": str(key.session_id),
                                          "op": "prefetch", "blocks": len(new)}) + "\n")

    def release_all(self, reason: ReleaseReason = ReleaseReason.END) -> int:
        """Drop every pin (e.g. before vLLM resets the prefix cache). Returns how many were released."""
        keys = list(self.pinned)
        for key in keys:
            self.policy.end(key)
            self._unpin(key)
        if self.tier is not None:
            for owner in list(self.tier.directory.keys_of):
                self.tier.directory.drop_owner(owner)
        return len(keys)

    def _end(self, key: SessionKey) -> None:
        self.apply(self.policy.end(key))
        if self.tier is not None:
            self.tier.directory.drop_owner(key)
            self.tier.end_session(key)
        if self.prefetcher is not None:
            self.prefetcher.on_ended(key)

    # ---- decisions ----------------------------------------------------------------------------------------------
    def apply(self, decisions: list[Decision], pending: dict[SessionKey, list[list[Any]]] | None = None) -> None:
        if self._trace is not None:
            self._write_trace(decisions, pending)
        for d in decisions:
            if isinstance(d, Pin):
                self._repin(d.key, (pending or {}).get(d.key, []))
            elif isinstance(d, Release):
                self._unpin(d.key, d.blocks, demote=self.tier is not None and d.reason in DEMOTE_REASONS)

    def _write_trace(self, decisions: list[Decision], pending: dict[SessionKey, list[list[Any]]] | None) -> None:
        assert self._trace is not None
        now, free = self.policy.clock(), compat.num_free_blocks(self.scheduler)
        for d in decisions:
            row: dict[str, Any] = {"t": round(now, 4), "session": str(d.key.session_id), "free": free}
            if isinstance(d, Pin):
                row.update(op="pin", blocks=sum(len(g) for g in (pending or {}).get(d.key, [])))
            else:
                row.update(op="release", reason=d.reason.value, blocks=d.blocks)
                if os.environ.get("KVSCHED_TRACE_SCORES"):
                    from kvsched.core.scoring import retention_value
                    row["scores"] = sorted(
                        (round(retention_value(self.policy.candidate(r, now)) * 1e12, 4), str(k.session_id),
                         r.pinned_blocks, round(r.expected_gap_s, 2), round(now - (r.last_finished or now), 2),
                         r.active_requests)
                        for k, r in self.policy.sessions.items() if r.pinned_blocks)
            self._trace.write(json.dumps(row) + "\n")

    def _repin(self, key: SessionKey, groups: list[list[Any]]) -> None:
        """Make `groups` the session's pin, touching only blocks it did not hold and freeing only those it drops
        (a session's next turn usually extends its prefix, so this is O(new blocks), not O(history))."""
        old = self.pinned.get(key)
        if old is None or len(old) != len(groups):
            old = [[] for _ in groups]
        added: list[Any] = []
        dropped: list[Any] = []
        for old_g, new_g in zip(old, groups, strict=True):
            n = len(old_g)
            if len(new_g) >= n and new_g[:n] == old_g:  # identity-first C comparison: the usual case
                common = n
            else:
                common = 0
                for a, b in zip(old_g, new_g, strict=False):
                    if a is not b:
                        break
                    common += 1
                dropped.extend(reversed(old_g[common:]))
                del old_g[common:]
            tail = new_g[common:]
            added.extend(tail)
            # Extended in place: the pin's list is long-lived, and a fresh copy per turn would be young garbage-
            # collector work (every young list of block refs is traversed until it is promoted).
            old_g.extend(tail)
        if added:
            compat.hold_blocks(self.scheduler, added)
            self.block_refs.update(b.block_id for b in added)
        self.pinned[key] = old
        self._return(dropped)

    def _return(self, released: list[Any]) -> None:
        if not released:
            return
        refs = self.block_refs
        for b in released:
            n = refs[b.block_id] - 1
            if n > 0:
                refs[b.block_id] = n
            else:
                del refs[b.block_id]
        compat.return_blocks(self.scheduler, released)

    def _tier_value(self, key: SessionKey) -> float:
        """Retention value of a session's tier blocks (the pins' formula at the tier's bytes per token)."""
        if self.tier is None:
            return 0.0
        d = self.tier.directory
        return self.policy.value_of(key, d.blocks_of(key) * self.block_size + d.tail_tokens(key),
                                    d.block_bytes / self.block_size)

    def _unpin(self, key: SessionKey, blocks: int | None = None, demote: bool = False) -> None:
        groups = self.pinned.get(key)
        if not groups:
            self.pinned.pop(key, None)
            return
        total = sum(map(len, groups))
        released: list[Any] = []
        if blocks is None or blocks >= total:
            del self.pinned[key]
            for g in groups:
                released.extend(reversed(g))
            if self.prefetcher is not None:
                self.prefetcher.on_released(key)
        else:  # drop the tail of each KV-cache group, in proportion; in place (the pin's lists are long-lived)
            for g in groups:
                n = min(len(g), -(-blocks * len(g) // total))
                if n:
                    released.extend(reversed(g[len(g) - n:]))
                    del g[len(g) - n:]
        if demote and self.tier is not None:  # copied to the tier before vLLM can reuse them (this step's metadata)
            self.tier.demote(key, [(compat.block_content_key(b), b.block_id) for b in reversed(released)
                                   if b.block_hash is not None])
        # Tail blocks first: they are evicted before the session's head (which other sessions may share).
        self._return(released)

    # ---- admin / metrics (called through the engine-core utility) -------------------------------------------------
    def handle(self, op: str, *args: Any) -> Any:
        self.expire()
        if op == "list":
            return [asdict(v) for v in self.policy.views()]
        if op == "end":
            try:
                sid = validate_session_id(args[0])
            except (IndexError, InvalidSessionInput) as exc:
                return {"error": str(exc)}
            keys = [k for k in self.policy.sessions if k.session_id == sid]
            for key in keys:
                self._end(key)
            return {"ended": len(keys)}
        if op == "stats":
            return self.stats()
        return {"error": f"unknown kvsched operation {op!r}"}

    def stats(self) -> dict[str, float]:
        c = self.policy.counters
        return {
            "sessions_seen": c["sessions_seen"],
            "requests_with_session": c["requests_with_session"],
            "active_sessions": len(self.policy.sessions),
            "pinned_sessions": len(self.pinned),
            "pinned_blocks": len(self.block_refs),
            "pin_budget_blocks": self.policy.budget_blocks,
            "total_blocks": self.policy.total_blocks,
            "kv_bytes_per_token": self.policy.bytes_per_token,
            "free_blocks": compat.num_free_blocks(self.scheduler),
            "retained_hits": c["retained_hits"],
            "retained_hit_tokens": c["retained_hit_tokens"],
            "pins": c["pins"],
            "released_queued_blocks": c["released_blocks_pressure_waiting"],
            **{f"released_{r.value}": c[f"released_{r.value}"] for r in ReleaseReason},
            **{f"released_{r.value}_partial": c[f"released_{r.value}_partial"] for r in ReleaseReason},
            **{f"released_blocks_{r.value}": c[f"released_blocks_{r.value}"] for r in ReleaseReason},
            **(self.tier.tier_stats() if self.tier is not None else {}),
            **(self._prefetch_stats() if self.prefetcher is not None else {}),
        }

    def _prefetch_stats(self) -> dict[str, float]:
        assert self.prefetcher is not None and self.tier is not None
        c, t = self.prefetcher.counters, self.tier.stats
        prefetches = c["prefetches_queued"] + c["prefetches_due"]
        return {"tier_restores": t["restores"] + prefetches, "tier_prefetched_restores": prefetches,
                "tier_prefetches_queued": c["prefetches_queued"], "tier_prefetches_due": c["prefetches_due"],
                "tier_prefetch_useful_blocks": c["useful_blocks"], "tier_prefetch_wasted_blocks": c["wasted_blocks"],
                "tier_wasted_prefetches": c["wasted_prefetches"],
                "tier_prefetch_hit_tokens": self.policy.counters["prefetch_hit_tokens"]}
