"""KV-cache arithmetic of one model: bytes per token, per session, and how many tokens fit in a KV memory size.

The stable API other modules import: `ModelShape` (`from_preset`, `from_hf_config`), `kv_bytes_per_token`,
`kv_bytes_for_context`, `kv_capacity_tokens`, `weight_bytes`, `PlanError`, `GIB`. Fleet sizing lives in
`planner_fleet`, the API cost crossover in `planner_cost`, reading a HF config's fields in `planner_config`.

The sizing guide's formula is `KV bytes/token = layers x 2 (K and V) x KV heads x head_dim x dtype bytes` (GQA: KV
heads, not attention heads). Two architectures need more than that and are handled explicitly:
- MLA (DeepSeek-V2/V3 style, `kv_lora_rank` in the config): one compressed latent plus the rope key per token and
  layer, `layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes`, no factor 2 and no heads (vLLM's MLA cache).
- sliding-window layers (`sliding_window` with `layer_types`, Qwen2's `max_window_layers`, Gemma's alternation or
  `sliding_window_pattern`, or Mistral-style all-layer windows): a sliding layer holds at most `window` tokens, so a
  session's KV is `per-layer bytes x (full layers x tokens + sliding layers x min(tokens, window))`.
  `kv_bytes_per_token` reports the full-context rate (all layers), `kv_bytes_for_context` is exact.
Out of scope, rejected with a `PlanError`: linear-attention / state-space layers (Mamba, Jamba, Qwen3-Next's
`linear_attention`) and chunked local attention (Llama 4): their memory is not tokens x a per-token rate.
Units: bytes, and GiB (2**30) where the guide says GB (its "512 MB per 8K session" is 512 MiB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsched.core.planner_config import (
    DEFAULT_LAYOUTS,
    MAX_CONFIG_INT,
    WEIGHT_DTYPES,
    QuantLayout,
    checkpoint_dtype,
    checkpoint_layout,
    config_int,
    estimate_params,
    kv_heads_of,
    layout_overhead,
    max_positions_of,
    positive_int,
    routed_experts,
    sliding_layers_of,
)
from kvsched.core.planner_config import PlanError as PlanError  # the planner's error, re-exported
from kvsched.core.planner_quant import QuantSplit, compressed_tensors_split

GIB = 2**30
MIB = 2**20
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "half": 2, "bf16": 2,
                                 "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "fp4": 0.5,
                                 "int4": 0.5}
# Config keys of layer kinds whose memory is not tokens x a per-token rate (see the module docstring).
OUT_OF_SCOPE_KEYS = {"attn_layer_period": "Jamba-style attention/Mamba hybrid", "ssm_cfg": "state-space (Mamba)",
                     "hybrid_override_pattern": "attention/Mamba hybrid", "layers_block_type": "attention/Mamba hybrid",
                     "attention_chunk_size": "chunked local attention (Llama 4)"}
KV_DTYPES = {"fp16", "float16", "half", "bf16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"}  # --kv-cache-dtype
# Configs whose KV heads vLLM reads from elsewhere (DBRX: attn_config.kv_n_heads; Nemotron-NAS: per block)
UNREAD_KV_KEYS = {"attn_config": "DBRX/MPT attn_config", "block_configs": "per-block attention (Nemotron-NAS)"}


def kv_cache_dtype(name: str, model_dtype: str = "bf16") -> str:
    """The KV dtype as vLLM's --kv-cache-dtype can serve it (the planner's table also holds weight dtypes: int8 or
    fp4 KV was sized at 1 or 0.5 bytes, then served in 16 bits). `auto`, vLLM's default, is the model's 16-bit dtype:
    fp16 for a float16 checkpoint, else bf16 (a quantized checkpoint's activations; both 2 bytes an element; found by
    review: `--kv-dtype auto`, what an operator copies from vLLM's flags, was refused)."""
    dtype = name.strip().lower()
    if dtype == "auto":
        return "fp16" if model_dtype.strip().lower() in ("fp16", "float16", "half") else "bf16"
    if dtype not in KV_DTYPES:
        raise PlanError(f"--kv-dtype {name!r}: unknown dtype for vLLM's KV cache; choose from "
                        f"{', '.join(sorted(KV_DTYPES | {'auto'}))}")
    return dtype


def weight_dtype_name(name: str) -> str:
    """The planner's one name of a weight dtype (`bfloat16` -> `bf16`, `fp8_e4m3` -> `fp8`)."""
    dtype_bytes(name)  # a PlanError naming the choices
    return WEIGHT_DTYPES.get(name.lower(), name.lower())


def dtype_bytes(name: str) -> float:
    """Bytes per element of a dtype name as vLLM's flags spell it (`--kv-cache-dtype fp8`, `--dtype bfloat16`)."""
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPE_BYTES))}") from None


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the KV arithmetic needs of a model. `params` counts weights (their memory); `hidden` and `vocab` are
    informational (0: unknown). `attention_heads` (0: unknown) bounds the tensor-parallel degrees vLLM accepts. MLA
    models set `kv_lora_rank`; sliding-window models `sliding_window` and how many of `layers` slide."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int = 0
    vocab: int = 0
    params: float = 0.0
    name: str = "model"
    kv_lora_rank: int = 0  # MLA latent size (0: standard attention)
    qk_rope_head_dim: int = 0  # MLA: the rope key stored beside the latent
    sliding_window: int = 0  # tokens a sliding layer keeps (0: none)
    sliding_layers: int = 0  # how many of `layers` slide
    attention_heads: int = 0  # query heads (0: unknown)
    weight_dtype: str = "bf16"  # the checkpoint's weights as vLLM serves them ("": a quantization it cannot read)
    active_params: float = 0.0  # weights read per token (MoE: the routed experts'); 0: all of `params`
    max_positions: int = 0  # the longest --max-model-len vLLM accepts without an override (0: unknown)
    experts: int = 0  # MoE: routed experts per layer (0: dense, or unknown)
    experts_per_token: int = 0  # MoE: experts each token is routed to
    tied_embeddings: bool = False  # lm_head shares the input embeddings (tie_word_embeddings)
    quant: QuantLayout | None = None  # a quantized checkpoint's scales, zeros and lm_head (None: not read)
    quant_split: QuantSplit | None = None  # a compressed-tensors checkpoint's quantized modules (planner_quant)

    def __post_init__(self) -> None:
        if self.layers <= 0 or min(self.params, self.hidden, self.vocab, self.attention_heads, self.active_params) < 0:
            raise PlanError(f"model {self.name!r}: layers must be positive, hidden/vocab/params/heads >= 0")
        if self.kv_lora_rank <= 0 and (self.kv_heads <= 0 or self.head_dim <= 0):
            raise PlanError(f"model {self.name!r}: KV heads and head_dim must be positive")
        if not 0 <= self.sliding_layers <= self.layers or (self.sliding_layers and self.sliding_window <= 0):
            raise PlanError(f"model {self.name!r}: sliding_layers must be within 0..layers, with a positive window")

    @property
    def params_per_token(self) -> float:
        """Weights a decode step reads per token: the active parameters of a MoE model, else all of them."""
        return self.active_params or self.params

    def params_per_step(self, batch: int) -> float:
        """Weights a decode step of `batch` sequences reads (each once, whatever the batch). Dense: all of them. MoE:
        the non-expert weights plus the union of the routed experts the batch's tokens pick, an expected share
        1 - (1 - k/E)^batch of each layer's experts with routing taken as uniform (found by review: the active
        parameters of one token were used at every batch, while at a served batch nearly every expert is read).
        The routed experts' weights come from `params - active_params = routed x (1 - k/E)`."""
        e, k = self.experts, self.experts_per_token
        if not self.active_params or not 0 < k < e or batch <= 1:
            return self.params_per_token
        routed = (self.params - self.active_params) * e / (e - k)
        return self.params - routed + routed * (1 - (1 - k / e) ** batch)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_kind(self) -> str:
        """A label for reports: which KV formula applies."""
        if self.is_mla:
            return "MLA (latent + rope key per layer)"
        if self.sliding_layers:
            return f"GQA, {self.sliding_layers}/{self.layers} layers sliding (window {self.sliding_window:,})"
        return f"GQA/MHA: {self.kv_heads} KV heads x head_dim {self.head_dim}"

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
            raw, label = source, name or str(source.get("_name_or_path") or source.get("model_type") or "model")
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise PlanError(f"cannot read a model config at {path}: {exc}") from None
            if not isinstance(raw, dict):
                raise PlanError(f"{path} does not hold a JSON object")
            label = name or path.parent.name
        # multimodal configs keep the language model under text_config; vLLM sizes the KV cache from it
        # (hf_text_config), so its keys win and the top level only fills what it leaves out (found by review: a
        # top-level model_type "paligemma" hid the text config's "gemma2" and its alternating sliding layers)
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise PlanError(f"model {label!r}: text_config must be a JSON object, got {text!r:.60}")
        cfg: dict[str, Any] = {**{k: v for k, v in raw.items() if k != "text_config"}, **text}
        for key, what in OUT_OF_SCOPE_KEYS.items():
            if cfg.get(key):
                raise PlanError(f"model {label!r}: {what} layers ({key}) are out of scope for the planner")
        for key, what in UNREAD_KV_KEYS.items():
            if cfg.get(key):
                raise PlanError(f"model {label!r}: its KV heads are set in {key} ({what}), which the planner does not "
                                "read; describe it with num_hidden_layers, num_attention_heads, num_key_value_heads "
                                "and hidden_size")
        try:
            layers = positive_int(cfg, "num_hidden_layers")
            heads = positive_int(cfg, "num_attention_heads")
            hidden = positive_int(cfg, "hidden_size")
        except KeyError as exc:
            raise PlanError(f"model config lacks {exc.args[0]!r} (needs num_hidden_layers, num_attention_heads, "
                            "hidden_size)") from None
        kv_heads = kv_heads_of(cfg, heads, raw.get("model_type"))
        head_dim = config_int(cfg, "head_dim", hidden // heads)
        window, sliding = sliding_layers_of(cfg, layers, label)
        total = estimate_params(cfg, kv_heads)
        params = cfg.get("num_parameters") or total
        if type(params) not in (int, float) or not 0 <= params < MAX_CONFIG_INT:
            raise PlanError(f"model config field 'num_parameters' must be a number >= 0, got {params!r:.60}")
        routed = estimate_params(cfg, kv_heads, active=True)  # below the total for a MoE model
        experts, per_token = routed_experts(cfg)
        return cls(layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
                   vocab=config_int(cfg, "vocab_size"), params=float(params), name=label,
                   kv_lora_rank=config_int(cfg, "kv_lora_rank"), qk_rope_head_dim=config_int(cfg, "qk_rope_head_dim"),
                   sliding_window=window, sliding_layers=sliding, attention_heads=heads,
                   weight_dtype=checkpoint_dtype(raw, text),
                   active_params=params * routed / total if 0 < routed < total else 0.0,
                   max_positions=max_positions_of(cfg), experts=experts, experts_per_token=per_token,
                   tied_embeddings=bool(cfg.get("tie_word_embeddings")), quant=checkpoint_layout(raw, text),
                   quant_split=compressed_tensors_split(raw, text, cfg))


def _preset(name: str, layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int, vocab: int,
            params: float, **extra: Any) -> ModelShape:
    return ModelShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, vocab=vocab, params=params,
                      name=name, attention_heads=heads, **extra)


