"""Weight bytes of compressed-tensors checkpoints that do not quantize every linear layer: their config groups'
`targets` and their `ignore` are matched against the model's modules as compressed-tensors matches them (exact name,
`re:` regex from the name's start, class; kvsched.core.planner_quant). Found by review: every decoder linear layer was
counted quantized, lm_head too unless `ignore` named it, and mixed groups at the heaviest width. Figures by hand from
Llama 3.1 8B's and Mixtral 8x7B's published shapes (parameters as the planner estimates them)."""

from __future__ import annotations

import pytest

from kvsched.core.planner import ModelShape, PlanError, weight_bytes
from tests.core.test_planner_weights import EMB_8B, LLAMA31_8B, NORMS_8B, planned

ATTN = 2 * 4096 * 4096 + 2 * 4096 * 1024  # q, o; k, v (8 KV heads of 128) in one Llama 3.1 8B layer
MLP = 3 * 4096 * 14_336
FP8_ROW = 1 + 2 / 4096  # FP8 with a 16-bit scale per output row (strategy channel)
W4_G128 = 0.5 + 2 / 128  # symmetric int4, a 16-bit scale per 128 weights


def ct(groups, ignore):
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ignore,
            "config_groups": {f"group_{i}": {"targets": t, "weights": w} for i, (t, w) in enumerate(groups)}}


FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
W4A16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}


def bytes_of(cfg, quant):
    s = ModelShape.from_hf_config({**cfg, "quantization_config": quant})
    return s, weight_bytes(s, s.weight_dtype)


def test_attention_only_targets_leave_the_mlps_in_16_bits():
    """`targets: ["re:.*self_attn.*"]`: q/k/v/o at FP8 (a fifth of the linear weights), the MLPs, lm_head and the
    embeddings in 16 bits. Counted before as if every linear layer were FP8: 5.64 GB short."""
    s, got = bytes_of(LLAMA31_8B, ct([(["re:.*self_attn.*"], FP8_CHANNEL)], ["lm_head"]))
    linear = s.params - 2 * EMB_8B - NORMS_8B
    share = ATTN / (ATTN + MLP)
    assert got == pytest.approx(linear * (share * FP8_ROW + (1 - share) * 2) + (2 * EMB_8B + NORMS_8B) * 2, abs=2)
    assert got / 1e9 == pytest.approx(14.72, abs=0.005)
    assert got - (linear * FP8_ROW + (2 * EMB_8B + NORMS_8B) * 2) == pytest.approx(5.64e9, rel=0.002)


def test_lm_head_is_quantized_only_when_a_target_names_it():
    """With attention-only targets and an empty `ignore`, lm_head (a Linear the regex does not match) stays in 16
    bits; the class target `Linear` does take it."""
    attention_only = ct([(["re:.*self_attn.*"], FP8_CHANNEL)], [])
    with_ignore = ct([(["re:.*self_attn.*"], FP8_CHANNEL)], ["lm_head"])
    assert bytes_of(LLAMA31_8B, attention_only)[1] == bytes_of(LLAMA31_8B, with_ignore)[1]
    every_linear = bytes_of(LLAMA31_8B, ct([(["Linear"], FP8_CHANNEL)], []))[1]
    assert bytes_of(LLAMA31_8B, ct([(["Linear"], FP8_CHANNEL)], ["re:.*lm_head"]))[1] - every_linear == \
        pytest.approx(EMB_8B * (2 - FP8_ROW), abs=2)


@pytest.mark.parametrize("ignore", [
    ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.31.mlp.down_proj"],  # by name
    ["lm_head", "re:model\\.layers\\.(0|31)\\.mlp\\.down_proj$"],  # by regex
])
def test_an_ignore_beyond_lm_head_keeps_those_layers_in_16_bits(ignore):
    """A W4A16 checkpoint keeping its first and last layers' down_proj in 16 bits. (Within 2e-6: the planner takes the
    ignored layers' share of the linear weights, whose estimate leaves the norms out.)"""
    s, got = bytes_of(LLAMA31_8B, ct([(["Linear"], W4A16)], ignore))
    linear = s.params - 2 * EMB_8B - NORMS_8B
    kept_down = 2 * 4096 * 14_336
    expected = (linear - kept_down) * W4_G128 + kept_down * 2 + (2 * EMB_8B + NORMS_8B) * 2
    assert got == pytest.approx(expected, rel=2e-6)
    assert got - bytes_of(LLAMA31_8B, ct([(["Linear"], W4A16)], ["lm_head"]))[1] == pytest.approx(
        kept_down * (2 - W4_G128), rel=1e-3)  # counted as quantized before


def test_mixed_groups_count_each_at_its_own_width():
    """int4 MLPs beside int8 attention: each group at its width (before: all of it at the heaviest, int8). A regex
    target wins over the class target `Linear` (compressed-tensors' order: names, regexes, classes)."""
    mixed = ct([(["re:.*mlp.*"], W4A16), (["re:.*self_attn.*"], INT8_CHANNEL)], ["lm_head"])
    s, got = bytes_of(LLAMA31_8B, mixed)
    linear, rest = s.params - 2 * EMB_8B - NORMS_8B, (2 * EMB_8B + NORMS_8B) * 2
    share = ATTN / (ATTN + MLP)
    expected = linear * (share * FP8_ROW + (1 - share) * W4_G128) + rest  # int8 per row: as FP8's bytes
    assert got == pytest.approx(expected, abs=2)
    assert got < linear * FP8_ROW + rest  # the old count, every linear layer at int8
    by_class = ct([(["Linear"], W4A16), (["re:.*self_attn.*"], INT8_CHANNEL)], ["lm_head"])
    assert bytes_of(LLAMA31_8B, by_class)[1] == pytest.approx(expected, abs=2)


