"""Which weights a compressed-tensors checkpoint quantizes, and how: its config groups' `targets` and its `ignore`
matched against the model's module names and classes as compressed-tensors matches them (compressed_tensors 0.17,
`utils/match.py`: a target is a module name, `re:` and a regex `re.match`ed from the name's start, or a class name in
the module's MRO; a module is quantized when some group's target matches it and no `ignore` entry does; of several
matching targets the first of the exact names, then the regexes, then the classes, each sorted, picks the group,
`quantization/lifecycle/apply.py`). vLLM reads the same fields (`compressed_tensors/utils.py`).

Found by review: every decoder linear layer was counted as quantized and lm_head unless `ignore` named it, so a
checkpoint quantizing only its attention (`targets: ["re:.*self_attn.*"]`) was counted at a fifth of its MLP bytes,
and one ignoring layers beyond lm_head (by name or regex) or mixing int4 and int8 groups at the heaviest width.

The model's modules are named as Hugging Face's Llama-style decoders name them (`model.layers.N.self_attn.q_proj`,
`.mlp.gate_proj`, MoE `.mlp.experts.E.up_proj` and `.mlp.shared_experts.` (Qwen2-MoE `.shared_expert.`), Mixtral's
`.block_sparse_moe.experts.E.w1`; `model.language_model.` (or `language_model.model.`: `_naming`) for a multimodal
config's text model; `lm_head`, `model.embed_tokens`), with the parameter counts `planner_config.estimate_params`
gives them (MLA's projections counted as plain attention, routers and norms not at all). Pure functions of the config
dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvsched.core.planner_config import (
    COMPRESSED_TENSORS,
    PlanError,
    QuantLayout,
    config_int,
    kv_heads_of,
    quant_config_of,
    weights_layout,
)

LINEAR = ("Linear", "Module")  # torch.nn.Linear's MRO, as `_match_class` reads it
EMBEDDING = ("Embedding", "Module")
Scheme = tuple[str, QuantLayout]  # a group's weight dtype and layout


@dataclass(frozen=True, slots=True)
class QuantSplit:
    """What a compressed-tensors checkpoint quantizes: `linears`, each group's share of the decoder's linear weights
    (0..1) with its scheme; `lm_head` and `embeddings`: their scheme, None when they stay in 16 bits."""

    linears: tuple[tuple[float, Scheme], ...] = ()
    lm_head: Scheme | None = None
    embeddings: Scheme | None = None

    @property
    def quantized_share(self) -> float:
        return sum(share for share, _ in self.linears)


class _Matcher:
    """One list of targets (or ignores), matched as compressed-tensors matches a module: exact names, then regexes,
    then classes, each in sorted order (`match_targets`)."""

    def __init__(self, targets: list[str], what: str) -> None:
        self.exact = {t for t in targets if not t.startswith("re:")}  # module names and class names alike
        try:
            self.regexes = [(t, re.compile(t[3:])) for t in sorted(t for t in targets if t.startswith("re:"))]
        except re.error as exc:
            raise PlanError(f"compressed-tensors {what}: {exc.pattern!r} is not a regular expression ({exc})") from None
        self.by_class: dict[tuple[str, ...], str | None] = {
            kind: min((c for c in kind if c in self.exact), default=None) for kind in (LINEAR, EMBEDDING)}

    def first(self, name: str, classes: tuple[str, ...]) -> str | None:
        if name in self.exact:
            return name
        for target, regex in self.regexes:
            if regex.match(name):
                return target
        return self.by_class[classes]  # the first in sorted order


def _strings(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise PlanError(f"compressed-tensors {what} must be a list of strings, got {value!r:.60}")
    return items


# Module names (decoder layers, lm_head, embeddings) of a text model, and of a multimodal one's text model as
# transformers >= 4.52 names it, then as earlier versions did (Llava, Mistral3, Gemma3: `language_model.model.layers`,
# `language_model.lm_head`): a checkpoint's targets and ignore name them as the version that quantized it did.
TEXT_NAMES = ("model.layers", "lm_head", "model.embed_tokens")
MULTIMODAL_NAMES = (("model.language_model.layers", "lm_head", "model.language_model.embed_tokens"),
                    ("language_model.model.layers", "language_model.lm_head", "language_model.model.embed_tokens"))


def _naming(cfg: dict[str, Any], multimodal: bool, entries: list[str]) -> tuple[str, str, str]:
    """The naming under which more of the config's `entries` (targets and ignore) name a module; the newer on a tie.
    Found by review: only the newer was read, so a checkpoint ignoring `language_model.lm_head` (Mistral Small 3.1's
    FP8) was counted with its lm_head quantized, 0.5 GB short on an 8B text model (before: any ignore entry holding
    "lm_head" kept it in 16 bits)."""
    if not multimodal:
        return TEXT_NAMES
    names = [{n for n, _ in _modules(cfg, naming[0])} | set(naming[1:]) for naming in MULTIMODAL_NAMES]
    regexes = [re.compile(e[3:]) for e in entries if e.startswith("re:")]  # valid: the matchers compiled them
    exact = [e for e in entries if not e.startswith("re:")]

    def hits(i: int) -> int:
        return sum(e in names[i] for e in exact) + sum(any(r.match(n) for n in names[i]) for r in regexes)

    return MULTIMODAL_NAMES[max(range(len(MULTIMODAL_NAMES)), key=lambda i: (hits(i), -i))]


def _modules(cfg: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """(name, parameters) of every decoder linear layer, its layers under `prefix`, in the terms `estimate_params`
    counts."""
    h, layers = config_int(cfg, "hidden_size"), config_int(cfg, "num_hidden_layers")
    heads = config_int(cfg, "num_attention_heads")
    kv, hd = kv_heads_of(cfg, heads, cfg.get("model_type")), config_int(cfg, "head_dim", h // max(heads, 1))
    inter = config_int(cfg, "intermediate_size", 4 * h)
    experts = (config_int(cfg, "num_local_experts") or config_int(cfg, "n_routed_experts")
               or config_int(cfg, "num_experts"))
    mixtral = cfg.get("model_type") == "mixtral"
    projections = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    shared_name = "shared_expert" if cfg.get("model_type") == "qwen2_moe" else "shared_experts"
    moe_inter = config_int(cfg, "moe_intermediate_size", inter)
    shared = config_int(cfg, "n_shared_experts")
    attention = (("q_proj", h * heads * hd), ("k_proj", h * kv * hd), ("v_proj", h * kv * hd),
                 ("o_proj", h * heads * hd))
    for i in range(layers):
        layer = f"{prefix}.{i}"
        for proj, n in attention:
            yield f"{layer}.self_attn.{proj}", n
        if not experts:
            for proj in projections:
                yield f"{layer}.mlp.{proj}", h * inter
            continue
        block = f"{layer}.block_sparse_moe" if mixtral else f"{layer}.mlp"
        for e in range(experts):
            for proj in projections:
                yield f"{block}.experts.{e}.{proj}", h * moe_inter
        if shared:
            for proj in projections:
                yield f"{block}.{shared_name}.{proj}", h * moe_inter * shared


def compressed_tensors_split(raw: dict[str, Any], text: dict[str, Any], cfg: dict[str, Any]) -> QuantSplit | None:
    """The QuantSplit of a compressed-tensors config (`cfg`: the merged text config); None for another quantization,
    or a group whose weights the planner cannot read (compressed_tensors_dtype then names no dtype)."""
    quant = quant_config_of(raw, text)
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    groups = quant.get("config_groups")
    target_scheme: dict[str, Scheme] = {}  # a target named by several groups is the last one's (an OrderedDict's)
    for gname, group in groups.items() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            return None
        bits, kind = weights.get("num_bits", 8), str(weights.get("type", "int")).lower()
        dtype = COMPRESSED_TENSORS.get((bits, kind), "") if type(bits) is int else ""
        if not dtype:
            return None
        # compressed-tensors requires a group's targets; one without is read as llm-compressor's presets' ["Linear"],
        # an empty list as it is: no module (found by review: `or` read it as ["Linear"] too)
        targets = group.get("targets")
        for target in _strings(["Linear"] if targets is None else targets, f"targets of {gname}"):
            target_scheme[target] = (dtype, weights_layout(weights))
    targets = _Matcher(list(target_scheme), "targets")
    ignored = _strings(quant.get("ignore") or [], "ignore")
    ignore = _Matcher(ignored, "ignore")
    layers, head, embed = _naming(cfg, bool(raw.get("text_config")), [*target_scheme, *ignored])

    def scheme(name: str, classes: tuple[str, ...]) -> Scheme | None:
        target = targets.first(name, classes)
        return None if target is None or ignore.first(name, classes) is not None else target_scheme[target]

    by_target: dict[str, float] = {}  # parameters by the target that picked their group
    total = 0.0
    for name, n in _modules(cfg, layers):
        total += n
        picked = targets.first(name, LINEAR)
        if picked is not None and ignore.first(name, LINEAR) is None:
            by_target[picked] = by_target.get(picked, 0.0) + n
    by_scheme: dict[Scheme, float] = {}
    for target, n in by_target.items():
        by_scheme[target_scheme[target]] = by_scheme.get(target_scheme[target], 0.0) + n
    return QuantSplit(tuple((n / total, s) for s, n in by_scheme.items()) if total else (),
                      scheme(head, LINEAR), scheme(embed, EMBEDDING))
