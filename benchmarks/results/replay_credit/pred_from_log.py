"""bench replay's `predicted()` (this tree) on the 600-s window with the scratch run's per-request engine hold times."""

import argparse
import json
import sys
from pathlib import Path

from kvsched.bench import trace_engine as te

run = Path(sys.argv[1])
TRACE = Path.home() / ".cache/kvsched/traces/mooncake/conversation.kvsched.jsonl"
args = argparse.Namespace(trace=TRACE, start_s=0.0, seconds=600.0, time_scale=1.0, pressure=3.0, sides="kvsched",
                          max_output_tokens=64, model_size="test", out=None)
s = te.prepare(args)
rows = [json.loads(line) for line in open(run / "credit.jsonl")]
arr = {r["req"]: r for r in rows if r["op"] == "arrive"}
fin = {r["req"]: r for r in rows if r["op"] == "finish"}
sid = {r["req"]: r["sid"] for r in rows if r["op"] == "start"}
per = {}
for q in sorted(arr, key=lambda q: arr[q]["t"]):
    per.setdefault(sid.get(q), []).append(fin[q]["t"] - arr[q]["t"])
nxt = {k: iter(v) for k, v in per.items()}
durs = [next(nxt[r.session]) for r in s.plan.requests]
print(
    json.dumps(te.predicted(s.trace, s.num_blocks - 1, (86952800, 16400), {"kvsched": durs}, te.BLOCK_TOKENS), indent=1)
)
