"""`kvsched bench sched`: per-step cost of vLLM's scheduler vs kvsched's, same synthetic load, no model execution.

256 sessions run concurrently on the tiny model's config (vLLM's real scheduler, KV cache manager and block pool;
see adapters/vllm/harness.py). When a turn finishes, the session's next turn arrives with its history plus a tool
result, so pins, hits, finishes and new turns all happen at steady state. We time `schedule()` +
`update_from_output()` per step; the fake model runner is outside the timed region. Rounds alternate stock/kvsched.
As in vLLM's engine core (`EngineCore.__init__` calls `freeze_gc_heap()`), the start-up heap -- above all the block
pool's KVCacheBlock objects -- is frozen out of the garbage collector before the timed steps, for both schedulers;
without that, full collections walk every block and their cost lands on whichever scheduler allocates more.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvsched.bench.common import provenance, table, write_json

CONCURRENCY = 256


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("sched", help="scheduler step overhead: stock vs kvsched")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=None, help="alternating stock/kvsched rounds")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)


def _load_round(scheduler_cls: str, model_dir: Path, steps: int, seed: int) -> list[float]:
    from vllm.v1.outputs import ModelRunnerOutput

    from kvsched.adapters.vllm.harness import FAKE_TOKEN, HarnessConfig, RequestFactory, build_scheduler

    cfg = HarnessConfig(model_dir=model_dir, num_blocks=120_000, block_size=16, max_num_seqs=CONCURRENCY,
                        max_num_batched_tokens=16_384, max_model_len=8192)
    from vllm.utils.gc_utils import freeze_gc_heap

    s = build_scheduler(scheduler_cls, cfg)
    freeze_gc_heap()  # as EngineCore does after start-up; undone at the end of the round
    f = RequestFactory(cfg.block_size)
    rng = random.Random(seed)
    history: dict[str, list[int]] = {}
    owner: dict[str, str] = {}

    def new_turn(sid: str) -> None:
        h = history.setdefault(sid, [1, 2, 3] * 60)  # shared system prompt
        h.extend(rng.randrange(10, 2000) for _ in range(rng.randint(40, 120)))  # tool result
        if len(h) > 6000:
            h[:] = h[:180]  # the session starts over, as if compacted
        req = f.make(h, rng.randint(8, 32), session_id=sid, xargs={"agent_role": rng.choice(["worker", "orch"])})
        owner[req.request_id] = sid
        s.add_request(req)

    for i in range(CONCURRENCY):
        new_turn(f"s{i}")
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            sampled.append([] if s.requests[rid].is_prefill_chunk else [FAKE_TOKEN])
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        t2 = time.perf_counter()
        engine_out = s.update_from_output(out, mro)
        t3 = time.perf_counter()
        times.append((t1 - t0) + (t3 - t2))
        for outputs in engine_out.values():
            for o in outputs.outputs:
                if o.finish_reason is not None and o.request_id in owner:
                    new_turn(owner.pop(o.request_id))
    gc.unfreeze()
    return times


def run(args: argparse.Namespace) -> int:
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER, STOCK_SCHEDULER
    from kvsched.tiny_model import ensure_tiny_model

    steps = args.steps or (300 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 4)
    model_dir = ensure_tiny_model("test")
    samples: dict[str, list[float]] = {"stock": [], "kvsched": []}
    _load_round(STOCK_SCHEDULER, model_dir, 20, seed=99)  # warm imports and caches for both
    for r in range(rounds):
        order = [("stock", STOCK_SCHEDULER), ("kvsched", KVSCHED_SCHEDULER)]
        for name, cls in order if r % 2 == 0 else order[::-1]:
            samples[name].extend(_load_round(cls, model_dir, steps, seed=r))
    result: dict[str, Any] = {
        name: {"step_us": statistics.fmean(ts) * 1e6, "step_us_median": statistics.median(ts) * 1e6,
               "steps": len(ts)}
        for name, ts in samples.items()
    }
    result["ratio"] = result["kvsched"]["step_us"] / result["stock"]["step_us"]
    result["config"] = {"concurrency": CONCURRENCY, "steps_per_round": steps, "rounds": rounds,
                        "provenance": provenance()}
    print(table([[n, result[n]["step_us"], result[n]["step_us_median"], result[n]["steps"]]
                 for n in ("stock", "kvsched")], ["scheduler", "mean step us", "median step us", "steps"]))
    print(f"kvsched/stock mean step time: {result['ratio']:.3f} (gate: <= 1.10)")
    write_json(args.out, result)
    return 0
