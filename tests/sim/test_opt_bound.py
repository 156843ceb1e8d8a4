"""The clairvoyant (Belady) policy of the simulator against exhaustive search over every eviction choice, on tiny
sequential traces, and LRU on a hand-worked example."""

from __future__ import annotations

import itertools
import random
from functools import cache

import pytest

from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, TraceRequest

BS = 4


def sequential_trace(chains: list[tuple[str, list[str]]]) -> Trace:
    """One request per chain, 100 s apart (each finishes before the next arrives), no output tokens; prompts of
    k full blocks + 1 token, so all k blocks may hit (vLLM never hits a prompt's last token)."""
    reqs = [TraceRequest(t=100.0 * i, session=s, prompt_tokens=len(c) * BS + 1, output_tokens=0, blocks=c)
            for i, (s, c) in enumerate(chains)]
    return Trace.from_requests(BS, reqs)


def exhaustive_best_hits(chains: list[list[str]], capacity: int) -> int:
    """Most hit tokens any eviction schedule achieves in the simulator's pool model: a request hits the leading run
    of its chain that is cached, needs its missing blocks plus one partial block free, evicts only what it must (from
    cached blocks it does not use), and leaves its chain cached."""

    @cache
    def best(r: int, cached: frozenset[str]) -> int:
        if r == len(chains):
            return 0
        chain = chains[r]
        hit = 0
        while hit < len(chain) and chain[hit] in cached:
            hit += 1
        present = sum(1 for b in chain if b in cached)
        need = (len(chain) - present) + 1 - (capacity - len(cached))
        victims = sorted(cached - set(chain))
        if need > len(victims):
            raise ValueError("request larger than the pool")
        options = itertools.combinations(victims, need) if need > 0 else [()]
        return hit * BS + max(best(r + 1, (cached - set(ev)) | set(chain)) for ev in options)

    return best(0, frozenset())


def random_chains(rng: random.Random) -> list[tuple[str, list[str]]]:
    sessions = {s: ["sys"] for s in "abc"[: rng.randint(2, 3)]}
    out = []
    for _ in range(rng.randint(4, 7)):
        s = rng.choice(sorted(sessions))
        for _ in range(rng.randint(0, 2)):
            sessions[s] = sessions[s] + [f"{s}{len(sessions[s])}"]
        out.append((s, list(sessions[s])))
    return out


def test_clairvoyant_bound_against_exhaustive_search():
    rng = random.Random(7)
    gaps, equal, trials = [], 0, 0
    while trials < 60:
        chains = random_chains(rng)
        longest = max(len(c) for _, c in chains)
        capacity = rng.randint(longest + 1, max(longest + 1, 8))
        trace = sequential_trace(chains)
        opt = replay(trace, "opt", ReplayConfig(capacity_blocks=capacity, check=True)).hit_tokens
        best = exhaustive_best_hits([c for _, c in chains], capacity)
        assert opt <= best  # the simulator's pool and the search agree on what is possible
        gaps.append(best - opt)
        equal += opt == best
        trials += 1
    # Belady (farthest next use, deepest block first) matched the exhaustive optimum on every tiny trace tried
    # (300 of 300 with this generator); a gap here means the bound is no longer the optimum
    assert equal == trials, (equal, trials, gaps)


def test_lru_hand_worked():
    # capacity 4: a=[sys,a1], b=[sys,b1,b2] fill it (4 blocks: sys a1 b1 b2, one partial at a time), then a returns:
    # its blocks are still cached (nothing was evicted) -> 2 hits; then c=[sys,c1,c2] must evict 2 of the LRU order
    # (b1, b2 were freed before a's turn touched sys and a1), so b's next turn hits only sys.
    chains = [("a", ["sys", "a1"]), ("b", ["sys", "b1", "b2"]), ("a", ["sys", "a1"]), ("c", ["sys", "c1", "c2"]),
              ("b", ["sys", "b1", "b2"])]
    res = replay(sequential_trace(chains), "lru", ReplayConfig(capacity_blocks=5, check=True))
    assert res.hit_tokens == (0 + 1 + 2 + 1 + 1) * BS
    best = exhaustive_best_hits([c for _, c in chains], 5)
    assert best >= res.hit_tokens


@pytest.mark.parametrize("policy", ["lru", "kvsched", "opt"])
def test_nothing_leaks_when_the_trace_ends(policy):
    rng = random.Random(3)
    trace = sequential_trace(random_chains(rng))
    res = replay(trace, policy, ReplayConfig(capacity_blocks=9, check=True))
    assert res.requests == len(trace) and res.prompt_tokens_total == sum(int(p) for p in trace.prompt_tokens)
