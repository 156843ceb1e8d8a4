"""The policies a replay compares: stock vLLM LRU, kvsched (LRU + RetentionPolicy pins), clairvoyant OPT.

A policy owns the pool's evictor and hears the request events the vLLM adapter hears. `KVSchedPolicy` applies
`kvsched.core.retention.RetentionPolicy`'s decisions to the pool the way `kvsched.adapters.vllm.session_pins.SessionPins`
applies them to vLLM's block pool (same calls, same order, same release sizes); the policy logic itself is not copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Decision, Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from kvsched.core.tier import TierConfig, TierDirectory
from kvsched.sim.evictors import BeladyEvictor, LRUEvictor, NextUse
from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import Trace


class SimPolicy:
    """Stock vLLM prefix caching: the LRU free queue, nothing else."""

    name = "lru"

    def __init__(self, trace: Trace, pool: BlockPool) -> None:
        self.trace = trace
        self.pool = pool
        pool.evictor = LRUEvictor(pool)

    def tick(self) -> None:
        """Called at every event, before it is handled (vLLM: at every schedule step)."""

    def on_arrival(self, i: int) -> None:
        pass

    def on_shortage(self, i: int, num_new_tokens: int, own_free_hits: int = 0) -> bool:
        """Request i cannot be allocated (`own_free_hits`: its hit blocks that sit in the free list); free something
        and return True to have the allocation retried."""
        return False

    def match_external(self, i: int, prompt_ids: np.ndarray, start: int, limit: int) -> int:
        """Blocks `prompt_ids[start:]` (at most `limit`) request i can load instead of computing (vLLM's KV connector
        `get_num_new_matched_tokens`); they are held for the request until `external_done`."""
        return 0

    def external_done(self) -> None:
        """The admission attempt is over (admitted or left waiting): matched blocks may be reused again."""

    def on_admitted(self, i: int, prompt_ids: np.ndarray, hit_blocks: int) -> None:
        pass

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        """Request i finished holding full blocks `ids`; called before its blocks are freed."""

    def stats(self) -> dict[str, float]:
        return {}


class OptPolicy(SimPolicy):
    """Clairvoyant eviction (Belady): the bound on prefix hits for a pool of this capacity under this trace."""

    name = "opt"

    def __init__(self, trace: Trace, pool: BlockPool) -> None:
        super().__init__(trace, pool)
        self.next_use = NextUse(trace)
        pool.evictor = BeladyEvictor(pool, self.next_use)

    def on_admitted(self, i: int, prompt_ids: np.ndarray, hit_blocks: int) -> None:
        self.next_use.used(i, prompt_ids)

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        self.next_use.used(i, ids)


# = kvsched.adapters.vllm.session_pins.DEMOTE_REASONS (asserted in tests/sim): releases whose blocks go to the tier
DEMOTE_REASONS = frozenset({ReleaseReason.PRESSURE, ReleaseReason.BUDGET})


class KVSchedPolicy(SimPolicy):
    """vLLM's LRU pool plus kvsched's session pins: each pin holds a reference on the session's prefix blocks.

    With `tier_bytes` > 0, the FP8 demotion tier too, as `KVSchedFP8TierConnector` runs it: blocks released for
    pressure or budget are demoted into `kvsched.core.tier.TierDirectory` (content key = block id, which is the
    chained prefix hash), a request loads the run of its prompt after its GPU prefix hit that the tier holds, and a
    session's last turn drops its tier blocks."""

    name = "kvsched"
    PRESSURE_CHUNK = 4  # = SessionPins.PRESSURE_CHUNK (asserted in tests/sim)

    def __init__(self, trace: Trace, pool: BlockPool, config: RetentionConfig, clock: Callable[[], float],
                 bytes_per_token: float, tier_bytes: int = 0, tier_block_bytes: int = 0) -> None:
        super().__init__(trace, pool)
        self.policy = RetentionPolicy(config, clock, total_blocks=pool.capacity, bytes_per_token=bytes_per_token)
        self.keys = [SessionKey(SessionId(s), salt) for s, salt in trace.sessions]
        self.pinned: dict[SessionKey, np.ndarray] = {}
        self.pin_refs = np.zeros(trace.n_ids, dtype=np.int32)
        self.pinned_distinct = 0  # SessionPins: len(block_refs)
        self.peak_pinned = 0
        self.tier: TierDirectory | None = None
        if tier_bytes > 0:
            if tier_block_bytes <= 0:
                raise ValueError("the tier needs its bytes per block")
            self.tier = TierDirectory(TierConfig(budget_bytes=tier_bytes), tier_block_bytes, self._tier_value)
        self.peak_tier_blocks = 0

    def _key_hints(self, i: int) -> tuple[SessionKey, TurnHints]:
        tr = self.trace
        ttl = float(tr.ttl_s[i])
        return self.keys[tr.session[i]], TurnHints(role=tr.role[i], ttl_s=None if math.isnan(ttl) else ttl,
                                                    end=bool(tr.end[i]))

    # ---- the SessionPins hooks ----------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.pinned:
            self.apply(self.policy.expire())

    def on_arrival(self, i: int) -> None:
        self.policy.request_arrived(*self._key_hints(i))

    def on_admitted(self, i: int, prompt_ids: np.ndarray, hit_blocks: int) -> None:
        # hit_blocks counts loaded (tier) blocks too: vLLM reports them in the request's num_computed_tokens
        key, _ = self._key_hints(i)
        self.apply(self.policy.turn_started(key, hit_blocks * self.trace.block_size))

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        key, hints = self._key_hints(i)
        self.apply(self.policy.turn_finished(key, hints, len(ids) * self.trace.block_size, len(ids)),
                   pending={key: ids})
        if hints.end and self.tier is not None:
            self.tier.drop_owner(key)
        if self.pinned_distinct > self.policy.budget_blocks:
            while releases := self.policy.release_over_budget(self.pinned_distinct):
                self.apply(releases)

    def match_external(self, i: int, prompt_ids: np.ndarray, start: int, limit: int) -> int:
        if self.tier is None or self.tier.num_slots == 0 or limit <= 0:
            return 0
        slots = self.tier.match(prompt_ids.tolist(), start, limit)
        self.tier.lock(slots)  # a demotion during this admission must not reuse a slot it is about to load
        return len(slots)

    def external_done(self) -> None:
        if self.tier is not None:
            self.tier.unlock_all()

    def _tier_value(self, key: object) -> float:
        """As SessionPins._tier_value: the pins' formula at the tier's bytes per token (`RetentionPolicy.value_of`)."""
        assert isinstance(key, SessionKey) and self.tier is not None
        bs = self.trace.block_size
        return self.policy.value_of(key, self.tier.blocks_of(key) * bs, self.tier.block_bytes / bs)

    def on_shortage(self, i: int, num_new_tokens: int, own_free_hits: int = 0) -> bool:
        key, _ = self._key_hints(i)
        before = self.pool.num_free
        need = max(self.PRESSURE_CHUNK,
                   -(-num_new_tokens // self.trace.block_size) + 1 + own_free_hits - before)  # as SessionPins
        while True:
            releases = (self.policy.release_for_pressure(need, exclude={key})
                        or self.policy.release_for_pressure(need))
            if not releases:
                return False
            self.apply(releases)
            if self.pool.num_free > before:
                return True

    # ---- decisions ----------------------------------------------------------------------------------------------
    def apply(self, decisions: list[Decision], pending: dict[SessionKey, np.ndarray] | None = None) -> None:
        for d in decisions:
            if isinstance(d, Pin):
                self._repin(d.key, (pending or {}).get(d.key, np.empty(0, dtype=np.int32)))
            elif isinstance(d, Release):
                self._unpin(d.key, d.blocks, demote=self.tier is not None and d.reason in DEMOTE_REASONS)

    def _repin(self, key: SessionKey, ids: np.ndarray) -> None:
        old = self.pinned.get(key)
        if old is None:
            common = 0
        elif len(ids) >= len(old) and np.array_equal(ids[: len(old)], old):
            common = len(old)
        else:
            n = min(len(old), len(ids))
            diff = np.flatnonzero(old[:n] != ids[:n])
            common = int(diff[0]) if len(diff) else n
        added = ids[common:]
        self.pool.touch(added)
        r = self.pin_refs[added] + 1
        self.pin_refs[added] = r
        self.pinned_distinct += int(np.count_nonzero(r == 1))
        self.peak_pinned = max(self.peak_pinned, self.pinned_distinct)
        self.pinned[key] = ids
        if old is not None:
            self._return(old[common:][::-1])

    def _return(self, released: np.ndarray) -> None:
        r = self.pin_refs[released] - 1
        self.pin_refs[released] = r
        self.pinned_distinct -= int(np.count_nonzero(r == 0))
        self.pool.free(released)

    def _unpin(self, key: SessionKey, blocks: int | None = None, demote: bool = False) -> None:
        ids = self.pinned.get(key)
        if ids is None or not len(ids):
            self.pinned.pop(key, None)
            return
        if blocks is None or blocks >= len(ids):
            del self.pinned[key]
            released = ids
        else:  # the tail goes first; the head, which the next turn hits first, stays
            self.pinned[key] = ids[: len(ids) - blocks]
            released = ids[len(ids) - blocks:]
        if demote and self.tier is not None:  # copied to the tier before the pool can reuse them, in prefix order
            self.tier.demote(key, [(b, b) for b in released.tolist()])
            self.peak_tier_blocks = max(self.peak_tier_blocks, self.tier.used_slots)
        self._return(released[::-1])

    def stats(self) -> dict[str, float]:
        c = self.policy.counters
        out = {"peak_pinned_blocks": self.peak_pinned, "pins": c["pins"],
               "retained_hit_tokens": c["retained_hit_tokens"],
               **{k: v for k, v in sorted(c.items()) if k.startswith("released_")}}
        if self.tier is not None:
            t = self.tier
            out.update(tier_capacity_blocks=t.num_slots, tier_block_bytes=t.block_bytes,
                       peak_tier_blocks=self.peak_tier_blocks, peak_tier_bytes=self.peak_tier_blocks * t.block_bytes,
                       tier_demoted_blocks=t.counters["demoted_blocks"], tier_evicted_blocks=t.counters["evicted_blocks"])
        return out


POLICY_NAMES = ("lru", "kvsched", "opt")
