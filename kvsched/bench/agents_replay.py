"""What no eviction order could have beaten in one `kvsched bench agents` run: its requests, in the order and at the
times they were sent, replayed through the simulator's model of the same KV pool under LRU (stock vLLM's order),
kvsched's policy and clairvoyant Belady eviction (`kvsched.sim`).

Why: issue 3's prefill gate is a ratio to stock. The unbounded side gives the floor with infinite memory; this gives
the floor at the run's own pool and arrival order, so a miss can be told apart as the policy's or the memory's. The
simulated LRU on the stock side's arrivals is reported next to stock's measured count: it is the model's check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvsched.bench.agents_driver import RunRecord, prompt_messages
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace, TraceRequest, TraceWriter, chain_hashes
from kvsched.sim.workload import Workflow

POLICIES = ("lru", "kvsched", "opt")
TRACE_META = {"source": "kvsched bench agents"}
OUTPUT_ID_BASE = 1 << 30  # generated tokens are never part of a later prompt (the client sends canned replies)


def build_trace(model_dir: Path, workflows: list[Workflow], record: RunRecord, block_size: int,
                ttl_s: float | None = None) -> tuple[Trace, int]:
    """The run's served requests as a trace (prompt token ids through the model's own chat template, chained block
    hashes as vLLM computes them), and how many prompts' token counts differ from what the server reported (0 when
    the tokenization matches vLLM's)."""
    requests, mismatches = trace_requests(model_dir, workflows, record, block_size, ttl_s)
    return Trace.from_requests(block_size, requests, meta=TRACE_META), mismatches


def trace_requests(model_dir: Path, workflows: list[Workflow], record: RunRecord, block_size: int,
                   ttl_s: float | None) -> tuple[list[TraceRequest], int]:
    """`build_trace`'s requests, in send order, each with its full block list (reuse 0)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    agents = {a.session_id: a for wf in workflows for a in wf.agents()}
    requests: list[TraceRequest] = []
    mismatches = 0
    for n, rec in enumerate(sorted((r for r in record.turns if not r.error), key=lambda r: r.sent_s)):
        agent = agents[rec.session_id]
        text = tok.apply_chat_template(prompt_messages(agent.system, agent.turns, rec.turn_index),
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        mismatches += len(ids) != rec.prompt_tokens
        out = [OUTPUT_ID_BASE + n * 4096 + k for k in range(rec.completion_tokens - 1)]  # the last one has no KV
        requests.append(TraceRequest(t=rec.sent_s, session=rec.session_id, prompt_tokens=len(ids),
                                     output_tokens=rec.completion_tokens, blocks=chain_hashes(ids + out, block_size),
                                     role=agent.role, ttl_s=ttl_s, end=rec.turn_index == len(agent.turns) - 1,
                                     duration_s=rec.latency_s))
    return requests, mismatches


def decode_s_per_token(record: RunRecord) -> float:
    """Median time per generated token after the first, as the client saw it (the replay's decode speed)."""
    per = sorted((r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in record.turns
                 if not r.error and r.ttft_s is not None and r.completion_tokens > 1)
    return per[len(per) // 2] if per else 0.02


def clairvoyant_replay(model_dir: Path, workflows: list[Workflow], record: RunRecord, block_size: int,
                       capacity_blocks: int, prefill_tok_s: float, bytes_per_token: float,
                       ttl_s: float | None = None, trace_out: Path | None = None) -> dict[str, Any]:
    """Prefill tokens each policy computes on this run's arrivals at this pool. Each request holds its blocks for as
    long as it really ran (the run's own batching and queueing), from its admission in the replay (a wait for memory
    there comes on top: `kvsched.sim.replay`); `time_model` repeats the replay with the simulator's timing instead
    (every request alone at the measured prefill speed: less overlap, so less pressure)."""
    from kvsched.core.config import RetentionConfig

    requests, mismatches = trace_requests(model_dir, workflows, record, block_size, ttl_s)
    trace = Trace.from_requests(block_size, requests, meta=TRACE_META)  # before write_trace rewrites their blocks
    # kvsched's policy as the engine's sides run it: their KVSCHED_* settings (found by review: the replay ran the
    # defaults whatever the engine read), written with the result
    cfg = ReplayConfig(capacity_blocks=capacity_blocks, prefill_tps=prefill_tok_s,
                       tpot_s=decode_s_per_token(record), bytes_per_token=bytes_per_token,
                       retention=RetentionConfig.from_env())
    out: dict[str, Any] = {p: replay(trace, p, cfg).prefill_tokens_computed for p in POLICIES}
    timed_by_model = dataclasses.replace(trace, duration_s=None)
    out["time_model"] = {p: replay(timed_by_model, p, cfg).prefill_tokens_computed for p in POLICIES}
    out.update(requests=len(trace), capacity_blocks=capacity_blocks, prompt_length_mismatches=mismatches,
               prefill_tok_s=prefill_tok_s, tpot_s=cfg.tpot_s, retention=cfg.retention.as_dict())
    if trace_out is not None:
        write_trace(trace_out, requests, block_size)
    return out


def write_trace(path: Path, requests: list[TraceRequest], block_size: int) -> None:
    """The run as a trace file (docs/trace_schema.md) for `kvsched simulate`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        w = TraceWriter(f, block_size, meta=TRACE_META)
        for r in requests:
            w.write(r, full_blocks=list(r.blocks))
