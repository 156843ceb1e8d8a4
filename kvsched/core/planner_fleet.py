"""Fleet sizing: the KV slots a topology keeps live, total memory, and how many sessions each catalogue GPU holds.

Topologies and their live KV slots follow the sizing guide: flat = workflows x agents, hierarchical = workflows x
(1 orchestrator + N workers), pipeline = one active stage per workflow. Every tool result re-enters the context and
stays in the KV cache, so a session holds `context + tool_calls x tool_tokens` tokens. Memory is planned on
`VRAM x ceiling`, of which `overhead` (runtime, CUDA context, OS; 10-15%) is lost on top of weights + KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from kvsched.core.planner import (
    GIB,
    ModelShape,
    PlanError,
    dtype_bytes,
    kv_bytes_for_context,
    kv_bytes_per_token,
    kv_replication,
    tp_refusal,
    weight_bytes,
    weight_dtype_name,
    weights_note,
)


class Topology(StrEnum):
    FLAT = "flat"
    HIERARCHICAL = "hierarchical"
    PIPELINE = "pipeline"


@dataclass(frozen=True, slots=True)
class Workload:
    """A fleet: `workflows` concurrent workflows of a topology, each session `context` tokens (p95 sizes memory,
    p50 the typical footprint), plus the tool results that stay in its context."""

    workflows: int
    topology: Topology = Topology.FLAT
    agents: int = 1  # flat: agents per workflow; hierarchical: workers besides the orchestrator; pipeline: stages
    context: int = 8192
    context_p50: int | None = None
    tool_calls: int = 0  # per session, each appending `tool_tokens` that stay in the KV cache
    tool_tokens: int = 500

    def __post_init__(self) -> None:
        if self.workflows <= 0 or self.agents <= 0:
            raise PlanError(f"workflows and agents must be positive (got {self.workflows} and {self.agents})")
        if self.context <= 0 or self.tool_calls < 0 or self.tool_tokens < 0:
            raise PlanError("context must be positive; tool calls and tool tokens >= 0")
        if self.context_p50 is not None and not 0 < self.context_p50 <= self.context:
            raise PlanError("context_p50 must be positive and at most the p95 context")

    @property
    def kv_slots(self) -> int:
        """Concurrent KV slots (live sessions) the topology implies."""
        if self.topology is Topology.FLAT:
            return self.workflows * self.agents
        if self.topology is Topology.HIERARCHICAL:
            return self.workflows * (1 + self.agents)
        return self.workflows  # pipeline: one active stage per workflow (100 workflows x 5 stages -> ~100 live)

    def tiers(self) -> tuple[Workload, Workload]:
        """A hierarchical fleet whose orchestrator runs another model, as two pools that cannot share VRAM:
        (orchestrators: one slot per workflow, workers: N per workflow), each a flat workload."""
        if self.topology is not Topology.HIERARCHICAL:
            raise PlanError("a separate orchestrator model needs the hierarchical topology")
        return (replace(self, topology=Topology.FLAT, agents=1), replace(self, topology=Topology.FLAT))

    @property
    def session_tokens(self) -> int:
        return self.context + self.tool_calls * self.tool_tokens

    @property
    def session_tokens_p50(self) -> int:
        return (self.context_p50 or self.context) + self.tool_calls * self.tool_tokens


@dataclass(frozen=True, slots=True)
class Gpu:
    """A catalogue entry. `interactions_per_hour`: sustained capacity of one such GPU serving an 8B-class model (the
    cost model scales it to other models and TP degrees: planner_cost.replica_interactions_per_hour); `fp8_kv`:
    whether vLLM's FP8 KV cache runs natively (Hopper, Blackwell; not Ampere)."""

    name: str
    vram_gib: float
    price_per_hour: float
    interactions_per_hour: float = 22_000.0
    fp8_kv: bool = True