MIXTRAL = {"model_type": "mixtral", "vocab_size": 32_000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14_336, "num_local_experts": 8,
           "num_experts_per_tok": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_expert_only_targets_of_a_moe_model():
    """Mixtral's experts (`block_sparse_moe.experts.E.w1/w2/w3`) at FP8, its attention in 16 bits, routers ignored."""
    quant = ct([(["re:.*block_sparse_moe\\.experts.*"], FP8_CHANNEL)], ["lm_head", "re:.*block_sparse_moe.gate"])
    s, got = bytes_of(MIXTRAL, quant)
    emb, norms = 32_000 * 4096, 65 * 4096
    experts = 8 * 3 * 4096 * 14_336
    linear, share = s.params - 2 * emb - norms, experts / (experts + ATTN)
    assert got == pytest.approx(linear * (share * FP8_ROW + (1 - share) * 2) + (2 * emb + norms) * 2, abs=2)


def test_a_group_with_empty_targets_quantizes_nothing():
    """`targets: []` matches no module in compressed-tensors (and vLLM: no layer takes the group's scheme). Found by
    review: read as ["Linear"] like a group without the key, it counted Llama 3.1 8B's MLPs at int4 beside FP8
    attention (6.35 GB for 14.72)."""
    attention = ct([(["re:.*self_attn.*"], FP8_CHANNEL)], ["lm_head"])
    with_empty = ct([(["re:.*self_attn.*"], FP8_CHANNEL), ([], W4A16)], ["lm_head"])
    assert bytes_of(LLAMA31_8B, with_empty)[1] == bytes_of(LLAMA31_8B, attention)[1]
    s, got = bytes_of(LLAMA31_8B, ct([([], FP8_CHANNEL)], ["lm_head"]))
    assert got == s.params * 2  # every weight in 16 bits
    without_key = ct([(["Linear"], FP8_CHANNEL)], ["lm_head"])
    del without_key["config_groups"]["group_0"]["targets"]  # a group without the key still reads as ["Linear"]
    assert bytes_of(LLAMA31_8B, without_key)[1] == bytes_of(LLAMA31_8B, ct([(["Linear"], FP8_CHANNEL)], ["lm_head"]))[1]


def multimodal(quant):
    """Llama 3.1 8B's shapes as a Mistral3-style multimodal config's text model."""
    return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
            "text_config": {**LLAMA31_8B, "model_type": "mistral"}, "vision_config": {"hidden_size": 1024},
            "quantization_config": quant}


@pytest.mark.parametrize("ignore", [
    ["language_model.lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"],  # transformers < 4.52's names
    ["lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"],  # >= 4.52's
    ["re:.*lm_head"],
])
def test_a_multimodal_checkpoints_ignore_names_its_modules_as_it_was_quantized(ignore):
    """Found by review: a multimodal checkpoint quantized under transformers < 4.52 names its text model's modules
    `language_model.model.layers.N...` and its head `language_model.lm_head`; only the newer names were read, so
    ignoring `language_model.lm_head` (as Mistral Small 3.1's FP8 checkpoint does) counted the head at FP8: 8.56 GB
    for 9.08 (before 0112849 any ignore entry holding "lm_head" kept it in 16 bits)."""
    s = ModelShape.from_hf_config(multimodal(ct([(["Linear"], FP8_CHANNEL)], ignore)))
    assert s.quant_split.lm_head is None
    assert weight_bytes(s, s.weight_dtype) == bytes_of(LLAMA31_8B, ct([(["Linear"], FP8_CHANNEL)], ["lm_head"]))[1]


def test_a_multimodal_checkpoints_older_layer_names_are_matched():
    """Attention-only targets by a regex of the older names: as by the newer ones, the MLPs in 16 bits."""
    old = ct([(["re:language_model\\.model\\.layers\\.\\d+\\.self_attn.*"], FP8_CHANNEL)],
             ["language_model.lm_head"])
    new = ct([(["re:model\\.language_model\\.layers\\.\\d+\\.self_attn.*"], FP8_CHANNEL)],
             ["lm_head"])
    got = [ModelShape.from_hf_config(multimodal(q)) for q in (old, new)]
    assert [weight_bytes(s, s.weight_dtype) for s in got] == [bytes_of(LLAMA31_8B, ct([(["re:.*self_attn.*"],
                                                                        FP8_CHANNEL)], ["lm_head"]))[1]] * 2


def test_a_target_that_is_not_a_regular_expression_is_a_plan_error():
    with pytest.raises(PlanError, match="not a regular expression"):
        bytes_of(LLAMA31_8B, ct([(["re:.*self_attn(.*"], FP8_CHANNEL)], []))


def test_kvsched_plan_reports_an_attention_only_checkpoints_bytes(capsys, tmp_path):
    p = planned(capsys, tmp_path, ct([(["re:.*self_attn.*"], FP8_CHANNEL)], ["lm_head"]))
    assert p["weight_dtype"] == "fp8" and p["weights_bytes"] / 1e9 == pytest.approx(14.72, abs=0.005)
    assert ("the checkpoint's compressed-tensors targets: 19.2% of the linear layers' weights in fp8 (scales as its "
            "groups say); the other linear layers, embeddings, lm_head and norms in 16 bits") in p["notes"]