# Shapes from each model's published config.json; params from its model card.
PRESETS: dict[str, ModelShape] = {p.name: p for p in (
    _preset("llama-3.1-8b", 32, 32, 8, 128, 4096, 128_256, 8.03e9, max_positions=131_072),
    _preset("llama-3.1-70b", 80, 64, 8, 128, 8192, 128_256, 70.6e9, max_positions=131_072),
    _preset("llama-3.2-3b", 28, 24, 8, 128, 3072, 128_256, 3.21e9, max_positions=131_072, tied_embeddings=True),
    _preset("qwen2.5-7b", 28, 28, 4, 128, 3584, 152_064, 7.62e9),
    _preset("qwen2.5-72b", 80, 64, 8, 128, 8192, 152_064, 72.7e9),
    _preset("qwen3-8b", 36, 32, 8, 128, 4096, 151_936, 8.19e9, max_positions=40_960),
    _preset("mistral-7b-v0.1", 32, 32, 8, 128, 4096, 32_000, 7.24e9, sliding_window=4096, sliding_layers=32,
            max_positions=32_768),
    _preset("gemma-2-9b", 42, 16, 8, 256, 3584, 256_000, 9.24e9, sliding_window=4096, sliding_layers=21,
            max_positions=8192, tied_embeddings=True),
    _preset("deepseek-v2-lite", 27, 16, 16, 128, 2048, 102_400, 15.7e9, kv_lora_rank=512, qk_rope_head_dim=64,
            active_params=2.4e9, max_positions=163_840, experts=64, experts_per_token=6),
)}


