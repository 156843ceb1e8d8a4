"""Weight bytes of quantized checkpoints (found by review: every parameter was counted at the quantized width). GPTQ,
AWQ, compressed-tensors and vLLM's FP8 quantize the decoder's linear layers only: the embeddings, an untied lm_head
and the norms stay in 16 bits, and group-wise formats store a scale (and a zero point) per group. Expected figures
are worked by hand and checked against published checkpoint sizes (safetensors totals on the Hugging Face hub)."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.core.planner import ModelShape, dtype_bytes, weight_bytes
from kvsched.core.planner_fleet import Workload, plan

# Llama 3.1 8B's and Llama 2 70B's published config.json shapes
LLAMA31_8B = {"model_type": "llama", "vocab_size": 128_256, "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14_336,
              "tie_word_embeddings": False, "torch_dtype": "float16"}
LLAMA2_70B = {**LLAMA31_8B, "vocab_size": 32_000, "hidden_size": 8192, "num_hidden_layers": 80,
              "num_attention_heads": 64, "intermediate_size": 28_672}
EMB_8B = 128_256 * 4096  # embed_tokens, and as many in the untied lm_head
NORMS_8B = (2 * 32 + 1) * 4096
# hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4's quantization_config
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
# llm-compressor's FP8 checkpoints (neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8): per-tensor scales, lm_head ignored
CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                           "strategy": "tensor", "symmetric": True}}}}


def shape(cfg, quant=None):
    return ModelShape.from_hf_config({**cfg, **({"quantization_config": quant} if quant else {})})


def checkpoint_bytes(cfg, quant):
    s = shape(cfg, quant)
    return weight_bytes(s, s.weight_dtype)


def test_an_awq_int4_checkpoint_counts_its_scales_zeros_and_16_bit_embeddings():
    """Linear layers at 4 bits + a 16-bit scale and a 4-bit zero per 128 weights; embeddings, lm_head and norms at 2 B.
    The published checkpoint holds 5.73 GB (4.68 + 1.05 GB); every parameter at 4 bits is 4.02 GB."""
    s = shape(LLAMA31_8B, AWQ)
    kept = 2 * EMB_8B + NORMS_8B
    expected = (s.params - kept) * (0.5 + (2 + 0.5) / 128) + kept * 2
    assert weight_bytes(s, "int4") == pytest.approx(expected, abs=1)
    assert expected / 1e9 == pytest.approx(5.73, rel=0.005)
    assert s.params * 0.5 / 1e9 == pytest.approx(4.015, rel=0.001)  # the old count, 30% short


@pytest.mark.parametrize(("group", "published_gb"), [(128, 36.65), (-1, 35.33), (32, 40.66), (64, 37.99)])
def test_gptq_group_sizes_against_published_checkpoints(group, published_gb):
    """TheBloke/Llama-2-70B-chat-GPTQ's branches: 4 bits, group sizes 128, none (one scale per output row), 32 and
    64; GPTQ stores a packed 4-bit zero per group even when symmetric."""
    quant = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": True}
    assert checkpoint_bytes(LLAMA2_70B, quant) / 1e9 == pytest.approx(published_gb, rel=0.005)


def test_an_fp8_checkpoint_keeps_a_16_bit_lm_head():
    """neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8 holds 9.08 GB (5 + 4.08 GB), not 8.03: its lm_head is ignored by the
    quantization and its embeddings are not a Linear layer. An `ignore` without lm_head quantizes it too."""
    s = shape(LLAMA31_8B, CT_FP8)
    assert weight_bytes(s, "fp8") == pytest.approx(s.params + 2 * EMB_8B + NORMS_8B, abs=1)
    assert weight_bytes(s, "fp8") / 1e9 == pytest.approx(9.08, rel=0.002)
    quantized_head = checkpoint_bytes(LLAMA31_8B, {**CT_FP8, "ignore": []})
    assert weight_bytes(s, "fp8") - quantized_head == pytest.approx(EMB_8B, abs=1)  # lm_head at 1 byte, not 2


def test_vllm_online_fp8_of_a_16_bit_checkpoint_keeps_the_embeddings_in_16_bits():
    """`--weight-dtype fp8` on a preset is served with --quantization fp8: linear layers only, per-tensor scales."""
    l8 = ModelShape.from_preset("llama-3.1-8b")
    assert plan(l8, Workload(workflows=1), "fp8", "fp8").weights_bytes == int(8.03e9 + 2 * EMB_8B + NORMS_8B)
    assert plan(l8, Workload(workflows=1), "fp8", "bf16").weights_bytes == int(8.03e9 * 2)  # 16-bit: unchanged


def test_tied_embeddings_are_counted_once():
    """Llama 3.2 3B ties lm_head to its embeddings: one 128,256 x 3,072 table in 16 bits."""
    l3 = ModelShape.from_preset("llama-3.2-3b")
    kept = 128_256 * 3072 + (2 * 28 + 1) * 3072
    assert weight_bytes(l3, "int4") == pytest.approx((3.21e9 - kept) * (0.5 + 2.5 / 128) + kept * 2, abs=1)


@pytest.mark.parametrize(("weights", "per_weight"), [
    ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}, 0.5 + 2 / 128),
    ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False}, 0.5 + 2.5 / 128),
    ({"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}, 1 + 2 / 4096),  # a scale per row
    ({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}, 0.5 + 1 / 16),  # NVFP4
    ({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}, 1 + 2 / 128**2),
])
def test_compressed_tensors_layouts(weights, per_weight):
    quant = {**CT_FP8, "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    s = shape(LLAMA31_8B, quant)
    kept = 2 * EMB_8B + NORMS_8B
    assert weight_bytes(s, s.weight_dtype) == pytest.approx((s.params - kept) * per_weight + kept * 2, abs=1)


@pytest.mark.parametrize(("quant", "per_weight", "head_quantized"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, 0.5 + 2.5 / 128, True),  # GPTQModel
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": False}, 0.5 + 2 / 64, False),  # old AutoAWQ
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, 1 + 3 / 128, False),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, 1 + 4 / 128**2, False),  # DeepSeek-V3 style blocks
])
def test_gptq_awq_and_fp8_layouts(quant, per_weight, head_quantized):
    s = shape(LLAMA31_8B, quant)
    kept = (1 if head_quantized else 2) * EMB_8B + NORMS_8B
    assert weight_bytes(s, s.weight_dtype) == pytest.approx((s.params - kept) * per_weight + kept * 2, abs=1)


def test_another_dtype_than_the_checkpoints_takes_that_dtypes_default_layout():
    """An AWQ int4 checkpoint planned at --weight-dtype int8 is not its layout: GPTQ's group of 128 with 8-bit zeros."""
    s = shape(LLAMA31_8B, {**AWQ, "zero_point": False})
    kept = 2 * EMB_8B + NORMS_8B
    assert weight_bytes(s, "int8") == pytest.approx((s.params - kept) * (1 + 3 / 128) + kept * 2, abs=1)
    assert weight_bytes(s, "fp32") == int(s.params * dtype_bytes("fp32"))


def planned(capsys, model_dir, quantization_config: dict) -> dict:
    """`kvsched plan --model DIR --json`'s plan for Llama 3.1 8B's config.json with `quantization_config`."""
    (model_dir / "config.json").write_text(json.dumps({**LLAMA31_8B, "quantization_config": quantization_config}))
    assert main(["plan", "--model", str(model_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["plan"]


def test_kvsched_plan_reports_an_awq_checkpoints_bytes(capsys, tmp_path):
    p = planned(capsys, tmp_path, AWQ)
    assert p["weight_dtype"] == "int4" and p["weights_bytes"] / 1e9 == pytest.approx(5.73, rel=0.005)
    assert ("int4 weights: the linear layers, one 16-bit scale and one 4-bit zero per 128 weights; embeddings, lm_head "
            "and norms in 16 bits") in p["notes"]
