"""Compaction in the simulator: rewrite a trace as kvsched's compaction middleware would serve it.

A trace holds token counts and prefix-block ids, not messages, so each session becomes a synthetic conversation: one
system message (the shared system and role prompt, `system_tokens`) and one message per turn carrying the tokens that
turn appended (the previous answer and the new tool result or brief). The SAME `kvsched.core.compaction.CompactionStore`
the API server uses decides, request by request, whether the conversation is served as sent or on `system + summary +
recent turns` (or, for `sliding_window`, on `system + recent turns`), and when to make a summary call.

What changes in the trace:
- a rewritten request keeps its system blocks (shared with every session) and continues with blocks of its own,
  identified by the checkpoint it was served on, so later turns on the same checkpoint share them exactly;
- a summary call becomes a request of its own (pseudo-session `<session>#summary`, ended at once) made when the plan
  hands out its job: its prompt is the conversation as served up to the cut (the session's cached prefix) plus the
  instruction, its output the summary; the summary is committed at once (the next turn comes a tool call later);
- requests with nothing to rewrite keep their own blocks.
What a recording measured is kept (found by review: dropped, so on an engine's recording this side ran the time model
and lineage the other sides did not, and differed from the `kvsched` side with nothing rewritten): every request's
`duration_s` (a rewritten one's too: how long its uncompacted prompt held the engine, the best figure there is), its
`compacted` (rewritten by the recording engine's compaction), and a request's `tail_reuse` and `joins_pin` when it is
served as sent (a rewritten prompt repeats no previous partial block and no shared prompt: 0 and false).
Message token overheads are 0 here: the trace's counts already include the template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsched.core.compaction import CompactionStore
from kvsched.core.compaction_config import CompactionConfig, Strategy
from kvsched.sim.trace import Trace, TraceRequest, computed_blocks, shared_prefix_len

INSTRUCTION_TOKENS = 48  # the summarization instruction appended to the served prefix (about the default prompt)
SUMMARY_SESSION = "#summary"  # a summary call's pseudo-session: its session's id and this


def served_session(sid: str, trace_meta: Any) -> str:
    """The session whose engine serves requests of session `sid`: a summary call's (in a trace `compact_trace` wrote)
    is its conversation's, whose server makes the call; any other is its own."""
    compacted = isinstance(trace_meta, dict) and "compaction" in trace_meta
    return sid.removesuffix(SUMMARY_SESSION) if compacted else sid


@dataclass(slots=True)
class CompactionStats:
    summaries: int = 0
    windows: int = 0
    rewritten_requests: int = 0
    summary_prompt_tokens: int = 0
    peak_prompt_tokens_per_session: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        peaks = list(self.peak_prompt_tokens_per_session.values())
        return {"summaries": self.summaries, "windows": self.windows, "rewritten_requests": self.rewritten_requests,
                "summary_prompt_tokens": self.summary_prompt_tokens,
                "peak_prompt_tokens_per_session_max": max(peaks, default=0),
                "peak_prompt_tokens_per_session_mean": sum(peaks) / len(peaks) if peaks else 0.0}


@dataclass(slots=True)
class _Conversation:
    counts: list[int] = field(default_factory=list)  # tokens per message; [0] is the system message
    last_prompt: int = 0
    served: list[Hashable] = field(default_factory=list)  # block ids of the last request as served


def system_tokens_of(trace: Trace) -> int:
    """The shared prefix of a generated trace (system + role prompt); 0 for a trace that does not say."""
    gen = trace.meta.get("generator", {}) if isinstance(trace.meta, dict) else {}
    return int(gen.get("system_tokens", 0)) + int(gen.get("role_prompt_tokens", 0))


