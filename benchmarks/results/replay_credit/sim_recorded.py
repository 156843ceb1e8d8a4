import sys
from dataclasses import replace
from pathlib import Path

from kvsched.core.config import RetentionConfig
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace

tr = Trace.load(Path(sys.argv[1]))
print(len(tr), tr.block_size, {k: v for k, v in tr.meta.items() if "capac" in k or "bytes" in k})
cap = int(tr.meta["capacity_blocks"])
cfg = ReplayConfig(capacity_blocks=cap, retention=RetentionConfig.from_env())
for name, c in (
    ("lru", cfg),
    ("kvsched", cfg),
    ("kvsched+tier", replace(cfg, tier_bytes=86952800, tier_block_bytes=16400)),
):
    r = replay(tr, "lru" if name == "lru" else "kvsched", c)
    print(
        name,
        "prefill",
        r.prefill_tokens_computed,
        "hits",
        r.hit_tokens,
        "restored",
        r.restored_tokens,
        {k: r.policy_stats.get(k) for k in ("retained_hit_tokens", "branches", "pins")},
    )
