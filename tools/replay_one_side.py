"""One kvsched side of `kvsched bench replay`, as `run_benchmark` runs it, with every kvsched_* counter's change
(the bench keeps a few): for comparing source trees on one window (PYTHONPATH picks the tree; KVSCHED_TRACE=FILE
gives the decision trace). Start it under `flock /tmp/kv/heavy.lock` on a shared machine.

    python tools/replay_one_side.py SECONDS PRESSURE OUT.json [TRACE]

TRACE defaults to the cached Mooncake conversation trace; the window starts at its first arrival, sent at its own
gaps, with bench replay's defaults (64 output tokens, the test model, the default FP8 tier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsched.bench import trace_engine as te
from kvsched.serving import ServerSpec, VllmServer, start_all
from kvsched.tiny_model import ensure_tiny_model

CONVERSATION = Path.home() / ".cache/kvsched/traces/mooncake/conversation.kvsched.jsonl"


def main(argv: list[str]) -> None:
    seconds, pressure, out = float(argv[0]), float(argv[1]), Path(argv[2])
    trace = Path(argv[3]) if len(argv) > 3 else CONVERSATION
    args = argparse.Namespace(trace=trace, start_s=0.0, seconds=seconds, time_scale=1.0, pressure=pressure,
                              sides="kvsched", max_output_tokens=64, model_size="test", out=None)
    setup = te.prepare(args)
    server = VllmServer(ServerSpec(model=ensure_tiny_model("test"), scheduler="kvsched",
                                   max_model_len=setup.max_model_len, block_size=te.BLOCK_TOKENS,
                                   num_blocks=setup.num_blocks, served_model_name=te.MODEL, extra_args=[]))
    try:
        start_all([server])
        te.warm_up(server.url, setup.vocab_size)
        before = server.metrics()
        outcomes, wall, late = te.drive(server.url, setup.plan.requests)
        after = server.metrics()
    finally:
        server.stop()
    planned = sum(len(r.prompt) for r in setup.plan.requests)
    result = {"trace": trace.name, "seconds": seconds, "pressure": pressure, "num_blocks": setup.num_blocks,
              "measured": te.measured(outcomes, before, after, wall, late, planned),
              "kvsched": {k: after[k] - before.get(k, 0.0) for k in sorted(after) if k.startswith("kvsched_")}}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["measured"], indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
