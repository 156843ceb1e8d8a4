"""OPT's next use on overlapping traces (found by review): a request finishing after a later-arriving one that shares
its blocks must not set their next use back, and a request the replay rejects is no use; checked on hand-built traces
and against an exhaustive search over every eviction choice, in the time model where that search is exact."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

import kvsched.sim.replay as replay_module
from kvsched.sim.policies import SimPolicy
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, TraceRequest, chain_hashes

R = TraceRequest


def test_a_late_finish_does_not_set_the_next_use_back():
    # A holds x1 until t=100; B (index 1) hits x1 and finishes at t=2, so x1's next use after B is never. A's finish
    # at 100 made A its last user again, whose next use is B (index 1, past): Belady then kept the dead x1 and evicted
    # y1, which C needs at t=110 (OPT 25 prefill tokens against LRU's 21).
    reqs = [R(t=0, session="A", prompt_tokens=5, output_tokens=0, blocks=["x1"], duration_s=100),
            R(t=1, session="B", prompt_tokens=5, output_tokens=0, blocks=["x1"], duration_s=1),
            R(t=3, session="C", prompt_tokens=5, output_tokens=0, blocks=["y1"], duration_s=98),
            R(t=102, session="D", prompt_tokens=9, output_tokens=0, blocks=["z1", "z2"], duration_s=1),
            R(t=110, session="C", prompt_tokens=5, output_tokens=0, blocks=["y1"], duration_s=1)]
    trace = Trace.from_requests(4, reqs)
    cfg = ReplayConfig(capacity_blocks=4, check=True)
    opt, lru = replay(trace, "opt", cfg), replay(trace, "lru", cfg)
    assert opt.prefill_tokens_computed == 21 == lru.prefill_tokens_computed  # y1 kept: C's second turn hits it


def test_a_rejected_request_is_no_next_use():
    # R (5 blocks, pool of 3) is rejected, so x's only other use never comes: Belady must evict x, not y, which D hits.
    reqs = [R(t=0, session="A", prompt_tokens=5, output_tokens=0, blocks=["x"]),
            R(t=1, session="B", prompt_tokens=5, output_tokens=0, blocks=["y"]),
            R(t=2, session="R", prompt_tokens=17, output_tokens=0, blocks=["x", "r1", "r2", "r3"]),
            R(t=3, session="C", prompt_tokens=5, output_tokens=0, blocks=["z"]),
            R(t=4, session="B", prompt_tokens=5, output_tokens=0, blocks=["y"])]
    res = replay(Trace.from_requests(4, reqs), "opt", ReplayConfig(capacity_blocks=3, check=True))
    assert res.rejected == 1 and res.hit_tokens == 4


class ScriptedEvictor:
    """Evicts the `choices[d]`-th combination of evictable blocks at the d-th eviction (0 past the script) and records
    how many combinations each eviction had, so a depth-first search can enumerate every eviction schedule."""

    def __init__(self, pool, choices: list[int], branches: list[int]) -> None:
        self.pool, self.choices, self.branches = pool, choices, branches

    def push(self, ids, stamps) -> None:
        pass

    def pop(self, k: int) -> np.ndarray:
        pool, d = self.pool, len(self.branches)
        combos = list(itertools.combinations(np.flatnonzero(pool.resident & (pool.ref == 0)).tolist(), k))
        self.branches.append(len(combos))
        return np.array(combos[self.choices[d] if d < len(self.choices) else 0], dtype=np.int64)


def exhaustive_min_prefill(trace: Trace, cfg: ReplayConfig, monkeypatch) -> int:
    """The least prefill any eviction schedule gives in the replay itself (the reviewer's brute force)."""
    best, stack = None, [[]]
    while stack:
        choices: list[int] = stack.pop()
        branches: list[int] = []

        def scripted(name, tr, pool, c, clock, choices=choices, branches=branches):
            policy = SimPolicy(tr, pool)
            pool.evictor = ScriptedEvictor(pool, choices, branches)
            return policy

        monkeypatch.setattr(replay_module, "make_policy", scripted)
        v = replay(trace, "scripted", cfg).prefill_tokens_computed
        best = v if best is None else min(best, v)
        for d in range(len(choices), len(branches)):
            stack.extend(choices + [0] * (d - len(choices)) + [alt] for alt in range(1, branches[d]))
    monkeypatch.undo()
    assert best is not None
    return best


def overlapping_trace(rng: random.Random, bs: int = 4) -> Trace:
    """2-4 sessions of 1-3 turns that overlap in time (recorded durations up to 30 s, turns 0.5-8 s apart), an
    optional shared system prompt; outputs never complete a block (see `exact_config`)."""
    system = [rng.randint(0, 9) for _ in range(rng.choice([0, 4, 8]))]
    reqs = []
    for s in range(rng.randint(2, 4)):
        toks = system + [100 + s] + [rng.randint(0, 9) for _ in range(rng.randint(0, 6))]
        t = rng.uniform(0, 10)
        for _ in range(rng.randint(1, 3)):
            out = [rng.randint(0, 9) for _ in range(rng.randint(0, bs - 1 - len(toks) % bs))]
            reqs.append(R(t=round(t, 3), session=f"s{s}", prompt_tokens=len(toks), output_tokens=len(out),
                          blocks=chain_hashes(toks + out, bs), duration_s=round(rng.uniform(0.5, 30), 3)))
            toks = toks + out + [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
            t += rng.uniform(0.5, 8)
    reqs.sort(key=lambda r: r.t)
    return Trace.from_requests(bs, reqs)


def exact_config(capacity: int) -> ReplayConfig:
    """Where the search is exact and Belady optimal: recorded durations and a free prefill make every admission and
    finish time independent of the evictions (a request's allocation does not depend on its hits), and outputs that
    complete no block leave no block that a finishing request registers again (evicting such a block before its
    owner finishes costs nothing, which Belady's next use does not see: OPT is no proven bound there)."""
    return ReplayConfig(capacity_blocks=capacity, prefill_tps=1e12, tpot_s=0.0, check=True)


@pytest.mark.parametrize("seeds", [range(0, 60), range(60, 120)])
def test_opt_matches_exhaustive_search_on_overlapping_traces(seeds, monkeypatch):
    for seed in seeds:
        rng = random.Random(seed)
        trace = overlapping_trace(rng)
        need = max(-(-(int(p) + int(o)) // 4) for p, o in zip(trace.prompt_tokens, trace.output_tokens, strict=True))
        cfg = exact_config(rng.randint(need, need + 4))
        opt = replay(trace, "opt", cfg).prefill_tokens_computed
        assert opt == exhaustive_min_prefill(trace, cfg, monkeypatch), seed
        assert opt <= replay(trace, "lru", cfg).prefill_tokens_computed, seed