def compact_trace(trace: Trace, config: CompactionConfig, system_tokens: int | None = None
                  ) -> tuple[Trace, CompactionStats]:
    """The trace as kvsched serves it with `config.strategy` (summarize or sliding_window), and what compaction did."""
    if config.strategy not in (Strategy.SUMMARIZE, Strategy.SLIDING_WINDOW):
        raise ValueError(f"compaction in the simulator is summarize or sliding_window, not {config.strategy}")
    cfg = dataclasses.replace(config, message_overhead_tokens=0)
    store = CompactionStore(cfg, clock=lambda: 0.0)
    sys_tokens = system_tokens_of(trace) if system_tokens is None else system_tokens
    if sys_tokens < 0:
        raise ValueError(f"system_tokens must be >= 0, got {sys_tokens}")
    bs = trace.block_size
    sys_blocks = sys_tokens // bs
    conversations: dict[int, _Conversation] = {}
    stats = CompactionStats()
    out: list[TraceRequest] = []
    for i in range(len(trace)):
        s = int(trace.session[i])
        sid, salt = trace.sessions[s]
        prompt, output = int(trace.prompt_tokens[i]), int(trace.output_tokens[i])
        original = [int(b) for b in trace.blocks(i)]
        conv = conversations.get(s)
        if conv is None:
            conv = conversations[s] = _Conversation(counts=[min(sys_tokens, prompt)], last_prompt=min(sys_tokens, prompt))
        conv.counts.append(max(prompt - conv.last_prompt, 0))
        conv.last_prompt = prompt
        messages = [{"role": "system", "content": f"{sid}/system"}] + [
            {"role": "user", "content": f"{sid}/{j}"} for j in range(1, len(conv.counts))]
        plan = store.plan(f"{sid}|{salt}", messages, conv.counts)
        with_output = len(original) > prompt // bs  # the trace lists the blocks its output completes
        if plan.replaced > 0:
            served_prompt = plan.tokens
            n = computed_blocks(served_prompt, output, bs) if with_output else served_prompt // bs
            head = min(sys_blocks, n)  # a system prompt longer than this prompt (--system-tokens): its blocks only
            ids: list[Hashable] = [*original[:head],
                                   *(("compacted", sid, salt, plan.replaced, k) for k in range(head, n))]
            stats.rewritten_requests += 1
        else:
            served_prompt, ids = prompt, list(original)
        stats.peak_prompt_tokens_per_session[sid] = max(stats.peak_prompt_tokens_per_session.get(sid, 0),
                                                       served_prompt)
        t = float(trace.t[i])
        req = _request(t, sid, salt, served_prompt, output, ids, conv.served, trace.role[i], trace.ttl_s[i],
                       bool(trace.end[i]), plan.replaced > 0)
        _measured(req, trace, i)
        out.append(req)
        conv.served = ids
        if plan.job is not None:  # the one summary call of this checkpoint
            job = plan.job
            kept = sum(conv.counts[job.cut:])
            through_cut = max(served_prompt - kept, 0)
            sum_prompt = through_cut + INSTRUCTION_TOKENS
            sum_ids: list[Hashable] = [*ids[: through_cut // bs], *(("summary-call", sid, salt, job.cut, k)
                                                                   for k in range(through_cut // bs, sum_prompt // bs))]
            out.append(TraceRequest(t=t, session=f"{sid}{SUMMARY_SESSION}", prompt_tokens=sum_prompt,
                                    output_tokens=cfg.summary_target_tokens, blocks=sum_ids, role="summarizer",
                                    end=True, salt=salt))
            store.commit(job, "summary", cfg.summary_target_tokens)
            stats.summaries += 1
            stats.summary_prompt_tokens += sum_prompt
        if trace.end[i]:
            store.forget(f"{sid}|{salt}")
    stats.windows = store.counters["windows"]
    meta = dict(trace.meta) if isinstance(trace.meta, dict) else {}
    meta["compaction"] = {"strategy": str(cfg.strategy), "trigger_tokens": cfg.trigger_tokens,
                          "keep_recent_messages": cfg.keep_recent_messages,
                          "summary_target_tokens": cfg.summary_target_tokens, "system_tokens": sys_tokens}
    return Trace.from_requests(bs, out, meta=meta), stats


def _measured(req: TraceRequest, trace: Trace, i: int) -> None:
    """Carry request i's recorded figures to `req`, its form as served (module docstring)."""
    if trace.duration_s is not None and trace.duration_s[i] == trace.duration_s[i]:  # NaN: not measured
        req.duration_s = float(trace.duration_s[i])
    if trace.tail_reuse is not None:
        req.tail_reuse = 0 if req.compacted else (int(trace.tail_reuse[i]) if trace.tail_reuse[i] >= 0 else None)
    req.joins_pin = trace.joins_pin is not None and bool(trace.joins_pin[i]) and not req.compacted
    req.compacted = req.compacted or (trace.compacted is not None and bool(trace.compacted[i]))  # the engine's too


def _request(t: float, sid: str, salt: str | None, prompt: int, output: int, ids: Sequence[Hashable],
             previous: Sequence[Hashable], role: str | None, ttl: float, end: bool, compacted: bool = False
             ) -> TraceRequest:
    """A trace request whose `reuse` is counted against the session's previous request as served."""
    n = shared_prefix_len(previous, ids)
    return TraceRequest(t=t, session=sid, prompt_tokens=prompt, output_tokens=output, blocks=list(ids[n:]), reuse=n,
                        role=role, ttl_s=None if ttl != ttl else float(ttl), end=end, salt=salt, compacted=compacted)