def weight_layout(shape: ModelShape, weight_dtype: str) -> QuantLayout:
    """The layout of quantized weights: the checkpoint's when planned in its own dtype, else the dtype's default."""
    name = weight_dtype_name(weight_dtype)
    return (shape.quant if name == shape.weight_dtype else None) or DEFAULT_LAYOUTS.get(name, QuantLayout())


def weights_note(shape: ModelShape, weight_dtype: str) -> str:
    """What `weight_bytes` counted for quantized weights, in words for the plan's notes."""
    layout = weight_layout(shape, weight_dtype)
    zero = f" and one {layout.zero_bits}-bit zero" if layout.zero_bits else ""
    scale = f"one {layout.scale_bytes * 8:.0f}-bit scale{zero} per"
    per = {0: "per-tensor scales", -1: f"{scale} output row"}.get(layout.group_size,
                                                                   f"{scale} {layout.group_size:,} weights")
    head = "" if shape.tied_embeddings or layout.lm_head else ", lm_head"
    split = shape.quant_split if weight_dtype_name(weight_dtype) == shape.weight_dtype else None
    if split is not None and (len(split.linears) != 1 or split.quantized_share < 1 or split.embeddings
                              or (split.lm_head is None) != bool(head)):
        groups = ", ".join(f"{share:.1%} of the linear layers' weights in {d}" for share, (d, _) in split.linears)
        tables = [n for n, q in (("embeddings", split.embeddings), ("lm_head", split.lm_head)) if q is None]
        return (f"the checkpoint's compressed-tensors targets: {groups or 'no linear layer'} (scales as its groups "
                f"say); {', '.join(['the other linear layers', *tables])} and norms in 16 bits")
    return f"{weight_dtype_name(weight_dtype)} weights: the linear layers, {per}; embeddings{head} and norms in 16 bits"