@dataclass(frozen=True, slots=True)
class Fit:
    gpu: str
    tensor_parallel: int
    sessions_per_replica: int
    replicas: int
    gpus: int
    cost_per_hour: float
    sessions_per_gpu: float
    note: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    attention: str
    kv_dtype: str
    weight_dtype: str
    bytes_per_token: int
    session_tokens: int
    kv_per_session_bytes: int  # p95 session
    kv_per_session_p50_bytes: int
    kv_slots: int
    kv_total_bytes: int  # every slot at p95: what memory must hold
    kv_total_p50_bytes: int  # every slot at p50: the typical footprint
    weights_bytes: int
    total_before_overhead_bytes: int  # KV + weights (the guide's "total" column)
    total_bytes: int  # plus the runtime overhead
    overhead: float
    ceiling: float
    fits: list[Fit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("fits", "notes")}
        d.update(kv_per_session_gib=self.kv_per_session_bytes / GIB, kv_total_gib=self.kv_total_bytes / GIB,
                 weights_gib=self.weights_bytes / GIB, total_before_overhead_gib=self.total_before_overhead_bytes / GIB,
                 total_gib=self.total_bytes / GIB,
                 fits=[{f: getattr(x, f) for f in x.__dataclass_fields__} for x in self.fits], notes=list(self.notes))
        return d


TP_DEGREES = (1, 2, 4, 8)


def fit_on(gpu: Gpu, shape: ModelShape, weights: int, kv_session: int, slots: int, overhead: float,
           ceiling: float) -> Fit | None:
    """The tensor-parallel degree that serves the fleet's sessions on the fewest GPUs (ties: the smaller degree,
    less all-reduce traffic), and its replicas. A replica must hold the weights and at least one session in
    VRAM x ceiling / (1 + overhead). Degrees vLLM refuses for the model's heads are skipped (found by review:
    Qwen2.5-7B's 28 heads were planned at TP=8)."""
    best: Fit | None = None
    for tp in (d for d in TP_DEGREES if not tp_refusal(shape, d)):
        usable = tp * gpu.vram_gib * GIB * ceiling / (1.0 + overhead)
        per_session = kv_session * kv_replication(shape, tp)
        per_replica = math.floor((usable - weights) / per_session) if per_session else 0
        if per_replica < 1:
            continue
        replicas = math.ceil(slots / per_replica)
        if best is None or replicas * tp < best.gpus:
            best = Fit(gpu.name, tp, per_replica, replicas, replicas * tp, replicas * tp * gpu.price_per_hour,
                       per_replica / tp)
    return best


