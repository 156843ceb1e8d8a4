import sys
from dataclasses import replace
from pathlib import Path

from kvsched.bench.trace_prompts import window
from kvsched.core.config import RetentionConfig
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace

secs, cap = float(sys.argv[1]), int(sys.argv[2])
tr = window(Trace.load(Path.home() / ".cache/kvsched/traces/mooncake/conversation.kvsched.jsonl"), 0.0, secs)
for tps, tpot in ((10_000, 0.02), (10_000, 0.01), (30_000, 0.005), (60_000, 0.002), (100_000, 0.001)):
    base = ReplayConfig(capacity_blocks=cap, retention=RetentionConfig.from_env(), prefill_tps=tps, tpot_s=tpot)
    lru = replay(tr, "lru", base)
    for name, cfg in (("no tier", base), ("tier", replace(base, tier_bytes=86952800, tier_block_bytes=16400))):
        r = replay(tr, "kvsched", cfg)
        s = r.policy_stats
        print(
            tps,
            tpot,
            name,
            "ret",
            s.get("retained_hit_tokens"),
            "eng~",
            s.get("retained_hit_tokens", 0) // 16,
            "over lru %.4f" % (r.prefill_tokens_computed / lru.prefill_tokens_computed),
            "rel pressure",
            s.get("released_pressure"),
            "ttl",
            s.get("released_ttl"),
            "pins",
            s.get("pins"),
        )
