"""Per-turn retained credit, the engine's against the simulator's at its own timing and at the engine's (stop 55).

    python compare.py SECONDS RUN_DIR      (PYTHONPATH at the tree; the window and pool of `bench replay --pressure 3`)

RUN_DIR/credit.jsonl is the engine's per-request log written under KVSCHED_SCRATCH_CREDIT=FILE by a tree patched with
scratch_credit_log.diff (a scratch logging patch, not shipped), from `tools/replay_one_side.py SECONDS 3`."""

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvsched.bench import trace_engine as te
from kvsched.core import retention as R
from kvsched.core.config import RetentionConfig
from kvsched.sim import policies as P
from kvsched.sim.replay import ReplayConfig, replay

secs, run = float(sys.argv[1]), Path(sys.argv[2])
tier = (86952800, 16400)
TRACE = Path.home() / ".cache/kvsched/traces/mooncake/conversation.kvsched.jsonl"
args = argparse.Namespace(trace=TRACE, start_s=0.0, seconds=secs, time_scale=1.0, pressure=3.0, sides="kvsched",
                          max_output_tokens=64, model_size="test", out=None)
s = te.prepare(args)
reqs = s.plan.requests
assert not s.plan.dropped_long
rows = [json.loads(line) for line in open(run / "credit.jsonl")]
arr = {r["req"]: r for r in rows if r["op"] == "arrive"}
fin = {r["req"]: r for r in rows if r["op"] == "finish"}
st = {r["req"]: r for r in rows if r["op"] == "start" and r["req"] in arr}
by_sid = defaultdict(list)
for q, r in st.items():
    by_sid[r["sid"]].append(q)
plan_sid = defaultdict(list)
for i, r in enumerate(reqs):
    plan_sid[r.session].append(i)
eng = {}
for sid, qs in by_sid.items():
    if sid not in plan_sid:
        print("not in plan", sid, len(qs))
        continue
    qs.sort(key=lambda q: arr[q]["t"])
    idx = plan_sid[sid]
    assert len(idx) == len(qs), (sid, len(idx), len(qs))
    for i, q in zip(idx, qs, strict=False):
        assert arr[q]["n"] == len(reqs[i].prompt), (sid, i)
        eng[i] = {**st[q], "dur": fin[q]["t"] - arr[q]["t"]}
print("engine turns", len(eng), "of", len(reqs))
cur, credit, onpin = {}, {}, {}
o_k = P.KVSchedPolicy.on_admitted


def kadm(self, i, ids, hb):
    cur["i"] = i
    return o_k(self, i, ids, hb)


P.KVSchedPolicy.on_admitted = kadm
o_ts = R.RetentionPolicy.turn_started


def ts(self, key, cached):
    rec = self.sessions.get(key)
    if rec is not None and rec.pinned_blocks > 0 and cached > 0:
        onpin[cur["i"]] = (rec.pinned_tokens, rec.prefetched_tokens, cached)
    c0 = self.counters["retained_hit_tokens"]
    d = o_ts(self, key, cached)
    if self.counters["retained_hit_tokens"] > c0:
        credit[cur["i"]] = self.counters["retained_hit_tokens"] - c0
    return d


R.RetentionPolicy.turn_started = ts
cfg = replace(
    ReplayConfig(capacity_blocks=s.num_blocks - 1, retention=RetentionConfig.from_env()),
    tier_bytes=tier[0],
    tier_block_bytes=tier[1],
)
k = 32 / s.trace.block_size
out = {}
durs = np.array([eng[i]["dur"] for i in range(len(reqs))])
print(f"engine hold s: mean {durs.mean():.2f} p50 {np.median(durs):.2f} p95 {np.percentile(durs, 95):.2f}")
for name, trace, c in (
    ("sim, its timing", s.trace, cfg),
    ("sim, engine timing", replace(s.trace, duration_s=durs), replace(cfg, prefill_tps=math.inf)),
):
    credit.clear()
    onpin.clear()
    r = replay(trace, "kvsched", c)
    out[name] = (dict(credit), dict(onpin))
    print(
        f"{name}: credited turns {len(credit)}, credit {sum(credit.values())} trace tokens = "
        f"{sum(credit.values()) * k:.0f} engine tokens; turns on a pin {len(onpin)}; "
        f"prefill {r.prefill_tokens_computed}"
    )
ec = {i: e["credit"] for i, e in eng.items() if e["credit"] > 0}
ep = {i for i, e in eng.items() if e["pinned_blocks"] > 0 and e["cached"] > 0}
print(
    f"engine: credited turns {len(ec)}, credit {sum(ec.values())} engine tokens; turns on a pin {len(ep)}, of which "
    f"credit 0: {len(ep - set(ec))} (pin wholly prefetched: "
    f"{sum(1 for i in ep - set(ec) if eng[i]['pinned'] == eng[i]['prefetched'])})"
)
for name, (sc, _sp) in out.items():
    both = set(ec) & set(sc)
    print(
        f"  vs {name}: both credit {len(both)} turns (engine {sum(ec[i] for i in both)}, sim "
        f"{sum(sc[i] for i in both) * k:.0f} engine tokens); engine only {len(set(ec) - set(sc))} turns "
        f"({sum(ec[i] for i in set(ec) - set(sc))}); sim only {len(set(sc) - set(ec))} turns "
        f"({sum(sc[i] for i in set(sc) - set(ec)) * k:.0f})"
    )
sc = out["sim, its timing"][0]
print(
    "engine-credited turns, detail (i, session, engine credit, cached, pinned, prefetched; "
    "sim credit its/engine timing)"
)
st_ = out["sim, engine timing"][0]
for i in sorted(set(ec) | set(sc) | set(st_)):
    e = eng[i]
    print(
        i,
        reqs[i].session,
        ec.get(i, 0),
        e["cached"],
        e["pinned"],
        e["prefetched"],
        "|",
        round(sc.get(i, 0) * k),
        round(st_.get(i, 0) * k),
        "dur {:.2f}".format(e["dur"]),
    )
# LRU at the engine's timing: of the credited tokens (sim at engine timing), how many LRU hit on that turn too
hits = {}
o_s = P.SimPolicy.on_admitted


def sadm(self, i, ids, hb):
    hits[i] = int(hb)
    return o_s(self, i, ids, hb)


P.SimPolicy.on_admitted = sadm
lru_t = replay(
    replace(s.trace, duration_s=durs), "lru", replace(cfg, tier_bytes=0, tier_block_bytes=0, prefill_tps=math.inf)
)
lru_s = dict(hits)
hits.clear()
bs = s.trace.block_size
for name, (sc, _) in out.items():
    lh = lru_s if "engine" in name else None
    if lh is None:
        hits.clear()
        replay(s.trace, "lru", replace(cfg, tier_bytes=0, tier_block_bytes=0))
        lh = dict(hits)
    also = sum(min(c // bs, lh.get(i, 0)) for i, c in sc.items())
    print(f"{name}: credited {sum(sc.values()) // bs} blocks, LRU at that timing hit {also} of them on the same turns")
also = sum(min(c // 32, lru_s.get(i, 0)) for i, c in ec.items())
print(
    f"engine: credited {sum(ec.values()) // 32} blocks; LRU in the simulator at the engine's timing hit {also} of them"
)
