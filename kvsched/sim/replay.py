"""Replay a trace against the block pool under one policy, and count what prefix caching saved.

Time model (simple on purpose, the same for every policy):
- a request arrives at its trace time `t`; it is admitted when its blocks can be allocated (FCFS: a request that
  cannot be allocated waits, and so does everything behind it, until a finishing request frees blocks);
- on admission it looks up its prompt's leading cached blocks (at most `prompt_tokens - 1` tokens, as vLLM), then the
  run after them the policy can load (kvsched's FP8 tier; loaded blocks take pool blocks like computed ones) and the
  partial block after that run the tier kept (a previous turn's tail), and holds all its blocks (prompt and output) until it finishes;
- it runs alone at the given speeds: prefill of the tokens not hit at `prefill_tps`, then `output_tokens` decode steps
  of `tpot_s`; no batching slowdown, no preemption; a request whose trace line gives `duration_s` (a measured
  arrival-to-finish time, e.g. from `kvsched bench agents` or an engine recording) instead holds its blocks for that
  long from its admission here (or until its own prefill is done, if later), which replays a real engine's batching.
  The recordings do not say how much of that time the request queued in the engine, so all of it counts as service
  and a wait for memory in the replay comes on top: where the engine queued the request too, that wait is counted
  twice, the same way on every side. Counting from the arrival instead (finish at arrival + duration whatever the
  wait) made waiting free, and a policy that kept requests waiting computed less than any eviction order could
  (found by review);
- TTFT = wait for memory + prefill time of the tokens neither hit nor loaded (a load's copy time is not modelled).
Requests larger than the whole pool are rejected (counted, not replayed).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvsched.core.config import RetentionConfig
from kvsched.core.pin_apply import Applied
from kvsched.sim.policies import KVSchedPolicy, OptPolicy, SimPolicy
from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import Trace


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    capacity_blocks: int
    prefill_tps: float = 10_000.0  # tokens/s of prefill (the user's figure for their GPU and model)
    tpot_s: float = 0.02  # seconds per output token
    bytes_per_token: float = 65_536.0  # KV bytes per token (Llama 3.1 8B FP8); used for memory figures and scoring
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    tier_bytes: int = 0  # kvsched's FP8 demotion tier (host memory); 0 = off
    tier_block_bytes: int = 0  # tier bytes per block (FP8 pages + scales; `kvsched simulate` derives it from the model)
    tier_eviction: str = "recency"  # the tier's eviction order (kvsched.core.tier_config.TierConfig.eviction)
    restore_bytes_per_s: float = 0.0  # host -> device bandwidth: a restore adds its bytes / this to TTFT (0: free)
    check: bool = False  # assert pool invariants after every event (tests)
    record_applied: bool = False  # keep kvsched's applied decisions in ReplayResult.applied (tests)


@dataclass(slots=True)
class ReplayResult:
    policy: str
    requests: int = 0
    rejected: int = 0
    prompt_tokens_total: int = 0
    hit_tokens: int = 0  # served by the GPU prefix cache
    restored_tokens: int = 0  # loaded from the tier instead of computed
    ttft_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    wait_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    peak_held_blocks: int = 0
    evictions: int = 0
    wall_s: float = 0.0
    policy_stats: dict[str, Any] = field(default_factory=dict)  # numbers; a fleet's states: a list per replica
    stat_kinds: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())  # the policy's (settings, states)
    applied: list[Applied] = field(default_factory=list)  # with `record_applied`: every pin decision, as applied

    @property
    def tokens_saved(self) -> int:
        """Prompt tokens not prefilled: prefix-cache hits plus tier loads."""
        return self.hit_tokens + self.restored_tokens

    @property
    def prefill_tokens_computed(self) -> int:
        return self.prompt_tokens_total - self.tokens_saved

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens_total if self.prompt_tokens_total else 0.0

    def summary(self, cfg: ReplayConfig, block_size: int) -> dict[str, Any]:
        def pct(a: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(a, q)), 6) if len(a) else None

        return {
            "requests": self.requests, "rejected": self.rejected,
            "prompt_tokens_total": self.prompt_tokens_total,
            "prefill_tokens_computed": self.prefill_tokens_computed,
            "tokens_saved": self.tokens_saved,
            "hit_rate": round(self.hit_rate, 6),
            "restored_tokens": self.restored_tokens,
            "ttft_s": {"mean": round(float(self.ttft_s.mean()), 6) if len(self.ttft_s) else None,
                       "p50": pct(self.ttft_s, 50), "p90": pct(self.ttft_s, 90), "p99": pct(self.ttft_s, 99),
                       "max": pct(self.ttft_s, 100)},
            "memory_wait_s": {"p50": pct(self.wait_s, 50), "p99": pct(self.wait_s, 99),
                              "waited": int(np.count_nonzero(self.wait_s > 0))},
            "peak_held_blocks": self.peak_held_blocks,
            "peak_held_bytes": int(self.peak_held_blocks * block_size * cfg.bytes_per_token),
            "evicted_blocks": self.evictions,
            "wall_s": round(self.wall_s, 3),
            **self.policy_stats,
        }


class _Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_policy(name: str, trace: Trace, pool: BlockPool, cfg: ReplayConfig, clock: _Clock) -> SimPolicy:
    if name == "lru":
        return SimPolicy(trace, pool)
    if name == "opt":
        return OptPolicy(trace, pool)
    if name == "kvsched":
        return KVSchedPolicy(trace, pool, cfg.retention, clock, cfg.bytes_per_token, cfg.tier_bytes,
                             cfg.tier_block_bytes, cfg.tier_eviction)
    if name == "lru+offload":  # stock vLLM with its CPU offloading connector, on the tier's host bytes
        from kvsched.sim.offload import OffloadLRUPolicy

        page = host_block_bytes(name, cfg, trace.block_size)
        return OffloadLRUPolicy(trace, pool, int(cfg.tier_bytes // page) if page else 0)
    raise ValueError(f"unknown policy {name!r}")


def host_block_bytes(name: str, cfg: ReplayConfig, block_size: int) -> float:
    """Bytes one block takes on the host, which its restore copies: stock offloading stores the pool's own pages (in
    the pool's dtype, `kvsched.sim.offload`), kvsched's tier FP8 pages and their scales (found by review: the offload
    host was counted in FP8 tier blocks, on a bf16 pool twice the pages its bytes hold)."""
    return cfg.bytes_per_token * block_size if name == "lru+offload" else float(cfg.tier_block_bytes)


def replay(trace: Trace, policy: str, cfg: ReplayConfig,
           progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Replay `trace` under `policy` ("lru", "kvsched", "opt", "lru+offload"); `progress(n)` is told of every ~1% of arrivals."""
    wall0 = time.perf_counter()
    pool = BlockPool(trace.n_ids, cfg.capacity_blocks)
    clock = _Clock()
    pol = make_policy(policy, trace, pool, cfg, clock)
    res = ReplayResult(policy=policy)
    if cfg.record_applied and isinstance(pol, KVSchedPolicy):
        pol.pins.log = res.applied
    bs = trace.block_size
    load_bytes = host_block_bytes(policy, cfg, bs)
    n = len(trace)
    t_arr, prompt, output, measured = trace.t, trace.prompt_tokens, trace.output_tokens, trace.duration_s
    ttft = np.full(n, np.nan)
    wait = np.full(n, np.nan)
    finishes: list[tuple[float, int]] = []
    waiting: deque[int] = deque()
    peak = 0

    def try_admit(now: float) -> None:
        nonlocal peak
        while waiting:
            i = waiting[0]
            ids = trace.blocks(i)
            p = int(prompt[i])
            full = p // bs
            held = -(-(p + int(output[i])) // bs)
            prompt_ids = ids[:full]
            hittable = min((p - 1) // bs, full)
            hit = pool.hit_blocks(prompt_ids[:hittable])
            loaded = pol.match_external(i, prompt_ids, hit, hittable - hit)
            tail = pol.match_tail(i, prompt_ids, hit + loaded)  # a partial block the tier kept after that run
            while not pool.can_admit(prompt_ids, held - full):
                if not pol.on_shortage(i, p - hit * bs, pool.own_evictable(prompt_ids)):  # loaded blocks too
                    pol.external_done()
                    return
            waiting.popleft()
            pool.admit(prompt_ids, held - full)
            pol.external_done()
            pol.on_admitted(i, prompt_ids, hit + loaded)
            peak = max(peak, pool.num_held)
            computed = p - (hit + loaded) * bs - tail
            res.hit_tokens += hit * bs
            res.restored_tokens += loaded * bs + tail
            res.prompt_tokens_total += p
            res.requests += 1
            prefill = computed / cfg.prefill_tps
            if (loaded or tail) and cfg.restore_bytes_per_s > 0:  # the restore's copy precedes the rest's prefill
                prefill += (loaded + (tail > 0)) * load_bytes / cfg.restore_bytes_per_s
            wait[i] = now - t_arr[i]
            ttft[i] = wait[i] + prefill
            done = now + prefill + int(output[i]) * cfg.tpot_s
            if measured is not None and not np.isnan(measured[i]):  # the trace says how long it really ran
                done = now + max(float(measured[i]), prefill)  # from admission: waiting here delays it (docstring)
            heapq.heappush(finishes, (done, i))
            if cfg.check:
                pool.check()

    def finish(i: int) -> None:
        ids = trace.blocks(i)
        p = int(prompt[i])
        full = p // bs
        held = -(-(p + int(output[i])) // bs)
        pool.register(ids[full:])
        pol.on_finished(i, ids)
        pool.free(ids[::-1], held - len(ids))
        if cfg.check:
            pool.check()

    i = 0
    report_every = max(1, n // 100)
    while i < n or finishes:
        if finishes and (i >= n or finishes[0][0] <= t_arr[i]):
            now, j = heapq.heappop(finishes)
            clock.now = now
            pol.tick()
            finish(j)
        else:
            now = clock.now = float(t_arr[i])
            pol.tick()
            p = int(prompt[i])
            if -(-(p + int(output[i])) // bs) > pool.capacity:
                res.rejected += 1  # as vLLM's 400: the request never reaches the scheduler
            else:
                pol.on_arrival(i)
                waiting.append(i)
            i += 1
            if progress is not None and i % report_every == 0:
                progress(report_every)
        try_admit(now)
    if waiting:
        raise RuntimeError(f"{len(waiting)} requests never admitted (pool of {pool.capacity} blocks)")
    done = ~np.isnan(ttft)
    res.ttft_s, res.wait_s = ttft[done], wait[done]
    res.peak_held_blocks = peak
    res.evictions = pool.evictions
    res.policy_stats = pol.stats()
    res.stat_kinds = (pol.settings, pol.states)
    res.wall_s = time.perf_counter() - wall0
    return res


def replay_all(trace: Trace, cfg: ReplayConfig, policies: tuple[str, ...] = ("lru", "kvsched", "opt")
               ) -> dict[str, ReplayResult]:
    return {p: replay(trace, p, cfg) for p in policies}