def weight_bytes(shape: ModelShape, weight_dtype: str) -> int:
    """Bytes of the model's weights served in `weight_dtype`. 16/32-bit: every parameter at that width. Quantized
    (fp8, int8, int4, fp4): only the decoder's linear layers are; GPTQ, AWQ, compressed-tensors and vLLM's FP8 leave
    the embeddings, an untied lm_head (unless the checkpoint's `quant` says otherwise) and the norms in 16 bits, and
    group-wise formats add a scale (and a zero point) per group: the checkpoint's layout when it is the checkpoint's
    dtype, else DEFAULT_LAYOUTS' (found by review: every parameter was counted at the quantized width, Llama 3.1 8B
    AWQ at 4.0 GB where its checkpoint holds 5.73 GB, FP8 at 8.03 GB where it holds 9.08 GB). Biases and MoE routers
    count as quantized weights, GPTQ's g_idx (4 bytes an input row) is left out: each well under 0.1% of a model.
    A compressed-tensors checkpoint in its own dtype counts the modules its groups target (`shape.quant_split`)."""
    per_param = dtype_bytes(weight_dtype)
    if per_param >= 2:
        return int(shape.params * per_param)
    layout = weight_layout(shape, weight_dtype)
    embeddings = shape.vocab * shape.hidden
    split = shape.quant_split if weight_dtype_name(weight_dtype) == shape.weight_dtype else None
    if split is not None:  # compressed-tensors: the modules its groups target, each at its group's width
        return _split_bytes(shape, split)
    lm_head = 0 if shape.tied_embeddings or layout.lm_head else embeddings
    kept = min(shape.params, embeddings + lm_head + (2 * shape.layers + 1) * shape.hidden)  # + 2 norms a layer
    return int((shape.params - kept) * (per_param + layout_overhead(layout, shape.hidden)) + kept * 2)


def _split_bytes(shape: ModelShape, split: QuantSplit) -> int:
    """`weight_bytes` of a compressed-tensors checkpoint: each group's share of the decoder's linear weights at its
    width and scales, the rest of them, and lm_head and the embeddings unless targeted, in 16 bits (tied: one table,
    as the embeddings are)."""
    def width(scheme: tuple[str, QuantLayout] | None) -> float:
        return 2.0 if scheme is None else dtype_bytes(scheme[0]) + layout_overhead(scheme[1], shape.hidden)

    embeddings = shape.vocab * shape.hidden
    lm_head = 0 if shape.tied_embeddings else embeddings
    kept = min(shape.params, embeddings + lm_head + (2 * shape.layers + 1) * shape.hidden)
    linear = shape.params - kept
    tables = min(embeddings, kept) * width(split.embeddings) + min(lm_head, kept - min(embeddings, kept)) * width(
        split.lm_head)
    quantized = sum(share * linear * width(scheme) for share, scheme in split.linears)
    return int(quantized + (1 - split.quantized_share) * linear * 2 + tables + max(kept - embeddings - lm_head, 0) * 2)


