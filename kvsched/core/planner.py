"""KV-cache arithmetic of agent fleets: bytes per token, per session, per fleet, and what fits on which GPU.

The sizing guide's formula is `KV bytes/token = layers x 2 (K and V) x KV heads x head_dim x dtype bytes` (GQA: KV
heads, not attention heads). Two architectures need more than that and are handled explicitly:
- MLA (DeepSeek-V2/V3 style, `kv_lora_rank` in the config): one compressed latent plus the rope key per token and
  layer, `layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes`, no factor 2 and no heads.
- sliding-window layers (`sliding_window`, and `layer_types` marking which layers slide): a sliding layer holds at most
  `window` tokens, so a session's KV is `full layers x per-layer bytes x tokens + sliding layers x per-layer bytes x
  min(tokens, window)`; `bytes_per_token` then reports the full-context rate (all layers), the session figures are exact.
Units: bytes, and GiB (2**30) where the guide says GB (its "512 MB per 8K session" is 512 MiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

GIB = 2**30
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
                                 "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "fp4": 0.5, "int4": 0.5}


class PlanError(ValueError):
    """Input the planner cannot plan with (unknown preset, missing config fields, impossible numbers)."""


def dtype_bytes(name: str) -> float:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPE_BYTES))}") from None


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the KV arithmetic needs of a model. `params` counts weights (for their memory)."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    params: float
    kv_lora_rank: int = 0  # MLA latent size (0: standard attention)
    qk_rope_head_dim: int = 0  # MLA: the rope key stored beside the latent
    sliding_window: int = 0  # tokens a sliding layer keeps (0: none)
    sliding_layers: int = 0  # how many of `layers` slide

    def __post_init__(self) -> None:
        if self.layers <= 0 or self.params < 0 or (self.kv_lora_rank <= 0 and (self.kv_heads <= 0 or self.head_dim <= 0)):
            raise PlanError(f"model {self.name!r}: layers, KV heads and head_dim must be positive")
        if not 0 <= self.sliding_layers <= self.layers:
            raise PlanError(f"model {self.name!r}: sliding_layers must be within 0..layers")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @classmethod
    def from_preset(cls, name: str) -> ModelShape:
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise PlanError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}") from None

    @classmethod
    def from_hf_config(cls, source: str | Path | dict[str, Any], name: str | None = None) -> ModelShape:
        """From a Hugging Face `config.json` (a dict, the file, or the model directory holding it)."""
        if isinstance(source, dict):
            cfg, label = source, name or str(source.get("_name_or_path") or source.get("model_type") or "model")
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise PlanError(f"cannot read a model config at {path}: {exc}") from None
            label = name or path.parent.name
        cfg = {**cfg.get("text_config", {}), **{k: v for k, v in cfg.items() if k != "text_config"}}
        try:
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
        except KeyError as exc:
            raise PlanError(f"model config lacks {exc.args[0]!r} (needs num_hidden_layers, num_attention_heads, "
                            "hidden_size)") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        window = int(cfg.get("sliding_window") or 0)
        types = cfg.get("layer_types")
        if window and isinstance(types, list):
            sliding = sum(1 for t in types if "sliding" in str(t))
        elif window and cfg.get("use_sliding_window", True) and not cfg.get("max_window_layers"):
            sliding = layers
        else:
            sliding = 0
        return cls(name=label, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                   params=float(cfg.get("num_parameters") or estimate_params(cfg)),
                   kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
                   qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
                   sliding_window=window if sliding else 0, sliding_layers=sliding)


def estimate_params(cfg: dict[str, Any]) -> float:
    """Dense decoder parameters from a config (embeddings + attention + gated MLP), for configs that do not say."""
    h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    inter = int(cfg.get("intermediate_size") or 4 * h)
    vocab = int(cfg.get("vocab_size") or 32_000)
    attn = h * heads * hd * 2 + h * kv * hd * 2
    emb = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return float(emb + layers * (attn + 3 * h * inter))


PRESETS: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", layers=32, kv_heads=8, head_dim=128, params=8.03e9),
    "llama-3.1-70b": ModelShape("llama-3.1-70b", layers=80, kv_heads=8, head_dim=128, params=70.6e9),
    "llama-3.2-3b": ModelShape("llama-3.2-3b", layers=28, kv_heads=8, head_dim=128, params=3.21e9),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", layers=28, kv_heads=4, head_dim=128, params=7.62e9),
    "qwen2.5-72b": ModelShape("qwen2.5-72b", layers=80, kv_heads=8, head_dim=128, params=72.7e9),
    "mistral-7b-v0.1": ModelShape("mistral-7b-v0.1", layers=32, kv_heads=8, head_dim=128, params=7.24e9,
                                  sliding_window=4096, sliding_layers=32),
    "deepseek-v2-lite": ModelShape("deepseek-v2-lite", layers=27, kv_heads=16, head_dim=128, params=15.7e9,
                                   kv_lora_rank=512, qk_rope_head_dim=64),
}


def layer_bytes_per_token(shape: ModelShape, kv_dtype: str) -> float:
    """KV bytes one token costs in ONE layer."""
    b = dtype_bytes(kv_dtype)
    if shape.is_mla:
        return (shape.kv_lora_rank + shape.qk_rope_head_dim) * b
    return 2 * shape.kv_heads * shape.head_dim * b


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """KV bytes per token across all layers (the guide's formula; full-context rate for sliding-window models)."""
    return int(round(shape.layers * layer_bytes_per_token(shape, kv_dtype)))


def kv_bytes_for_context(shape: ModelShape, kv_dtype: str, tokens: int) -> int:
    """KV bytes one session of `tokens` tokens holds (sliding layers capped at their window)."""
    if tokens < 0:
        raise PlanError(f"context must be >= 0 tokens, got {tokens}")
    per_layer = layer_bytes_per_token(shape, kv_dtype)
    full = shape.layers - shape.sliding_layers
    capped = min(tokens, shape.sliding_window) if shape.sliding_layers else 0
    return int(round(per_layer * (full * tokens + shape.sliding_layers * capped)))


def kv_capacity_tokens(shape: ModelShape, kv_dtype: str, kv_bytes: int, block_size: int = 16) -> int:
    """Tokens of KV that fit in `kv_bytes`, in whole blocks (what vLLM reports as its KV cache size in tokens)."""
    if block_size <= 0 or kv_bytes < 0:
        raise PlanError("block_size must be positive and kv_bytes >= 0")
    per_block = kv_bytes_per_token(shape, kv_dtype) * block_size
    return int(kv_bytes // per_block) * block_size


class Topology(StrEnum):
    FLAT = "flat"
    HIERARCHICAL = "hierarchical"
    PIPELINE = "pipeline"


@dataclass(frozen=True, slots=True)
class Workload:
    """A fleet: `workflows` concurrent workflows of a topology, each session `context` tokens (p95 sizes memory)."""

    workflows: int
    topology: Topology = Topology.FLAT
    agents: int = 1  # flat: agents per workflow; hierarchical: workers besides the orchestrator; pipeline: stages
    context: int = 8192
    context_p50: int | None = None
    tool_calls: int = 0  # per session, each appending `tool_tokens` that stay in the KV cache
    tool_tokens: int = 500

    def __post_init__(self) -> None:
        if self.workflows <= 0 or self.agents <= 0:
            raise PlanError("workflows and agents must be positive")
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
        return self.workflows  # pipeline: one active stage per workflow

    @property
    def session_tokens(self) -> int:
        return self.context + self.tool_calls * self.tool_tokens

    @property
    def session_tokens_p50(self) -> int:
        return (self.context_p50 or self.context) + self.tool_calls * self.tool_tokens


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    vram_gib: float
    price_per_hour: float
    interactions_per_hour: float = 22_000.0  # sustained, one 8B-class replica (the guide's H100 SXM figure)


@dataclass(frozen=True, slots=True)
class Fit:
    gpu: str
    tensor_parallel: int
    sessions_per_replica: int
    replicas: int
    gpus: int
    cost_per_hour: float


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    kv_dtype: str
    weight_dtype: str
    bytes_per_token: int
    kv_per_session_bytes: int
    kv_per_session_p50_bytes: int
    kv_slots: int
    kv_total_bytes: int
    weights_bytes: int
    total_bytes: int  # KV + weights, plus the runtime overhead
    overhead: float
    fits: list[Fit] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "fits"}
        d.update(kv_per_session_gib=self.kv_per_session_bytes / GIB, kv_total_gib=self.kv_total_bytes / GIB,
                 weights_gib=self.weights_bytes / GIB, total_gib=self.total_bytes / GIB,
                 fits=[{f: getattr(x, f) for f in x.__dataclass_fields__} for x in self.fits])
        return d


TP_DEGREES = (1, 2, 4, 8)


def fit_on(gpu: Gpu, weights: int, kv_session: int, slots: int, overhead: float, ceiling: float) -> Fit | None:
    """Smallest tensor-parallel degree whose replica holds the weights and at least one session, and how many
    replicas the fleet's sessions then need. Usable memory is VRAM x ceiling; overhead multiplies weights + KV."""
    for tp in TP_DEGREES:
        usable = tp * gpu.vram_gib * GIB * ceiling / (1.0 + overhead)
        per_replica = math.floor((usable - weights) / kv_session) if kv_session else 0
        if per_replica >= 1:
            replicas = math.ceil(slots / per_replica)
            return Fit(gpu.name, tp, per_replica, replicas, replicas * tp, replicas * tp * gpu.price_per_hour)
    return None


def plan(shape: ModelShape, workload: Workload, kv_dtype: str = "fp16", weight_dtype: str | None = None,
         overhead: float = 0.15, ceiling: float = 0.90, gpus: list[Gpu] | None = None) -> Plan:
    if not 0 <= overhead < 1 or not 0 < ceiling <= 1:
        raise PlanError("overhead must be in [0, 1) and the utilisation ceiling in (0, 1]")
    weight_dtype = weight_dtype or ("fp8" if dtype_bytes(kv_dtype) <= 1 else "bf16")
    kv_session = kv_bytes_for_context(shape, kv_dtype, workload.session_tokens)
    kv_total = kv_session * workload.kv_slots
    weights = int(shape.params * dtype_bytes(weight_dtype))
    fits = [f for g in (gpus or []) if (f := fit_on(g, weights, kv_session, workload.kv_slots, overhead, ceiling))]
    return Plan(model=shape.name, kv_dtype=kv_dtype, weight_dtype=weight_dtype,
                bytes_per_token=kv_bytes_per_token(shape, kv_dtype), kv_per_session_bytes=kv_session,
                kv_per_session_p50_bytes=kv_bytes_for_context(shape, kv_dtype, workload.session_tokens_p50),
                kv_slots=workload.kv_slots, kv_total_bytes=kv_total, weights_bytes=weights,
                total_bytes=int((kv_total + weights) * (1.0 + overhead)), overhead=overhead, fits=fits)


# ---- cost -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Cost:
    """Managed API versus GPUs for `interactions_per_hour` interactions of `tokens_per_interaction` tokens."""

    api_per_hour: float
    gpu_prorated_per_hour: float  # the GPU's price times the share of its capacity the load uses
    api_per_1k_interactions: float
    gpu_per_1k_interactions: float
    gpu_wins: bool  # P_api x T / 1e6 > P_gpu / I_gpu
    breakeven_interactions_per_hour: float  # above this, a dedicated GPU costs less than the API
    breakeven_utilisation: float  # the same as a share of the GPU's capacity


def cost(tokens_per_interaction: float, interactions_per_hour: float, api_price_per_m: float, gpu_price_per_hour: float,
         gpu_interactions_per_hour: float) -> Cost:
    if min(tokens_per_interaction, api_price_per_m, gpu_price_per_hour, gpu_interactions_per_hour) <= 0 \
            or interactions_per_hour < 0:
        raise PlanError("token counts, prices and GPU capacity must be positive")
    api_each = api_price_per_m * tokens_per_interaction / 1e6
    gpu_each = gpu_price_per_hour / gpu_interactions_per_hour
    breakeven = gpu_price_per_hour / api_each
    return Cost(api_per_hour=interactions_per_hour * api_each, gpu_prorated_per_hour=interactions_per_hour * gpu_each,
                api_per_1k_interactions=1000 * api_each, gpu_per_1k_interactions=1000 * gpu_each,
                gpu_wins=api_each > gpu_each, breakeven_interactions_per_hour=breakeven,
                breakeven_utilisation=breakeven / gpu_interactions_per_hour)


# ---- kvsched's levers -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Levers:
    fp8: bool = True
    compaction_trigger: int = 5_000  # older context past this is summarised (0: off)
    summary_tokens: int = 500
    recent_tokens: int = 2_000  # the recent turns kept verbatim beside the summary


def with_levers(workload: Workload, levers: Levers) -> Workload:
    """The workload as kvsched's compaction leaves it: a session holds at most recent + trigger + summary tokens
    (compaction fires when the older part passes the trigger, leaving summary + recent)."""
    if levers.compaction_trigger <= 0:
        return workload
    cap = levers.recent_tokens + levers.compaction_trigger + levers.summary_tokens
    cap_p50 = None if workload.context_p50 is None else min(workload.session_tokens_p50, cap)
    return replace(workload, context=min(workload.session_tokens, cap), context_p50=cap_p50, tool_calls=0)
