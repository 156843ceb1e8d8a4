"""(Adversarial review, stop 37: a reviewer's generators, kept to reproduce the runs where kvsched computed more
prefill than LRU; see the closing note of that stop. `python tools/adversarial/gen.py a2_liar /tmp/a2_liar.jsonl`, then
`python tools/adversarial/grid.py /tmp/a2_liar.jsonl`.)
Adversarial trace generators for kvsched simulate (JSONL v1, block_size 16).
usage: python gen.py SHAPE OUT [seed]
Each session is a list of turns; a turn's prompt = the session's history (prev prompt + prev output blocks) + new
user blocks; output_tokens = 16*out_blocks + 1 so the output completes whole blocks (the last sampled token has no KV:
`kvsched.sim.trace.computed_blocks`; 16*out_blocks until the loader refused the extra block). Block ids: global counter
(chained by construction: an id only ever appears at one position); shared prefix ids 0..k-1 at positions 0..k-1."""
import json, random, sys

BS = 16

class G:
    def __init__(self, seed, shared=0):
        self.rng = random.Random(seed)
        self.next_id = shared
        self.shared = list(range(shared))
        self.reqs = []
    def new(self, n):
        ids = list(range(self.next_id, self.next_id + n)); self.next_id += n; return ids
    def session(self, sid, times, first_blocks, add_blocks, out_blocks=1, role=None, ttl=None, end_last=False,
                shared=True, branch_every=False, duration=None):
        hist = (self.shared[:] if shared else [])
        for k, t in enumerate(times):
            if branch_every:   # each request: shared prefix + unique suffix (a new branch every time)
                prompt = (self.shared[:] if shared else []) + self.new(first_blocks)
            else:
                prompt = hist + self.new(first_blocks if k == 0 else add_blocks)
            out = self.new(out_blocks)
            r = {"t": round(t, 6), "session": sid, "prompt_tokens": len(prompt) * BS,
                 "output_tokens": out_blocks * BS + (out_blocks > 0), "blocks": prompt + out}
            if role: r["role"] = role
            if duration is not None: r["duration_s"] = duration
            if ttl is not None: r["ttl_s"] = ttl
            if end_last and k == len(times) - 1: r["end"] = True
            self.reqs.append(r)
            hist = prompt + out
    def write(self, path, meta):
        self.reqs.sort(key=lambda r: r["t"])
        prev = {}
        with open(path, "w") as f:
            f.write(json.dumps({"kvsched_trace": 1, "block_size": BS, "meta": meta}) + "\n")
            for r in self.reqs:
                full = r["blocks"]; p = prev.get(r["session"], [])
                n = 0
                while n < min(len(p), len(full)) and p[n] == full[n]: n += 1
                r = dict(r); r["reuse"] = n; r["blocks"] = full[n:]
                prev[r["session"]] = full
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        return len(self.reqs)

def times_from(rng, start, gaps):
    t = start; out = [t]
    for g in gaps: t += g; out.append(t)
    return out

def returners(g, rng, n, dur, gap_lo, gap_hi, first=30, add=3, role="worker", prefix="r", ttl=None, t0=0.0):
    for i in range(n):
        t = t0 + rng.uniform(0, gap_hi); ts = []
        while t < dur: ts.append(t); t += rng.uniform(gap_lo, gap_hi)
        if ts: g.session(f"{prefix}{i}", ts, first, add, role=role, ttl=ttl)

