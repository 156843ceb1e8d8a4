"""For the autoscaling test on a real Ray cluster (imported by Ray's workers by name): a stand-in engine replica whose
vLLM "served" first tokens at a fixed pace, and the kvsched policy writing each decision down for the test to read.

`TTFTStandInEngine`: every stats poll, rank 0 adds 90 first tokens under 0.1 s and 10 at 5 s (its own P95: 3.75 s),
any other rank 3000 under 0.1 s; its `EngineReplica.record_autoscaling_stats` reports them as kvsched's does (the
stats are parsed from vLLM's exposition format). The pool merges each replica's rate of first tokens over its own
window: rank 0's slow ones stay under 5% of the pool's (its P95 under 0.1 s) unless rank 0 is polled 30 times as
often per second as another rank. With 300, three times as often did it: the P95 held only while the replicas'
reports kept about the same pace, which a loaded host need not give them."""

from __future__ import annotations

import json
from typing import Any

from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy
from kvsched.adapters.ray.engine import EngineReplica
from kvsched.adapters.ray.stats import ReplicaStats
from kvsched.core.ttft_histogram import bucket_key
from tests.ray.standin_engine import StandInEngine

BOUNDS = ("0.1", "0.5", "1.0", "2.5", "5.0", "+Inf")


def ttft_text(fast: int, slow: int) -> str:
    lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for b in BOUNDS:
        n = fast + (slow if b in ("5.0", "+Inf") else 0)
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{b}",model_name="m"}} {n}')
    return "\n".join(lines) + "\n"


class TTFTStandInEngine(StandInEngine):
    def __init__(self, pool: str, engine: dict[str, Any]) -> None:
        super().__init__(pool, engine)
        self.stats = ReplicaStats(self.server.base)
        self.polls = 0

    async def _fresh_stats(self, max_age_s: float = 1.0) -> dict[str, Any]:
        self.polls += 1
        fast, slow = (90, 10) if self.slot == 0 else (3000, 0)
        self.stats.update(ttft_text(fast * self.polls, slow * self.polls), None)
        return self.stats.snapshot()

    record_autoscaling_stats = EngineReplica.record_autoscaling_stats  # kvsched's own (StandInEngine fixes it)


def window_first_tokens(ctx: Any) -> dict[str, list[float]]:
    """Per running replica (its unique id) with TTFT buckets in Ray's window: `[scrapes, first tokens added]`, the
    latest `+Inf` count less the earliest (the stand-ins' counts never reset): what the test sees each replica bring
    to the decision's window, read from Ray's raw points, not from the policy's arithmetic."""
    out = {}
    running = set(ctx.running_replicas)
    for replica, points in ((ctx.raw_metrics or {}).get(bucket_key(float("inf"))) or {}).items():
        top = [float(p.value) for p in sorted(points or (), key=lambda p: float(p.timestamp))]
        if replica in running and top:
            out[str(getattr(replica, "unique_id", replica))] = [float(len(top)), top[-1] - top[0]]
    return out


class RecordingPolicy(QueueTTFTPolicy):
    """QueueTTFTPolicy appending `{"replicas", "reason", "running", "windows"}` to `report_path` (a JSON line) on every
    tick (`windows`: `window_first_tokens`)."""

    def __init__(self, report_path: str, **targets: Any) -> None:
        super().__init__(**targets)
        self.report_path = report_path

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        n, state = super().__call__(ctx)
        with open(self.report_path, "a") as f:
            f.write(json.dumps({"replicas": n, "reason": state.get("kvsched_reason"),
                                "running": len(ctx.running_replicas), "windows": window_first_tokens(ctx)}) + "\n")
        return n, state
