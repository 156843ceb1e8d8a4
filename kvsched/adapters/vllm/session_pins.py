"""Applies the retention policy's decisions to vLLM's block pool: pins are block references held per session.

Lives in the engine-core process, driven by KVSchedScheduler's hooks; every call happens on the engine-core thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.decision_trace import DecisionTrace
from kvsched.adapters.vllm.pin_pool import VllmPinPool
from kvsched.adapters.vllm.session_admin import handle_admin
from kvsched.adapters.vllm.session_lineage import SessionResolver
from kvsched.adapters.vllm.settings_check import trace_path, trace_scores
from kvsched.adapters.vllm.tier_prefetch import TierPrefetcher
from kvsched.adapters.vllm.trace_recorder import TraceRecorder
from kvsched.core.config import RetentionConfig
from kvsched.core.ghost_lru import LruGhost
from kvsched.core.pin_apply import PinApplier
from kvsched.core.retention import Decision, Pin, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionKey, TurnHints
from kvsched.ops.ghost import new_ghost
from kvsched.ops.score import select_candidates

logger = logging.getLogger("vllm.kvsched.pins")  # vLLM's handlers and VLLM_LOGGING_LEVEL apply


class SessionPins:
    """Session table (policy) + the blocks each pin holds (`kvsched.core.pin_apply.PinApplier`, which the simulator
    runs too) + vLLM's hooks into both."""

    def __init__(self, scheduler: Any, config: RetentionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.block_size = int(scheduler.cache_config.block_size)
        # A request's block hashes are at vLLM's hash block size (finer than the cache block for some hybrid models):
        # the payback tracker takes each cache block's last one, so its positions count cache blocks.
        hashed = compat.hash_block_size(scheduler)
        self._hash_step = self.block_size // hashed if hashed and self.block_size % hashed == 0 else 1
        tier = compat.fp8_tier(scheduler)  # the FP8 tier (if configured): pins released for pressure or budget go there
        auto = config.payback_sampling is None
        config = config.for_pool(tier=tier is not None and tier.enabled)
        self.policy = RetentionPolicy(
            config, clock, total_blocks=compat.num_total_blocks(scheduler),
            bytes_per_token=compat.kv_bytes_per_token(scheduler), selector=select_candidates,
        )
        if self.policy.payback.enabled:  # the compiled ghost when the extension is built
            self.policy.payback.use_ghost(ghost := new_ghost(self.policy.payback.rate))
            if auto:
                logger.info("kvsched: no FP8 tier: the pins' fallback to LRU is on from the pool's first eviction (1 "
                            "block in %d sampled, %s ghost; KVSCHED_PAYBACK_SAMPLING=0 turns it off)",
                            self.policy.payback.rate, "Python" if isinstance(ghost, LruGhost) else "compiled")
        pool = VllmPinPool(scheduler)
        self.pins: PinApplier[Any] = PinApplier(self.policy, pool, self.block_size)
        self.pinned = self.pins.pinned  # per KV-cache group, in prefix order
        self.block_refs = pool.refs  # block id -> pins holding it (shared prefixes count once)
        self.requests: dict[str, tuple[SessionKey, TurnHints]] = {}
        self.started: set[str] = set()
        self._reserved: dict[str, int] = {}  # request -> blocks it holds beyond its prompt's (the payback tracker's)
        # The payback tracker is fed once the pool evicts (read per turn as one attribute, set by `_arm_payback`).
        self._payback = self.policy.payback.enabled and self.policy.payback.armed
        self._payback_waiting = self.policy.payback.enabled and not self._payback
        self.enabled = bool(getattr(scheduler.cache_config, "enable_prefix_caching", True))
        self._prefix = compat.reusable_prefix(scheduler, self.block_size)  # a finished request's pin and its tokens
        self.resolver = SessionResolver(self.policy, self.enabled, hash_block=hashed or 0,
                                        in_use=self._key_in_use)  # branches and inferred sessions (lineage)
        self.recorder = TraceRecorder.from_env(scheduler, self.enabled)  # KVSCHED_RECORD_TRACE: this engine's traffic
        # KVSCHED_TRACE=FILE: one JSON line per applied decision, for replaying what the policy did.
        trace = trace_path()
        self._trace = DecisionTrace.open(trace)
        self._trace_scores = self._trace is not None and trace_scores()  # KVSCHED_TRACE_SCORES: also the scores
        if self._trace is not None:
            self.pins.before_apply = self._write_trace
        compat.wrap_allocate_slots(scheduler, self.on_shortage)
        self.tier = tier  # pins released for pressure, budget or TTL are demoted there, not dropped
        self.prefetcher: TierPrefetcher | None = None
        if self.tier is not None:
            holds = compat.pool_holds(scheduler)  # the tier's copies of blocks the pool holds go first (tier_reach)
            self.pins.attach_tier(self.tier.attach(self.pins.tier_value, holds), self.tier.demote)
            if self.tier.enabled and self.enabled:
                self.prefetcher = TierPrefetcher(self)
                self.tier.on_load_failures = self.prefetcher.on_load_failures
                self.pins.on_dropped = self.prefetcher.on_released

    # ---- hooks from the scheduler -------------------------------------------------------------------------------
    def on_request_added(self, request: Any) -> None:
        resolver = self.resolver
        key, hints = resolver.resolve(request)
        rid = request.request_id
        if self.recorder is not None:
            self.recorder.arrived(request, key, resolver.sharing(rid)[1])
        if key is None:
            return
        # The conversation kvsched's compaction rewrote is never continued: end its branch. Only when this turn began a
        # branch (most turns join one), and only a branch whose last turn's messages this rewrite's messages continue.
        lineage = resolver.lineage
        if key == lineage.created and (conversations := compat.compacted_from(request)):
            old = lineage.superseded(key, conversations)
            if old is not None:
                self.policy.counters["branches_superseded"] += 1
                self._end(old)
        if (conversation := compat.request_conversation(request)) is not None:
            lineage.note_conversation(key, conversation)
        self.policy.request_arrived(key, hints, *resolver.sharing(rid))
        # One key object per session (the policy record's), not one per request: fewer objects for the GC, and
        # dict lookups by the very object the tables hold skip the dataclass __eq__.
        key = self.policy.sessions[key].key
        self.requests[rid] = (key, hints)
        if self.prefetcher is not None:
            self.prefetcher.on_request_added(request, key)

    def on_request_updated(self, request: Any) -> None:
        """A streaming-input request's next chunk or end marker: the same turn, whose hints may say more (the end of
        the session, a TTL, a role). A hint given once stays given."""
        entry = self.requests.get(request.request_id)
        if entry is None:
            return
        _, new = compat.request_session(request)
        old = entry[1]
        hints = TurnHints(role=new.role or old.role, ttl_s=new.ttl_s if new.ttl_s is not None else old.ttl_s,
                          end=old.end or new.end)
        if hints != old:
            self.requests[request.request_id] = (entry[0], hints)

    def on_scheduled(self, scheduler_output: Any) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            entry = self.requests.get(new.req_id)
            if entry is None or new.req_id in self.started:
                continue
            self.started.add(new.req_id)
            if self._trace is not None:
                self._trace_row({"t": round(self.policy.clock(), 4), "session": str(entry[0]),
                                 "op": "start", "cached": int(new.num_computed_tokens),
                                 "prompt": len(new.prompt_token_ids or ())})
            if self.prefetcher is not None:
                self.prefetcher.on_turn_started(entry[0], int(new.num_computed_tokens), new.req_id)
            if self._payback:
                self._payback_started(new, entry[0])
            else:
                self.pins.turn_started(entry[0], int(new.num_computed_tokens))

    def on_request_finished(self, request: Any) -> None:
        """Called before vLLM frees a finished request's blocks: pin its reusable prefix for the next turn."""
        rid = request.request_id
        entry = self.requests.pop(rid, None)
        if self.prefetcher is not None:
            self.prefetcher.on_request_gone(rid)
        # the session ended while this request ran: no pin; it joined one another conversation shares: no end
        hints = self.policy.finish_hints(*entry, self.resolver.shared_turn(rid)) if entry else None
        if self.recorder is not None:  # an end the engine ignored is none there too: replays serve what it served
            self.recorder.finished(request, entry[1] if entry is not None else None, hints)
        if entry is None or hints is None:
            return
        key = entry[0]
        if rid not in self.started:  # finished (aborted) before it ever ran
            self.policy.request_abandoned(key)
            self.resolver.abandoned(rid, key)
            if hints.end:
                self._end(key)
            return
        self.started.discard(rid)
        groups, tokens = self._prefix(request) if self.enabled else ([], 0)  # the blocks a hit needs, tokens covered
        if not tokens:  # no later request could hit it (a sliding-window group's window is gone): nothing to pin
            groups = [[] for _ in groups]
        if self._payback:  # the ghost LRU caches what stock vLLM would: the request's full blocks
            self.policy.payback.reserve(-self._reserved.pop(rid, 0))
            self.pins.turn_finished(key, hints, groups, tokens, self._block_keys(request))
        else:
            self.pins.turn_finished(key, hints, groups, tokens)  # a last turn's tier blocks go too
        rec = self.policy.sessions.get(key)
        kept_over = rec is not None and rec.kept_over  # a side turn: the anchors, tail and copies stay the longer's
        if hints.end:
            self.resolver.forget(key, rid)
        else:
            self.resolver.finished(rid, key, request, not kept_over)
        if self.tier is not None and hints.end:
            self.tier.end_session(key)  # the disk and shared levels forget it too
        elif self.tier is not None:
            if kept_over:
                groups = []
            if groups and (tail := compat.partial_tail(self.scheduler, request, groups[0], self.block_size)):
                self.tier.save_tail(key, *tail)
            if groups:  # the disk and shared levels keep a copy (when configured)
                self.tier.publish_turn(key, groups[0], rec)
            if self.prefetcher is not None:
                self.prefetcher.on_turn_finished(request, key)
        self.pins.enforce_budget()

    def _payback_started(self, new: Any, key: SessionKey) -> None:
        """The pins' payback tracker (`KVSCHED_PAYBACK_SAMPLING`) hears the turn's prompt blocks and its cached part;
        the blocks the request will hold beyond its prompt's full blocks (decode, a partial last block) are not
        cacheable while it runs, in a stock pool as in ours."""
        request = self.scheduler.requests.get(new.req_id)
        prompt = len(new.prompt_token_ids or ())
        full = prompt // self.block_size
        keys = self._block_keys(request) if request is not None else []
        if len(keys) > full:  # the usual list is the prompt's, passed as is (the Python ghost's memo is keyed by it)
            keys = keys[:full]
        kv_tokens = prompt + max(int(getattr(request, "max_tokens", 1) or 1) - 1, 0)  # the last sampled token has no KV
        beyond = -(-kv_tokens // self.block_size) - full
        self._reserved[new.req_id] = beyond
        self.policy.payback.reserve(beyond)
        # vLLM's prefix cache hits at most the prompt less its last token
        self.pins.turn_started(key, int(new.num_computed_tokens), keys, max(prompt - 1, 0) // self.block_size)

    def _block_keys(self, request: Any) -> list[Any]:
        """The request's block hashes, one per cache block (the list itself when the sizes agree: the Python ghost
        remembers its sampling by it; the compiled one samples again, cheaply)."""
        hashes = compat.prompt_block_hashes(request)
        step = self._hash_step
        return hashes if step == 1 else hashes[step - 1::step]

    def _arm_payback(self) -> None:
        """The pool evicts cached blocks (or pins held blocks a live request needed): from here pins can cost hits
        a plain LRU pool would have had, so the payback tracker is fed (`PinPayback.arm`)."""
        self._payback_waiting = False
        self._payback = True
        self.policy.payback.arm()
        logger.info("kvsched: the prefix cache is full: the pins' payback tracker starts (judged once its ghost fills)")

    def on_shortage(self, request: Any, num_new_tokens: int = 0, own_free_hits: int = 0) -> bool:
        """vLLM could not allocate blocks for a live request: release pins, lowest value first, before vLLM preempts
        or queues anything. True if blocks were freed (the allocation is then retried)."""
        entry = self.requests.get(request.request_id)
        if self._payback_waiting:  # pins now cost a live request blocks: judge them from here
            self._arm_payback()
        return self.pins.on_shortage(entry[0] if entry else None, num_new_tokens, own_free_hits)

    def make_room(self, blocks: int, exclude: SessionKey) -> None:
        """Release other sessions' pins, lowest value first, until `blocks` more blocks are free (a queued request's
        prefetch: its admission would release them a moment later)."""
        self.pins.make_room(blocks, exclude)

    def expire(self) -> None:
        self.pins.expire()

    def before_schedule(self) -> None:
        """Each scheduler step, before vLLM schedules: TTL expiry, then the tier's due prefetches."""
        if self._payback_waiting and compat.prefix_cache_full(self.scheduler):
            self._arm_payback()
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
        (blocks a tier prefetch allocated while it held `head`: they come with the one reference the allocation
        took)."""
        if not self.pins.adopt(key, head, new):
            return  # over the budget: not kept
        if self._trace is not None:
            self._trace_row({"t": round(self.policy.clock(), 4), "session": str(key), "op": "prefetch",
                             "blocks": len(new)})

    def reset_can_succeed(self) -> bool:
        """vLLM's prefix-cache reset needs every block free: True if the pins alone hold the used ones. Found by
        review: pins were dropped (and every session forgotten) before a reset that then failed anyway (a request
        holding blocks, `reset_running_requests` off)."""
        pool = compat.block_pool(self.scheduler)
        pins_only = sum(1 for i, n in self.block_refs.items() if pool.blocks[i].ref_cnt <= n)
        return pool.get_num_free_blocks() + pins_only >= pool.num_gpu_blocks - 1  # the null block is always used

    def release_all(self) -> int:
        """Release every pin before vLLM resets the prefix cache (an RLHF weight sync, `pause_generation(clear_cache=
        True)`, `sleep()`), as a release of its own (`released_reset`). The sessions go on: their records, ended flags
        and lineage stay, so a turn queued or running at the reset is pinned when it finishes. Found by review: every
        pinned session was ended (counted in `sessions_ended`, no client asked), and such a turn finished as its
        session's last: no pin, the record and lineage forgotten. Returns how many pins were released."""
        released = self.policy.release_every_pin(ReleaseReason.RESET)
        self.pins.apply(released)
        if self.tier is not None:  # the tier's blocks, partial last blocks and lower levels too: maybe new weights
            self.tier.reset_cache()
        return len(released)

    def _key_in_use(self, key: SessionKey) -> bool:
        """Something is still kept under `key` (its record, the host tier's copies, the disk level's: found by review,
        a host copy evicted to disk was given with its key to the id's next conversation, whose end deleted it): a new
        branch never gets its number. Dictionary lookups, no I/O (`TierLevels.keeps`)."""
        if key in self.policy.sessions:
            return True
        directory = getattr(self.tier, "directory", None)
        if directory is not None and (key in directory.keys_of or key in directory.tail_of):
            return True
        levels = getattr(self.tier, "levels", None)
        return levels is not None and levels.keeps(key)

    def _end(self, key: SessionKey) -> None:
        self.apply(self.policy.end(key))
        if key in self.policy.sessions:  # a turn of it is in flight: its finish ends it too, never pins it again
            for rid, (k, hints) in list(self.requests.items()):  # (found by review: it pinned the old conversation
                if k == key and not hints.end:  # under the key the id's next conversation had been given)
                    self.requests[rid] = (k, dataclasses.replace(hints, end=True))
        self.resolver.forget(key)
        if self.tier is not None:
            self.pins.drop_tier(key)  # its tails kept beside too (a shared inferred session's other answers)
            self.tier.end_session(key)
        if self.prefetcher is not None:
            self.prefetcher.on_ended(key)

    # ---- decisions ----------------------------------------------------------------------------------------------
    def apply(self, decisions: list[Decision], pending: dict[SessionKey, list[list[Any]]] | None = None) -> None:
        self.pins.apply(decisions, pending)

    def _write_trace(self, decisions: list[Decision], pending: dict[SessionKey, list[list[Any]]] | None) -> None:
        assert self._trace is not None
        now, free = self.policy.clock(), compat.num_free_blocks(self.scheduler)
        for d in decisions:
            row: dict[str, Any] = {"t": round(now, 4), "session": str(d.key), "free": free}
            if isinstance(d, Pin):
                row.update(op="pin", blocks=sum(len(g) for g in (pending or {}).get(d.key, [])))
            else:
                row.update(op="release", reason=d.reason.value, blocks=d.blocks)
                if self._trace_scores:
                    from kvsched.core.scoring import retention_value
                    row["scores"] = sorted(
                        (round(retention_value(self.policy.candidate(r, now)) * 1e12, 4), str(k),
                         r.pinned_blocks, round(r.expected_gap_s, 2),
                         round(now - r.last_finished if r.last_finished is not None else 0.0, 2),
                         r.active_requests)
                        for k, r in self.policy.sessions.items() if r.pinned_blocks)
            self._trace_row(row)

    def _trace_row(self, row: dict[str, Any]) -> None:
        """One line of KVSCHED_TRACE; a failed write stops the trace (logged), never the engine."""
        if self._trace is not None and not self._trace.write(row):
            self._trace = None
            self.pins.before_apply = None

    def _unpin(self, key: SessionKey, blocks: int | None = None, demote: bool = False) -> None:
        self.pins.unpin(key, blocks, demote)

    # ---- admin / metrics (called through the engine-core utility) -------------------------------------------------
    def handle(self, op: str, *args: Any) -> Any:
        self.expire()
        if op == "stats":
            return self.stats()
        result = handle_admin(self, op, args)  # list / end / end_all, scoped to the caller (session_admin.py)
        return result if result is not None else {"error": f"unknown kvsched operation {op!r}"}

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
            "kv_bytes_per_token": compat.rank_shares(self.scheduler.vllm_config).engine(self.policy.bytes_per_token),
            "kv_rank_bytes_per_token": self.policy.bytes_per_token,  # the first rank's: what eviction scores weigh
            "free_blocks": compat.num_free_blocks(self.scheduler),
            "retained_hits": c["retained_hits"],
            "retained_hit_tokens": c["retained_hit_tokens"],
            "pins": c["pins"],
            "branches_superseded": c["branches_superseded"],
            "side_turns_kept_pin": c["pins_kept_over_overlapping_turn"],
            "inferred_shared_ends_ignored": c["inferred_shared_ends_ignored"],
            "inferred_shared_roles_ignored": c["inferred_shared_roles_ignored"],
            "released_queued_blocks": c["released_blocks_pressure_waiting"],
            **{f"released_{r.value}": c[f"released_{r.value}"] for r in ReleaseReason},
            **{f"released_{r.value}_partial": c[f"released_{r.value}_partial"] for r in ReleaseReason},
            **{f"released_blocks_{r.value}": c[f"released_blocks_{r.value}"] for r in ReleaseReason},
            **self.resolver.lineage.stats(),
            **(self.tier.tier_stats() if self.tier is not None else {}),
            **(self._prefetch_stats() if self.prefetcher is not None else {}),
            **self._payback_stats(),
        }

    def _payback_stats(self) -> dict[str, float]:
        payback = self.policy.payback
        if not payback.enabled:
            return {}
        ledger = payback.ledger
        cap = ledger.cap if ledger is not None else self.policy.config.max_ttl_s if payback.pinning else 0.0  # switch
        return {"payback_fed": float(payback.armed), "payback_balance_blocks": payback.real_hits - payback.lru_hits,
                "payback_ttl_cap_seconds": cap, "payback_probes": ledger.probes if ledger is not None else 0,
                "payback_clamped_pins": self.policy.counters["payback_clamped_pins"]}

    def _prefetch_stats(self) -> dict[str, float]:
        assert self.prefetcher is not None and self.tier is not None
        c, t = self.prefetcher.counters, self.tier.stats
        prefetches = c["prefetches_queued"] + c["prefetches_due"]
        return {"tier_restores": t["restores"] + prefetches, "tier_prefetched_restores": prefetches,
                "tier_prefetches_queued": c["prefetches_queued"], "tier_prefetches_due": c["prefetches_due"],
                "tier_prefetch_useful_blocks": c["useful_blocks"], "tier_prefetch_wasted_blocks": c["wasted_blocks"],
                "tier_wasted_prefetches": c["wasted_prefetches"],
                "tier_prefetch_hit_tokens": self.policy.counters["prefetch_hit_tokens"]}
