"""Reading a Hugging Face `config.json` as vLLM reads it: the integers the KV arithmetic needs, KV heads by family,
sliding-window layers, the longest context accepted, the checkpoint's weight dtype and quantization layout (scales,
zero points, lm_head) and a parameter estimate. Split from `planner` (which re-exports `PlanError`); pure functions of
the config dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class PlanError(ValueError):
    """Input the planner cannot plan with (unknown preset, missing config fields, impossible numbers)."""


LAYER_KINDS = ("full_attention", "sliding_attention")
# KV heads as vLLM reads them (vllm/transformers_utils/model_arch_config_convertor.py, get_total_num_kv_heads): the
# first of these keys the config sets, else every attention head. Falcon's first decoder with multi_query has one.
KV_HEAD_KEYS = ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num", "num_attention_groups")
FALCON_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")
# One name per weight dtype
WEIGHT_DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "half": "fp16", "fp16": "fp16",
                 "bfloat16": "bf16", "bf16": "bf16", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "int8": "int8",
                 "fp4": "fp4", "int4": "int4"}


def positive_int(cfg: dict[str, Any], key: str) -> int:
    value = cfg[key]
    if type(value) is not int or not 0 < value < MAX_CONFIG_INT:
        raise PlanError(f"model config field {key!r} must be a positive integer, got {value!r}")
    return value


MAX_CONFIG_INT = 2**53  # past any layer, head or parameter count; exact in a float


def config_int(cfg: dict[str, Any], key: str, default: int = 0) -> int:
    """An optional integer field of a HF config (absent, null or 0: `default`). A string, bool, fraction, negative or
    inf is a PlanError naming the field: the KV arithmetic would otherwise fail with a bare ValueError/OverflowError."""
    value = cfg.get(key)
    if not value:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 < value < MAX_CONFIG_INT:
        raise PlanError(f"model config field {key!r} must be a positive integer, got {value!r:.60}")
    return value


MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
UNSCALED_ROPE = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def max_positions_of(cfg: dict[str, Any]) -> int:
    """The longest --max-model-len vLLM accepts for a config (0: unknown), as its _get_and_verify_max_len derives it:
    the smallest of its length keys (Command-R's model_max_length overrides them), times a RoPE scaling factor whose
    type does not already include it."""
    limit = config_int(cfg, "model_max_length") or min((config_int(cfg, k) for k in MAX_LEN_KEYS if cfg.get(k)),
                                                        default=0)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if limit and isinstance(rope, dict) and "gemma3" not in str(cfg.get("model_type")) \
            and (rope.get("rope_type") or rope.get("type")) not in UNSCALED_ROPE \
            and type(rope.get("factor")) in (int, float) and rope["factor"] > 0:
        limit = int(limit * rope["factor"])
    return limit


FP8_METHODS = ("fp8", "fbgemm_fp8")  # vLLM's Fp8Config, FBGEMMFp8Config: FP8 weights
# compressed-tensors weights by (num_bits, type) of a config group's "weights" (CompressedTensorsConfig reads
# config_groups.*.weights as QuantizationArgs: num_bits, type "int" or "float")
COMPRESSED_TENSORS = {(8, "float"): "fp8", (8, "int"): "int8", (4, "int"): "int4", (4, "float"): "fp4"}
WEIGHT_BYTES_ORDER = ("fp4", "int4", "int8", "fp8")  # the last of several is the heaviest


def checkpoint_dtype(raw: dict[str, Any], text: dict[str, Any]) -> str:
    """The weight dtype vLLM serves a checkpoint in without flags: a pre-quantized FP8 one stays FP8 (quant_method
    fp8 or fbgemm_fp8), GPTQ/AWQ-style ones keep their `bits`, compressed-tensors ones their config groups' weights
    (found by review: those common FP8 checkpoints were refused), others by their `dtype`/`torch_dtype` (float32
    downcast to bf16; absent: bf16), top level first, as vLLM reads them. '' for a quantization whose weight bytes the
    planner cannot tell."""
    quant = quant_config_of(raw, text)
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "")).lower()
        if method in FP8_METHODS:
            return "fp8"
        if method == "compressed-tensors":
            return compressed_tensors_dtype(quant)
        return {4: "int4", 8: "int8"}.get(quant_bits(quant), "")
    for c in (raw, text):
        dtype = c.get("dtype") or c.get("torch_dtype")
        if isinstance(dtype, str) and dtype.lower() in WEIGHT_DTYPES:  # fp32: vLLM's --dtype auto downcasts it
            return "bf16" if WEIGHT_DTYPES[dtype.lower()] == "fp32" else WEIGHT_DTYPES[dtype.lower()]
    return "bf16"


@dataclass(frozen=True, slots=True)
class QuantLayout:
    """What a quantized checkpoint stores beside its linear layers' bits: a `scale_bytes` scale, and `zero_bits` of
    zero point when asymmetric (GPTQ always stores them), per `group_size` weights (-1: one per output row; 0: per
    tensor, not counted). `lm_head`: quantized too (GPTQ's `lm_head`, a compressed-tensors `ignore` not naming it);
    the embeddings never are (not Linear layers)."""

    group_size: int = 0
    scale_bytes: float = 2.0
    zero_bits: int = 0
    lm_head: bool = False


# A quantized weight dtype asked for without a checkpoint that says its layout: GPTQ/AWQ's group of 128 with 16-bit
# scales and packed zeros (int), vLLM's per-tensor FP8 (--quantization fp8), NVFP4's 16 weights per FP8 scale.
DEFAULT_LAYOUTS = {"int4": QuantLayout(128, 2.0, 4), "int8": QuantLayout(128, 2.0, 8), "fp8": QuantLayout(),
                   "fp4": QuantLayout(16, 1.0)}


def quant_config_of(raw: dict[str, Any], text: dict[str, Any]) -> Any:
    return raw.get("quantization_config") or raw.get("compression_config") or text.get("quantization_config")


def checkpoint_layout(raw: dict[str, Any], text: dict[str, Any]) -> QuantLayout | None:
    """The QuantLayout of a config's `quantization_config` (None: not quantized, or unreadable): FP8's per-tensor,
    per-channel (fbgemm) or `weight_block_size` scales in float32; GPTQ/AWQ's `group_size`, their zeros packed at
    `bits` (AWQ only with `zero_point`); compressed-tensors per `compressed_tensors_layout`."""
    quant = quant_config_of(raw, text)
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method", "")).lower()
    if method in FP8_METHODS:
        block = quant.get("weight_block_size")
        if isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block):
            return QuantLayout(block[0] * block[1], 4.0)
        return QuantLayout(-1 if method == "fbgemm_fp8" else 0, 4.0)
    if method == "compressed-tensors":
        return compressed_tensors_layout(quant)
    bits, group = quant_bits(quant), quant.get("group_size", quant.get("q_group_size", 128))
    if bits not in (4, 8) or type(group) is not int or group < -1:
        return None
    zeros = 0 if method == "awq" and quant.get("zero_point") is False else bits
    return QuantLayout(group, 2.0, zeros, quant.get("lm_head") is True)


def quant_bits(quant: dict[str, Any]) -> int:
    """A GPTQ/AWQ-style config's weight bits (`bits`, old AutoAWQ configs' `w_bit`, as vLLM's AWQConfig reads them)."""
    bits = quant.get("bits", quant.get("w_bit"))
    return bits if type(bits) is int else 0


CT_SCALES = {"tensor": 0, "channel": -1}  # compressed-tensors strategies without a group size


def compressed_tensors_layout(quant: dict[str, Any]) -> QuantLayout | None:
    """The heaviest config group's layout (as compressed_tensors_dtype picks the heaviest dtype): `strategy` group
    (16-bit scales per `group_size`), tensor_group (NVFP4: FP8 scales per group), channel, block (one per
    `block_structure`) or tensor; zero points at `num_bits` unless `symmetric`. lm_head is quantized unless `ignore`
    names it."""
    groups = quant.get("config_groups")
    layouts: list[tuple[int, float, QuantLayout]] = []
    ignore = quant.get("ignore") or []
    lm_head = not any("lm_head" in str(name) for name in (ignore if isinstance(ignore, list) else [ignore]))
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            return None
        bits, layout = weights.get("num_bits", 8), weights_layout(weights, lm_head)
        layouts.append((bits if type(bits) is int else 0, layout_overhead(layout, 4096), layout))
    return max(layouts, key=lambda t: t[:2])[2] if layouts else None


def weights_layout(weights: dict[str, Any], lm_head: bool = False) -> QuantLayout:
    """The QuantLayout of one compressed-tensors config group's `weights` (QuantizationArgs)."""
    bits, strategy = weights.get("num_bits", 8), str(weights.get("strategy") or "tensor").lower()
    size, block = weights.get("group_size"), weights.get("block_structure")
    if strategy in ("group", "tensor_group") and type(size) is int and size > 0:
        per = size
    elif strategy == "block" and isinstance(block, list) and all(type(b) is int and b > 0 for b in block):
        per = math.prod(block)
    else:
        per = CT_SCALES.get(strategy, 0)
    zeros = 0 if weights.get("symmetric", True) else bits if type(bits) is int else 0
    return QuantLayout(per, 1.0 if strategy == "tensor_group" else 2.0, zeros, lm_head)


def layout_overhead(layout: QuantLayout, row: int) -> float:
    """Bytes of scales and zeros per quantized weight; a per-row scale spreads over `row` weights (0: unknown)."""
    per = row if layout.group_size == -1 else layout.group_size
    return (layout.scale_bytes + layout.zero_bits / 8) / per if per > 0 else 0.0


def compressed_tensors_dtype(quant: dict[str, Any]) -> str:
    """The weights of a compressed-tensors checkpoint: each config group's `weights` (num_bits, type); groups that
    differ (e.g. int4 MLPs beside int8 attention) count as the heaviest, an over- rather than an under-estimate. ''
    when a group's weights are not one of COMPRESSED_TENSORS (or there are none)."""
    groups = quant.get("config_groups")
    found: set[str] = set()
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            return ""
        bits, kind = weights.get("num_bits", 8), str(weights.get("type", "int")).lower()  # QuantizationArgs' defaults
        dtype = COMPRESSED_TENSORS.get((bits, kind), "") if type(bits) is int else ""
        if not dtype:
            return ""
        found.add(dtype)
    return max(found, key=WEIGHT_BYTES_ORDER.index) if found else ""


def kv_heads_of(cfg: dict[str, Any], heads: int, model_type: Any = None) -> int:
    """KV heads of a HF config as vLLM counts them (found by review: only num_key_value_heads was read, so Falcon-7B's
    one multi-query head counted as 71). `model_type`: the top-level one, which picks vLLM's convertor."""
    if model_type in FALCON_TYPES and not cfg.get("new_decoder_architecture", False) \
            and cfg.get("multi_query", True):  # transformers' FalconConfig defaults multi_query to true
        return 1
    key = next((k for k in KV_HEAD_KEYS if cfg.get(k) is not None), None)
    return heads if key is None else config_int(cfg, key, heads)


def sliding_layers_of(cfg: dict[str, Any], layers: int, label: str = "model") -> tuple[int, int]:
    """(window, number of sliding layers) of a HF config, following each family's convention."""
    window = config_int(cfg, "sliding_window")
    types = cfg.get("layer_types")
    if isinstance(types, list):
        unknown = sorted({str(t) for t in types} - set(LAYER_KINDS))
        if unknown:
            raise PlanError(f"model {label!r}: layer types {unknown} are out of scope for the planner "
                            f"(it handles {', '.join(LAYER_KINDS)})")
        if len(types) != layers:
            raise PlanError(f"model {label!r}: {len(types)} layer_types for {layers} layers")
        sliding = sum(1 for t in types if t == "sliding_attention")
        if sliding and not window:
            raise PlanError(f"model {label!r}: sliding layers but no sliding_window")
        return (window, sliding) if sliding else (0, 0)
    if not window:
        return 0, 0
    if "use_sliding_window" in cfg:  # Qwen2/3: layers from max_window_layers on slide, if enabled at all
        if not cfg["use_sliding_window"]:
            return 0, 0
        sliding = max(0, layers - config_int(cfg, "max_window_layers"))
    elif cfg.get("sliding_window_pattern"):  # Gemma 3, Cohere 2: every pattern-th layer is global
        sliding = layers - layers // config_int(cfg, "sliding_window_pattern")
    elif cfg.get("model_type") == "gemma2":  # alternating, the even layers slide
        sliding = math.ceil(layers / 2)
    else:  # Mistral v0.1 style: every layer slides
        sliding = layers
    return (window, sliding) if sliding else (0, 0)


def routed_experts(cfg: dict[str, Any]) -> tuple[int, int]:
    """(routed experts per MoE layer, experts each token is routed to) of a config; (0, 0) for a dense model."""
    experts = (config_int(cfg, "num_local_experts") or config_int(cfg, "n_routed_experts")
               or config_int(cfg, "num_experts"))
    per_token = config_int(cfg, "num_experts_per_tok") or config_int(cfg, "num_experts_per_token")
    return (experts, min(per_token, experts)) if experts else (0, 0)


def estimate_params(cfg: dict[str, Any], kv_heads: int | None = None, active: bool = False) -> float:
    """Decoder parameters from a config (embeddings + attention + gated MLP, MoE experts counted; `active`: only the
    experts each token is routed to), for configs that do not state them. An estimate: norms and biases are ignored,
    MLA projections counted as plain attention."""
    h, layers = config_int(cfg, "hidden_size"), config_int(cfg, "num_hidden_layers")
    heads = config_int(cfg, "num_attention_heads")
    kv = kv_heads or kv_heads_of(cfg, heads, cfg.get("model_type"))
    hd = config_int(cfg, "head_dim", h // heads)
    inter = config_int(cfg, "intermediate_size", 4 * h)
    vocab = config_int(cfg, "vocab_size", 32_000)
    experts, per_token = routed_experts(cfg)
    if experts and active:
        experts = per_token or experts
    if experts:
        moe_inter = config_int(cfg, "moe_intermediate_size", inter)
        mlp = 3 * h * moe_inter * (experts + config_int(cfg, "n_shared_experts"))
    else:
        mlp = 3 * h * inter
    attn = h * heads * hd * 2 + h * kv * hd * 2
    emb = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return float(emb + layers * (attn + mlp))