def shape(name, seed):
    rng = random.Random(seed)
    if name == "a_burst_silent":      # many quick turns then silence, + steady returners at 10-20 s
        g = G(seed); dur = 600
        t = 0; i = 0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(5)]), 40, 4)
            t += rng.expovariate(1 / 1.5); i += 1
        returners(g, rng, 60, dur, 10, 20)
    elif name == "a_burst_silent_pure":   # only bursts then silence
        g = G(seed); dur = 900; t = 0; i = 0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(7)]), 40, 4)
            t += rng.expovariate(1 / 0.6); i += 1
    elif name == "a_burst_liar_big":    # (a)+(d)+(g): big orchestrator bursts then silence, small worker returners
        g = G(seed); dur = 600; t = 0; i = 0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(4)]), 600, 4, role="orchestrator")
            t += rng.expovariate(1 / 4.0); i += 1
        returners(g, rng, 60, dur, 10, 20, first=40)
    elif name.startswith("a2_"):   # stationary: big bursty sessions that die + a fixed-size population of returners
        # a2_liar: D role orchestrator; a2_honest: D role worker; a2_small: D same size as R (no size effect)
        g = G(seed); dur = 900; t = 0; i = 0
        drole = "orchestrator" if "liar" in name else "worker"
        dsize = 40 if "small" in name else 600
        drate = 0.25 if "small" not in name else 1.0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(4)]), dsize, 4, role=drole)
            t += rng.expovariate(drate); i += 1
        k = 0
        for slot in range(60):
            t = rng.uniform(0, 20)
            while t < dur:
                ts = times_from(rng, t, [rng.uniform(10, 20) for _ in range(7)])
                g.session(f"r{k}", [x for x in ts if x < dur], 40, 3, role="worker"); k += 1
                t = ts[-1] + rng.uniform(10, 20)
    elif name in ("b_phase_fast_then_dead", "b_phase_dead_then_fast"):
        g = G(seed); dur = 1200; half = dur / 2
        fast_first = name == "b_phase_fast_then_dead"
        # phase 1 (or 2): sessions return every 5-25 s; other phase: one-shot/no-return sessions + LRU-friendly returners at 40-60 s
        t = 0; i = 0
        while t < dur:
            in_fast = (t < half) == fast_first
            if in_fast:
                n = rng.randint(6, 12); gaps = [rng.uniform(5, 25) for _ in range(n)]
                ts = [x for x in times_from(rng, t, gaps) if (x < half) == fast_first or x == t]
                g.session(f"f{i}", ts, 40, 4)
                t += rng.expovariate(1 / 3.0)
            else:
                g.session(f"s{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(3)]), 40, 4)
                t += rng.expovariate(1 / 1.5)
            i += 1
        # slow returners in the non-fast phase
        lo, hi = (half, dur) if fast_first else (0, half)
        returners(g, rng, 40, hi, 35, 55, t0=lo, prefix="slow")
    elif name == "c_period_beyond_ttl":   # periodic return, period just beyond TTL (env TTL set by runner: period = 1.1*TTL)
        ttl = float(__import__("os").environ.get("GEN_TTL", "30"))
        g = G(seed); dur = 1200
        for i in range(150):
            t0 = rng.uniform(0, ttl * 1.1)
            ts = [t0 + k * ttl * 1.1 + rng.uniform(-0.2, 0.2) for k in range(int(dur / (ttl * 1.1)))]
            g.session(f"p{i}", ts, 30, 2)
        # plus bursty fillers that pin memory
        t = 0; i = 0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(3)]), 30, 3)
            t += rng.expovariate(1 / 1.0); i += 1
    elif name == "d_huge_plus_small":    # one huge session (returns every 40 s) + many small bursty ones
        g = G(seed); dur = 900
        g.session("huge", [5 + 40 * k for k in range(int(dur / 40))], 1500, 10)
        t = 0; i = 0
        while t < dur:
            g.session(f"s{i}", times_from(rng, t, [rng.uniform(2, 8) for _ in range(rng.randint(2, 6))]), 20, 3)
            t += rng.expovariate(1 / 1.0); i += 1
    elif name == "d_huge_dead_plus_small":  # huge sessions that never come back after 3 quick turns; small returners
        g = G(seed); dur = 900; t = 0; i = 0
        while t < dur:
            g.session(f"h{i}", times_from(rng, t, [1.0, 1.0]), 1500, 4)
            t += 15; i += 1
        returners(g, rng, 80, dur, 8, 20, first=20, add=2)
    elif name == "e_shared_prefix":      # heavy common system prompt, one-shot-ish sessions
        g = G(seed, shared=200); dur = 900; t = 0; i = 0
        while t < dur:
            n = rng.choice([0, 0, 0, 1, 2])
            g.session(f"e{i}", times_from(rng, t, [rng.uniform(20, 200) for _ in range(n)]), 20, 2)
            t += rng.expovariate(1 / 0.5); i += 1
    elif name == "e_shared_branch":      # shared 60-block prefix; each request of a session is a new branch (unique suffix)
        g = G(seed, shared=60); dur = 900
        for i in range(40):
            t = rng.uniform(0, 5); ts = []
            while t < dur: ts.append(t); t += rng.uniform(3, 12)
            g.session(f"b{i}", ts, 30, 0, branch_every=True)
        returners(g, rng, 40, dur, 10, 40, first=30)
    elif name == "f_return_at_release":  # duration_s fixes each turn's finish; next arrival = finish + TTL + eps
        import os
        ttl = float(os.environ.get("GEN_TTL", "30")); eps = float(os.environ.get("GEN_EPS", "0.01"))
        g = G(seed); dur = 1200
        for i in range(120):
            t = rng.uniform(0, ttl); ts = []
            while t < dur: ts.append(t); t += 0.5 + ttl + eps
            g.session(f"f{i}", ts, 30, 2, duration=0.5)
        t = 0; i = 0
        while t < dur:
            g.session(f"d{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(3)]), 30, 3, duration=0.5)
            t += rng.expovariate(1 / 1.0); i += 1
    elif name == "g_liar_orchestrator":  # role orchestrator, long ttl hint, never returns after a short burst
        g = G(seed); dur = 900; t = 0; i = 0
        ttl = float(__import__("os").environ.get("GEN_HINT_TTL", "600"))
        while t < dur:
            g.session(f"o{i}", times_from(rng, t, [rng.uniform(0.5, 1.5) for _ in range(3)]), 80, 4,
                      role="orchestrator", ttl=ttl)
            t += rng.expovariate(1 / 2.0); i += 1
        returners(g, rng, 60, dur, 10, 25, first=30)
    elif name == "h_mooncake_like":      # 70% single-turn, heavy-tailed gaps (lognormal median ~120 s), small
        g = G(seed, shared=4); dur = 1800; t = 0; i = 0
        import math
        while t < dur:
            if rng.random() < 0.7: ts = [t]
            else:
                n = 1 + min(int(rng.paretovariate(1.2)), 15)
                ts = times_from(rng, t, [rng.lognormvariate(math.log(120), 1.2) for _ in range(n)])
            g.session(f"m{i}", [x for x in ts if x < dur * 1.5], rng.randint(20, 200), rng.randint(5, 40),
                      out_blocks=rng.randint(1, 10))
            t += rng.expovariate(1 / 0.6); i += 1
    else:
        raise SystemExit(f"unknown shape {name}")
    return g

if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    g = shape(name, seed)
    n = g.write(out, {"source": f"rev_adv gen.py {name} seed {seed}"})
    print(name, n, "requests")
