"""The `recorder` side of `kvsched bench agents`: what an operator's recording of their own traffic predicts, checked
against what the engine then measures.

The side is kvsched's scheduler holding no pin (every TTL capped at 0, the tier off), which serves the workload as
stock vLLM does (tests/adapters/vllm/test_trace_recorder.py: hit for hit) while the engine records it
(`KVSCHED_RECORD_TRACE`, docs/trace_schema.md). The recording is replayed in the simulator at the engine's own pool
(the header's `capacity_blocks`) under LRU, kvsched's policy (the engine's `KVSCHED_*` settings) and OPT. Its LRU is
the simulator's model checked against the recorder's (and stock's) measured prefill, and its kvsched a prediction
checked against the `kvsched-no-tier` side's measured prefill, which ran the same workload with pins on. When the
`kvsched` side (its FP8 tier on) runs too, the recording is replayed once more with a tier of that side's measured
capacity (in the recording's own tier block size: the header's `fp8_tier_block_bytes`), its prediction checked
against that side: what an operator's recording says the tier would save.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kvsched.adapters.vllm.trace_recorder import ENV_RECORD
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, read_jsonl

RECORDER_SIDE = "recorder"
PREDICTED = ("lru", "kvsched", "opt")
WITH_TIER = "kvsched+tier"  # kvsched's policy with the FP8 tier, predicted when the tier side ran
# measured side -> the policy whose prediction it checks
CHECKS = {RECORDER_SIDE: "lru", "stock": "lru", "kvsched-no-tier": "kvsched", "kvsched": WITH_TIER}


def recorder_env(path: Path) -> dict[str, str]:
    """The recorder's server environment: no pin (every TTL capped at 0) and the recording to `path`."""
    return {"KVSCHED_MAX_TTL_S": "0", ENV_RECORD: str(path)}


def recorded_lines(path: Path) -> int:
    """Requests recorded so far (the side's run replays only those recorded after this count)."""
    return sum(1 for _ in read_jsonl(path)[1]) if path.exists() else 0


def replay_recording(path: Path, skip: int, prefill_tok_s: float, tpot_s: float,
                     bytes_per_token: float) -> dict[str, Any]:
    """Prefill tokens each policy computes on the recording's requests after the first `skip` (the warm-up and
    throughput probes before the run), at the pool the engine reported in the recording's header."""
    trace, cfg = _recorded(path, skip, prefill_tok_s, tpot_s, bytes_per_token)
    out: dict[str, Any] = {p: replay(trace, p, cfg).prefill_tokens_computed for p in PREDICTED}
    out.update(requests=len(trace), capacity_blocks=cfg.capacity_blocks, path=str(path),
               inputs={"skip": skip, "prefill_tok_s": prefill_tok_s, "tpot_s": tpot_s,
                       "bytes_per_token": bytes_per_token}, retention=cfg.retention.as_dict())
    return out


def replay_with_tier(recorded: dict[str, Any], tier_bytes: int) -> dict[str, Any]:
    """The same replay's kvsched side with an FP8 tier of `tier_bytes` (the tier side's measured capacity), in the
    tier block size the recording engine wrote in its header; added to `recorded` under WITH_TIER."""
    trace, cfg = _recorded(Path(recorded["path"]), **recorded["inputs"])
    block_bytes = trace.recorded_bytes[1] if trace.recorded_bytes is not None else None
    if block_bytes is None:
        raise ValueError(f"{recorded['path']}: the recording's header names no FP8-tier block size")
    cfg = replace(cfg, tier_bytes=tier_bytes, tier_block_bytes=block_bytes)
    res = replay(trace, "kvsched", cfg)
    recorded[WITH_TIER] = res.prefill_tokens_computed
    recorded["tier"] = {"bytes": tier_bytes, "block_bytes": cfg.tier_block_bytes,
                        "slots": tier_bytes // cfg.tier_block_bytes, "restored_tokens": res.restored_tokens}
    return recorded


def _recorded(path: Path, skip: int, prefill_tok_s: float, tpot_s: float,
              bytes_per_token: float) -> tuple[Trace, ReplayConfig]:
    from kvsched.core.config import RetentionConfig

    header, requests = read_jsonl(path)
    reqs = sorted(list(requests)[skip:], key=lambda r: r.t)
    trace = Trace.from_requests(int(header["block_size"]), reqs, meta=header.get("meta", {}))
    capacity = trace.recorded_capacity_blocks
    if capacity is None:
        raise ValueError(f"{path}: the recording's header names no pool (meta.capacity_blocks)")
    return trace, ReplayConfig(capacity_blocks=capacity, prefill_tps=prefill_tok_s, tpot_s=tpot_s,
                               bytes_per_token=bytes_per_token, retention=RetentionConfig.from_env())


def prediction_check(result: dict[str, Any]) -> dict[str, Any]:
    """Per measured side: its prefill, the recording's prediction for it, and the prediction's error (a ratio)."""
    predicted = result.get(RECORDER_SIDE, {}).get("recorded_replay")
    if not predicted:
        return {}
    out = {}
    for side, policy in CHECKS.items():
        if side in result and policy in predicted:
            measured = result[side]["prefill_tokens_computed"]
            out[side] = {"policy": policy, "measured": measured, "predicted": predicted[policy],
                         "predicted_over_measured": predicted[policy] / measured if measured else None}
    out["opt_predicted"] = predicted["opt"]
    return out