def plan(shape: ModelShape, workload: Workload, kv_dtype: str = "fp16", weight_dtype: str | None = None,
         overhead: float = 0.15, ceiling: float = 0.90, gpus: list[Gpu] | None = None) -> Plan:
    """Size `workload` on `shape`. The weights default to the checkpoint's dtype (`shape.weight_dtype`; bf16 for the
    presets) whatever the KV dtype: the guide's "8B FP8" rows pass weight_dtype="fp8" (found by review: an FP8 KV
    cache silently sized FP8 weights, which vLLM only serves with --quantization fp8 or an FP8 checkpoint)."""
    if not 0 <= overhead < 1 or not 0 < ceiling <= 1:
        raise PlanError(f"overhead must be in [0, 1) and the utilisation ceiling in (0, 1] (got {overhead}, {ceiling})")
    fp8 = dtype_bytes(kv_dtype) <= 1
    if not (weight_dtype or shape.weight_dtype):
        raise PlanError(f"model {shape.name!r}: the checkpoint's quantization_config does not say its weight bytes; "
                        "pass the weight dtype (--weight-dtype)")
    weight_dtype = weight_dtype_name(weight_dtype or shape.weight_dtype)
    kv_session = kv_bytes_for_context(shape, kv_dtype, workload.session_tokens)
    kv_p50 = kv_bytes_for_context(shape, kv_dtype, workload.session_tokens_p50)
    kv_total = kv_session * workload.kv_slots
    weights = weight_bytes(shape, weight_dtype)
    fits = []
    for g in gpus or []:
        f = fit_on(g, shape, weights, kv_session, workload.kv_slots, overhead, ceiling)
        if f and fp8 and not g.fp8_kv:
            f = replace(f, note="no native FP8 KV on this GPU")
        if f:
            fits.append(f)
    notes = []
    if shape.sliding_layers:
        notes.append(f"{shape.sliding_layers} of {shape.layers} layers slide (window {shape.sliding_window:,}): they "
                     "hold at most the window; bytes_per_token is the full-context rate")
    if shape.is_mla:
        notes.append("MLA: one latent + rope key per token and layer, replicated on every tensor-parallel rank")
    if not shape.params:
        notes.append("parameter count unknown: weights not counted")
    elif dtype_bytes(weight_dtype) < 2:
        notes.append(weights_note(shape, weight_dtype))
    if shape.max_positions and workload.session_tokens > shape.max_positions:  # found by review: never checked
        notes.append(f"WARNING: the p95 session ({workload.session_tokens:,} tokens, --max-model-len) exceeds the "
                     f"model's max_position_embeddings ({shape.max_positions:,}, with any RoPE scaling): vLLM refuses "
                     "it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, and positions past the limit may give NaNs")
    return Plan(model=shape.name, attention=shape.attention_kind, kv_dtype=kv_dtype, weight_dtype=weight_dtype,
                bytes_per_token=kv_bytes_per_token(shape, kv_dtype), session_tokens=workload.session_tokens,
                kv_per_session_bytes=kv_session, kv_per_session_p50_bytes=kv_p50, kv_slots=workload.kv_slots,
                kv_total_bytes=kv_total, kv_total_p50_bytes=kv_p50 * workload.kv_slots, weights_bytes=weights,
                total_before_overhead_bytes=kv_total + weights, total_bytes=int((kv_total + weights) * (1 + overhead)),
                overhead=overhead, ceiling=ceiling, fits=fits, notes=notes)


# ---- kvsched's levers -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Levers:
    """kvsched's settings that change a plan. Compaction follows kvsched.core.compaction_config: when the part of a
    session older than the recent turns (an earlier summary included) reaches `compaction_trigger` tokens it becomes
    one `summary_tokens` summary. `pin_budget` is the retention budget (RetentionConfig.pin_budget_fraction)."""

    fp8: bool = True
    compaction_trigger: int = 5_000  # 0: off
    summary_tokens: int = 500
    recent_tokens: int = 2_000  # the recent turns kept verbatim beside the summary
    pin_budget: float = 1.0

    def __post_init__(self) -> None:
        if self.compaction_trigger < 0 or self.recent_tokens < 0 or self.summary_tokens < 0:
            raise PlanError("compaction trigger, summary and recent tokens must be >= 0")
        if self.compaction_trigger and self.summary_tokens >= self.compaction_trigger:
            raise PlanError("the summary must be shorter than the compaction trigger")
        if not 0.0 <= self.pin_budget <= 1.0:
            raise PlanError(f"the retention (pin) budget must be within [0, 1], got {self.pin_budget}")


def compacted_tokens(tokens: int, levers: Levers) -> int:
    """Most tokens a session of `tokens` holds under compaction: recent + older part just below the trigger."""
    if levers.compaction_trigger <= 0:
        return tokens
    return min(tokens, levers.recent_tokens + levers.compaction_trigger)


def summary_calls(tokens: int, levers: Levers) -> int:
    """Summarisation calls a session of `tokens` costs: the first at recent + trigger, then one per
    (trigger - summary) further tokens."""
    if levers.compaction_trigger <= 0:
        return 0
    over = tokens - levers.recent_tokens - levers.compaction_trigger
    return 0 if over < 0 else 1 + over // (levers.compaction_trigger - levers.summary_tokens)


def with_levers(workload: Workload, levers: Levers) -> Workload:
    """The workload as kvsched's compaction leaves it (tool results included in what gets compacted)."""
    if levers.compaction_trigger <= 0:
        return workload
    cap_p50 = None if workload.context_p50 is None else compacted_tokens(workload.session_tokens_p50, levers)
    return replace(workload, context=compacted_tokens(workload.session_tokens, levers), context_p50=cap_p50,
                   tool_calls=0)
