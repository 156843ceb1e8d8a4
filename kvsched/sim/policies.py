"""The policies a replay compares: stock vLLM LRU, kvsched (LRU + RetentionPolicy pins), clairvoyant OPT.

A policy owns the pool's evictor and hears the request events the vLLM adapter hears. `KVSchedPolicy` applies
`kvsched.core.retention.RetentionPolicy`'s decisions to the pool with `kvsched.core.pin_apply.PinApplier`, the code
`kvsched.adapters.vllm.session_pins.SessionPins` applies them to vLLM's block pool with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import cast

import numpy as np

from kvsched.core.config import RetentionConfig
from kvsched.core.ghost_lru import MIX, LruGhost
from kvsched.core.lineage import Anchor, Lineage, LineageConfig
from kvsched.core.pin_apply import PinApplier
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from kvsched.core.tier import TierDirectory
from kvsched.core.tier_config import TierConfig
from kvsched.ops.ghost import new_ghost
from kvsched.sim.evictors import BeladyEvictor, LRUEvictor, NextUse
from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import Trace


class SimPolicy:
    """Stock vLLM prefix caching: the LRU free queue, nothing else."""

    name = "lru"
    # stats() entries that are not counts, for a fleet's sums (`kvsched.sim.replicas.merge_stats`): settings every
    # replica shares, and states each replica has its own of
    settings: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()

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

    def match_tail(self, i: int, prompt_ids: np.ndarray, end: int) -> int:
        """Tokens of request i past its first `end` full blocks (hit or loaded) it can load rather than compute: a
        partial last block the connector kept (kvsched's tier); held like `match_external`'s blocks."""
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
    """Clairvoyant eviction (Belady) for a pool of this capacity under this trace: a near-bound on prefix hits, not a
    proven one. Its next uses take the trace's arrivals as fixed, but an eviction changes hits, hits change prefill
    times and so finishes, waits for memory and what is cached at later admissions; and evicting a block that a running
    request registers again at its finish (its output) costs nothing until then. Exact where timings cannot depend on
    evictions (tests/sim/test_opt_next_use.py)."""

    name = "opt"

    def __init__(self, trace: Trace, pool: BlockPool) -> None:
        super().__init__(trace, pool)
        self.next_use = NextUse(trace, pool.capacity)
        pool.evictor = BeladyEvictor(pool, self.next_use)

    def on_admitted(self, i: int, prompt_ids: np.ndarray, hit_blocks: int) -> None:
        self.next_use.used(i, prompt_ids)

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        self.next_use.used(i, ids)


def id_table(ids: int, threshold: int) -> bytes:
    """`PinPayback.id_table` for the dense ids 0..ids-1: 1 where the tracker's own rule, (hash(k) x MIX) mod 2^64 <
    threshold, samples k (CPython hashes an int below 2^61 - 1 to itself; numpy's uint64 product wraps mod 2^64)."""
    if threshold >= 1 << 64:  # 1 in 1
        return b"\x01" * ids
    mixed = np.arange(ids, dtype=np.uint64) * np.uint64(MIX)
    return (mixed < np.uint64(threshold)).astype(np.uint8).tobytes()


class SimPinPool:
    """The simulator's pool as `kvsched.core.pin_apply.PinPool`: a block is its int id (the chained prefix hash, so
    also its content key); the pins' references per block are counted a pin change at a time, in a Python list (a pin
    change is a few 512-token blocks on the Mooncake traces: median 8-14, where numpy's per-call cost outweighs a
    loop)."""

    __slots__ = ("pool", "refs", "pinned", "peak")

    def __init__(self, pool: BlockPool, n_ids: int) -> None:
        self.pool = pool
        self.refs = [0] * n_ids
        self.pinned = 0  # distinct blocks with refs > 0
        self.peak = 0

    def hold(self, blocks: list[int]) -> None:
        self.pool.touch_list(blocks)
        self.hold_allocated(blocks)

    def hold_allocated(self, blocks: list[int]) -> None:
        refs = self.refs
        new = 0
        for b in blocks:
            r = refs[b]
            refs[b] = r + 1
            new += not r
        if new:
            self.pinned += new
            if self.pinned > self.peak:
                self.peak = self.pinned

    def give_back(self, blocks: list[int]) -> None:
        refs = self.refs
        gone = 0
        for b in blocks:
            r = refs[b] - 1
            refs[b] = r
            gone += not r
        self.pinned -= gone
        self.pool.free_list(blocks)

    def num_free(self) -> int:
        return self.pool.num_free

    def num_pinned(self) -> int:
        return self.pinned

    def cached_keys(self, blocks: list[int]) -> list[tuple[Hashable, int]]:
        return [(b, b) for b in blocks]


# The largest block an engine's partial last block is kept for (vLLM's block sizes go to 128 tokens). A trace in
# coarser blocks hashes at its own granularity (Mooncake's 512-token ids): an engine's partial block is a fraction of
# one, the rest of it full blocks that LRU caches too, which such a trace cannot show; keeping its partial blocks in
# the tier would credit the tier with KV that the other sides could not hit.
TAIL_MAX_BLOCK_TOKENS = 128


class KVSchedPolicy(SimPolicy):
    """vLLM's LRU pool plus kvsched's session pins: each pin holds a reference on the session's prefix blocks, applied
    by `kvsched.core.pin_apply.PinApplier` as in the vLLM adapter. A trace's session is a named session: its turns
    join branches by the engine's lineage rules (`kvsched.core.lineage`), on the prompt's full block ids.

    With `tier_bytes` > 0, the FP8 demotion tier too, as `KVSchedFP8TierConnector` runs it: blocks released for
    pressure, budget or TTL are demoted into `kvsched.core.tier.TierDirectory` (content key = block id, which is the
    chained prefix hash), a request loads the run of its prompt after its GPU prefix hit that the tier holds, and a
    session's last turn drops its tier blocks. A turn's partial last block (its KV past its full blocks) is stored as
    the engine's `save_tail` stores it, and the session's next turn loads it after a prefix that reaches it: as many of
    its tokens as that prompt repeats, which an engine's recording says (`tail_reuse`: a re-tokenized output often
    differs) and is otherwise taken as all of them (agent turns append); only in traces whose blocks could be an
    engine's (TAIL_MAX_BLOCK_TOKENS). Not modelled: the tier's prefetch ahead of a turn (`tier_prefetch`)."""

    name = "kvsched"
    settings = frozenset({"tier_block_bytes"})
    states = frozenset({"payback_ttl_cap_s"})  # the ledger's cap: each replica's own evidence

    def __init__(self, trace: Trace, pool: BlockPool, config: RetentionConfig, clock: Callable[[], float],
                 bytes_per_token: float, tier_bytes: int = 0, tier_block_bytes: int = 0,
                 tier_eviction: str = "recency") -> None:
        super().__init__(trace, pool)
        config = config.for_pool(tier=tier_bytes > 0)
        self.policy = RetentionPolicy(config, clock, total_blocks=pool.capacity, bytes_per_token=bytes_per_token)
        self.pin_pool = SimPinPool(pool, trace.n_ids)
        # Per request, read a few times a turn: Python ints (a numpy scalar read costs several list reads).
        bs, p = trace.block_size, trace.prompt_tokens.astype(np.int64)
        self._full: list[int] = (p // bs).tolist()  # the prompt's full blocks
        self._hittable: list[int] = ((p - 1) // bs).tolist()  # those a hit may cover (vLLM computes the last token)
        # blocks a request holds while it runs beyond its prompt's full blocks (the replay allocates them up front)
        self._beyond: list[int] = (-(-(p + trace.output_tokens.astype(np.int64)) // bs) - p // bs).tolist()
        self._ttl: list[float] = trace.ttl_s.tolist()
        self._end: list[bool] = trace.end.tolist()
        self.pins: PinApplier[int] = PinApplier(self.policy, self.pin_pool, trace.block_size)
        self.keys = [SessionKey(SessionId(s), salt) for s, salt in trace.sessions]
        # The engine's session lineage (`kvsched.adapters.vllm.session_lineage`): a turn joins the branch of its named
        # session whose last prompt it continues; one that continues none is a branch of its own, with its own pin.
        sessions = self.policy.sessions
        self.lineage = Lineage(LineageConfig(max_entries=config.max_sessions),
                               is_pinned=lambda k: (r := sessions.get(k)) is not None and r.pinned)
        self._payback = self.policy.payback.enabled  # fixed by the configuration
        if self._payback:  # compiled when built; the reference reads the dense ids' sampling from a table
            ghost = new_ghost(self.policy.payback.rate)
            if isinstance(ghost, LruGhost):
                ghost.id_table = id_table(trace.n_ids, ghost.threshold)
            self.policy.payback.use_ghost(ghost)
        # Fed from the pool's first eviction (or pins' first release for a live request), as the engine does.
        self._payback_waiting = self._payback and not self.policy.payback.armed
        self._reserved: dict[int, int] = {}  # request -> the blocks beyond its prompt it reserved in the tracker
        self.joined: dict[int, tuple[SessionKey, TurnHints] | None] = {}  # request -> its branch and hints
        # (None: served without a session)
        self.anchors: dict[int, Anchor | None] = {}
        self.tier: TierDirectory | None = None
        if tier_bytes > 0:
            if tier_block_bytes <= 0:
                raise ValueError("the tier needs its bytes per block")
            self.tier = TierDirectory(TierConfig(budget_bytes=tier_bytes, eviction=tier_eviction), tier_block_bytes,
                                      self.pins.tier_value)
            ref = pool.ref  # a block the pool holds (a pin, a request) is demoted again when released: tier_reach
            self.tier.reach.pool_holds = lambda key: ref.item(cast(int, key)) > 0  # (keys are block ids)
            self.pins.attach_tier(self.tier, self._demote)
        self.peak_tier_blocks = 0
        self.tails = self.tier is not None and trace.block_size <= TAIL_MAX_BLOCK_TOKENS

    def _hints(self, i: int) -> TurnHints:
        ttl = self._ttl[i]
        return TurnHints(role=self.trace.role[i], ttl_s=None if math.isnan(ttl) else ttl, end=self._end[i])

    def _join(self, i: int) -> tuple[SessionKey, TurnHints] | None:
        """The branch request i joins, as the engine's resolver decides it on the prompt's full blocks, and its hints
        (kept until it finishes); None past the id's branch limit."""
        tr = self.trace
        prompt = tr.blocks(i)[: self._full[i]]
        # A view, not a list: the lineage reads 1-2 ids (len and indexing). The array's memoryview gives Python ints,
        # whose comparisons give a bool (a numpy array's give numpy.bool, which the mypyc-compiled lineage refuses).
        key = self.lineage.named(self.keys[tr.session[i]], cast(Sequence[Hashable], prompt.data))
        entry = self.joined[i] = None if key is None else (key, self._hints(i))
        self.anchors[i] = (len(prompt) - 1, int(prompt[-1])) if len(prompt) else None
        return entry

    # ---- the SessionPins hooks ----------------------------------------------------------------------------------
    def tick(self) -> None:
        if self._payback_waiting and (self.pool.evictions or self.pool.cache_full):  # as the engine, before the step
            self._arm_payback()
        self.pins.expire()

    def on_arrival(self, i: int) -> None:
        entry = self._join(i)
        if entry is None:  # past the id's branch limit: served without a session, as the engine does
            return
        compacted = self.trace.compacted
        if compacted is not None and compacted[i]:
            old = self.lineage.superseded(entry[0])  # the conversation the compaction rewrote, as the engine ends it
            if old is not None:
                self.policy.counters["branches_superseded"] += 1
                self.pins.apply(self.policy.end(old))
                self.lineage.forget(old)
                if self.tier is not None:
                    self.tier.drop_owner(old)
        joins = self.trace.joins_pin is not None and bool(self.trace.joins_pin[i])  # recorded: as the engine pinned
        self.policy.request_arrived(*entry, joins, joins)  # (a repeat of a shared inferred session's last prompt)

    def on_admitted(self, i: int, prompt_ids: np.ndarray, hit_blocks: int) -> None:
        # hit_blocks counts loaded (tier) blocks too: vLLM reports them in the request's num_computed_tokens
        entry = self.joined.get(i)
        if entry is None:  # no session: the engine's hooks skip it (the payback tracker too)
            return
        payback = self.policy.payback
        fed = self._payback and payback.armed
        if fed:
            payback.reserve(beyond := self._beyond[i])
            self._reserved[i] = beyond
        bs = self.trace.block_size  # the payback tracker's keys; a hit covers at most the prompt less its last token
        self.pins.turn_started(entry[0], hit_blocks * bs, prompt_ids.tolist() if fed else None,
                               self._hittable[i])

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        anchor = self.anchors.pop(i, None)
        entry = self.joined.pop(i, None)
        if entry is None:
            return
        key, hints = entry
        hints = self.policy.finish_hints(key, hints)  # the session ended while this request ran: no pin
        if (beyond := self._reserved.pop(i, None)) is not None:
            self.policy.payback.reserve(-beyond)
        blocks = ids.tolist()
        self.pins.turn_finished(key, hints, [blocks], len(ids) * self.trace.block_size, blocks)
        if self.tails and not hints.end:
            self._save_tail(i, key, blocks)
        if hints.end:
            self.lineage.forget(key)
        else:  # a side turn that kept the longer pin leaves the anchors too, as the engine does
            rec = self.policy.sessions.get(key)
            self.lineage.finished(key, anchor, moved=rec is None or not rec.kept_over)
        self.pins.enforce_budget()

    def match_external(self, i: int, prompt_ids: np.ndarray, start: int, limit: int) -> int:
        if self.tier is None or self.tier.num_slots == 0 or limit <= 0:
            return 0
        slots = self.tier.match(prompt_ids.tolist(), start, limit)
        self.tier.lock(slots)  # a demotion during this admission must not reuse a slot it is about to load
        return len(slots)

    def match_tail(self, i: int, prompt_ids: np.ndarray, end: int) -> int:
        entry = self.joined.get(i)
        if self.tier is None or not self.tails or entry is None or not end or not self.tier.tail_of:
            return 0
        # the session's tail after that block, or another answer's of a shared one (`kvsched.core.shared_tails`)
        tail = self.pins.tails.tail_after(self.tier, entry[0], int(prompt_ids[end - 1]))
        room = int(self.trace.prompt_tokens[i]) - 1 - end * self.trace.block_size  # vLLM computes the last token
        if self.trace.tail_reuse is not None and self.trace.tail_reuse[i] >= 0:  # recorded: what the prompt repeats
            room = min(room, int(self.trace.tail_reuse[i]))
        if tail is None or room <= 0 or tail.parent != int(prompt_ids[end - 1]):
            return 0
        found = self.tier.match_tail(tail.parent, tail.tokens[:room])
        if found is None:
            return 0
        self.tier.lock([found[0]])
        return found[1]

    def _save_tail(self, i: int, key: SessionKey, blocks: list[int]) -> None:
        """The engine's `save_tail`: the KV past the request's full blocks (all its tokens but the last sampled one),
        when less than a block, unless the turn was a side turn (the session's tail stays its main line's)."""
        tr, bs = self.trace, self.trace.block_size
        rest = int(tr.prompt_tokens[i]) + int(tr.output_tokens[i]) - 1 - len(blocks) * bs
        rec = self.policy.sessions.get(key)
        if not blocks or not 0 < rest < bs or (rec is not None and rec.kept_over):
            return
        assert self.tier is not None
        if self.tier.put_tail(key, blocks[-1], (-1 - i, *range(1, rest)), -1) is not None:  # tokens: unique to i
            self.peak_tier_blocks = max(self.peak_tier_blocks, self.tier.used_slots)

    def external_done(self) -> None:
        if self.tier is not None:
            self.tier.unlock_all()

    def _arm_payback(self) -> None:
        """The pool evicts (or pins hold blocks a live request needs): feed the payback tracker from here."""
        self._payback_waiting = False
        self.policy.payback.arm()

    def on_shortage(self, i: int, num_new_tokens: int, own_free_hits: int = 0) -> bool:
        entry = self.joined.get(i)
        if self._payback_waiting:  # pins now cost a live request blocks (as the engine's hook)
            self._arm_payback()
        return self.pins.on_shortage(entry[0] if entry else None, num_new_tokens, own_free_hits)

    def _demote(self, key: SessionKey, blocks: list[tuple[Hashable, int]], start: int) -> int:
        assert self.tier is not None
        stores = self.tier.demote(key, blocks, start)
        self.peak_tier_blocks = max(self.peak_tier_blocks, self.tier.used_slots)
        return len(stores)

    def _ledger_stats(self) -> dict[str, float]:
        ledger = self.policy.payback.ledger
        # The balance and its variance (sums over requests: replicas add up) give the ledger's evidence,
        # balance / sqrt(variance + 1), in units of the per-request differences' own noise.
        return {} if ledger is None else {"payback_balance": ledger.balance, "payback_variance": ledger.variance,
                                          "payback_ttl_cap_s": ledger.cap, "payback_probes": ledger.probes,
                                          "payback_clamped_pins": self.policy.counters["payback_clamped_pins"]}

    def stats(self) -> dict[str, float]:
        c = self.policy.counters
        out: dict[str, float] = {"peak_pinned_blocks": self.pin_pool.peak, "pins": c["pins"],
               "retained_hit_tokens": c["retained_hit_tokens"], "payback_switches": self.policy.payback.switches,
               "payback_real_hits": self.policy.payback.real_hits, "payback_lru_hits": self.policy.payback.lru_hits,
               **self._ledger_stats(), "branches": self.lineage.counters["branches"],
               "branches_superseded": c["branches_superseded"],
               "branch_overflows": self.lineage.counters["branch_overflows"],
               **{k: v for k, v in sorted(c.items()) if k.startswith("released_")}}
        if self.tier is not None:
            t = self.tier
            out.update(tier_capacity_blocks=t.num_slots, tier_block_bytes=t.block_bytes,
                       peak_tier_blocks=self.peak_tier_blocks, peak_tier_bytes=self.peak_tier_blocks * t.block_bytes,
                       tier_demoted_blocks=t.counters["demoted_blocks"], tier_evicted_blocks=t.counters["evicted_blocks"])
        return out


POLICY_NAMES = ("lru", "kvsched", "opt")