def layer_bytes_per_token(shape: ModelShape, kv_dtype: str) -> float:
    """KV bytes one token costs in ONE layer."""
    b = dtype_bytes(kv_dtype)
    if shape.is_mla:
        return (shape.kv_lora_rank + shape.qk_rope_head_dim) * b
    return 2 * shape.kv_heads * shape.head_dim * b


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """KV bytes per token across all layers (the guide's formula; full-context rate for sliding-window models)."""
    return int(round(shape.layers * layer_bytes_per_token(shape, kv_dtype)))


def kv_bytes_for_context(shape: ModelShape, kv_dtype: str, tokens: int, block_size: int = 16) -> int:
    """KV bytes one session of `tokens` tokens holds, in whole blocks of `block_size` tokens as vLLM allocates them
    (found by review: a 1-token session was sized at 1 token, not a block). A sliding layer holds at most its window
    rounded up to blocks plus one block: the window need not start on a block boundary (vLLM's
    SlidingWindowSpec.max_admission_blocks_per_request, cdiv(window - 1 + 1 decode token, block) + 1, at decode)."""
    if tokens < 0 or block_size <= 0:
        raise PlanError(f"context must be >= 0 tokens and block_size positive, got {tokens} and {block_size}")
    per_layer = layer_bytes_per_token(shape, kv_dtype)
    full = shape.layers - shape.sliding_layers
    held = -(-tokens // block_size) * block_size
    window = -(-shape.sliding_window // block_size) * block_size + block_size
    capped = min(held, window) if shape.sliding_layers else 0
    return int(round(per_layer * (full * held + shape.sliding_layers * capped)))


def fp8_tier_block_bytes(shape: ModelShape, kv_dtype: str, block_size: int) -> int:
    """FP8 tier bytes per KV block, as the tier connector sizes a slot: one byte per element of every layer's K and V,
    plus a float32 scale per (layer, KV head) unless the KV cache is already 8-bit (then its pages are copied raw)."""
    if shape.kv_lora_rank or shape.sliding_layers:
        raise PlanError(f"the FP8 tier supports full-attention models; {shape.name} is not one")
    raw = dtype_bytes(kv_dtype) == 1
    return shape.layers * shape.kv_heads * (block_size * 2 * shape.head_dim + (0 if raw else 4))


def kv_capacity_tokens(shape: ModelShape, kv_dtype: str, kv_bytes: int, block_size: int = 16) -> int:
    """Tokens of KV that fit in `kv_bytes`, in whole blocks of `block_size` tokens across all layers.

    For full-attention models (GQA/MHA/MLA) this is what vLLM logs as "KV cache size: N tokens" for a KV memory of
    `kv_bytes` (`VLLM_CPU_KVCACHE_SPACE`, `--kv-cache-memory-bytes`). For sliding-window models it is the pool's
    full-rate token slots; vLLM's hybrid allocator reports its size differently (out of scope here).
    """
    if block_size <= 0 or kv_bytes < 0:
        raise PlanError("block_size must be positive and kv_bytes >= 0")
    per_block = kv_bytes_per_token(shape, kv_dtype) * block_size
    return int(kv_bytes // per_block) * block_size


def tp_refusal(shape: ModelShape, tensor_parallel: int) -> str:
    """Why vLLM refuses to shard the model over `tensor_parallel` GPUs ('' if it accepts): the attention heads must
    split evenly over the ranks (ModelConfig.verify_with_parallel_config), and the KV heads either split evenly or
    each be replicated on a whole number of ranks (QKVParallelLinear). MLA's latent is on every rank: heads only."""
    if tensor_parallel <= 0:
        return "tensor_parallel must be positive"
    heads, kv = shape.attention_heads, shape.kv_heads
    if heads and heads % tensor_parallel:
        return f"{heads} attention heads do not split evenly over {tensor_parallel} GPUs"
    if not shape.is_mla and kv % tensor_parallel and tensor_parallel % kv:
        return f"{kv} KV heads neither split over nor replicate evenly on {tensor_parallel} GPUs"
    return ""


def kv_replication(shape: ModelShape, tensor_parallel: int) -> float:
    """How many times a replica of `tensor_parallel` GPUs stores each token's KV: MLA's latent is replicated on
    every rank; GQA heads are split across ranks, and replicated when there are fewer KV heads than ranks. A degree
    vLLM refuses (`tp_refusal`) is a PlanError."""
    if refusal := tp_refusal(shape, tensor_parallel):
        raise PlanError(f"model {shape.name!r}: vLLM refuses tensor parallel {tensor_parallel}: {refusal}")
    if shape.is_mla:
        return float(tensor_parallel)
    return max(shape.kv_heads, tensor_parallel) / shape.kv_heads
