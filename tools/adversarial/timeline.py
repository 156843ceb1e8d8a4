"""Where does kvsched's extra prefill over LRU accrue? Replays a trace under LRU and kvsched (the `kvsched simulate`
configuration: live pressure, the KVSCHED_* environment) and prints, per slice of the trace's requests, the prefill
each side computed and kvsched's minus LRU's, with the pin ledger's state at the slice's end.

usage: python tools/adversarial/timeline.py TRACE PRESSURE [SLICES]   (PYTHONPATH=the worktree)
(Adversarial review, stop 52.)"""
from __future__ import annotations

import math
import sys

import numpy as np

from kvsched.core.config import RetentionConfig
from kvsched.sim import replay as rp
from kvsched.sim.policies import KVSchedPolicy
from kvsched.sim.trace import Trace


def run(trace: Trace, policy: str, cfg: rp.ReplayConfig) -> tuple[np.ndarray, list[tuple[int, dict]]]:
    """Per request: prefill tokens computed (by arrival index); and kvsched's ledger state at each admission."""
    hits = np.zeros(len(trace), dtype=np.int64)
    states: list[tuple[int, dict]] = []
    make = rp.make_policy

    def wrapped(name, tr, pool, c, clock):  # type: ignore[no-untyped-def]
        pol = make(name, tr, pool, c, clock)
        inner = pol.on_admitted

        def on_admitted(i, prompt_ids, hit):  # type: ignore[no-untyped-def]
            hits[i] = hit
            inner(i, prompt_ids, hit)
            if isinstance(pol, KVSchedPolicy):
                led = pol.policy.payback.ledger
                states.append((i, {"t": clock.now, "pinned": pol.pin_pool.pinned,
                                   "cap": None if led is None else led.cap,
                                   "z": None if led is None else led.evidence,
                                   "probes": None if led is None else led.probes}))
        pol.on_admitted = on_admitted  # type: ignore[method-assign]
        return pol

    rp.make_policy = wrapped
    try:
        rp.replay(trace, policy, cfg)
    finally:
        rp.make_policy = make
    return trace.prompt_tokens.astype(np.int64) - hits * trace.block_size, states


def main() -> None:
    path, pressure = sys.argv[1], float(sys.argv[2])
    slices = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    trace = Trace.load(path)
    cap = max(math.ceil(trace.peak_live_blocks() / pressure), 1)
    cfg = rp.ReplayConfig(capacity_blocks=cap, bytes_per_token=65536.0, retention=RetentionConfig.from_env())
    lru, _ = run(trace, "lru", cfg)
    kv, states = run(trace, "kvsched", cfg)
    state = dict(states)
    print(f"{path} pressure {pressure} pool {cap}: lru {lru.sum()} kvsched {kv.sum()} ratio {kv.sum() / lru.sum():.4f}")
    print("req_from  t_end  lru  kvsched  diff  cum_diff  pinned  cap  z  probes")
    n = len(trace)
    cum = 0

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for k in range(slices):
        a, b = n * k // slices, n * (k + 1) // slices
        d = int(kv[a:b].sum() - lru[a:b].sum())
        cum += d
        st = next((state[j] for j in range(b - 1, a - 1, -1) if j in state), {})
        print(f"{a:6d} {float(trace.t[b - 1]):7.1f} {int(lru[a:b].sum()):9d} {int(kv[a:b].sum()):9d} {d:+8d} "
              f"{cum:+9d} {st.get('pinned', '-')!s:>5} {fmt(st.get('cap'))} {fmt(st.get('z'))} {st.get('probes')}")


if __name__ == "__main__":
    main()
