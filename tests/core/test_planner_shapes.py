"""Model shapes read as vLLM reads them (found by review): the text config of a multimodal model, the KV-head keys of
Falcon, ChatGLM and friends, and the tensor-parallel degrees vLLM accepts. Expected values are worked by hand from
each config."""

from __future__ import annotations

import math

import pytest

from kvsched.core.planner import (
    GIB,
    ModelShape,
    PlanError,
    kv_bytes_for_context,
    kv_bytes_per_token,
    kv_replication,
    tp_refusal,
)
from kvsched.core.planner_fleet import Gpu, Workload, plan

GEMMA2_2B_TEXT = {"model_type": "gemma2", "hidden_size": 2304, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 256, "num_hidden_layers": 26, "sliding_window": 4096, "intermediate_size": 9216,
                  "vocab_size": 256_000}


def test_a_multimodal_config_is_sized_from_its_text_config():
    """PaliGemma 2: the top level says paligemma (hidden 2048, its own vocab); the language model under
    text_config is Gemma 2 (hidden 2304), whose even layers slide. vLLM sizes the cache from the text config."""
    raw = {"model_type": "paligemma", "hidden_size": 2048, "vocab_size": 257_152, "text_config": GEMMA2_2B_TEXT}
    s = ModelShape.from_hf_config(raw)
    assert (s.hidden, s.vocab, s.layers, s.kv_heads, s.head_dim) == (2304, 256_000, 26, 4, 256)
    assert (s.sliding_layers, s.sliding_window) == (13, 4096)  # gemma2 alternates: 26 / 2 layers slide
    assert s.attention_kind.startswith("GQA, 13/26 layers sliding")
    # 32K tokens in bf16: 13 full layers hold all of them, 13 sliding ones the 4,096-token window and one block more
    per_layer = 2 * 4 * 256 * 2  # K and V x 4 KV heads x head_dim 256 x 2 bytes = 4,096 B per token and layer
    assert kv_bytes_for_context(s, "bf16", 32_768) == per_layer * (13 * 32_768 + 13 * (4096 + 16))


def test_the_top_level_fills_what_the_text_config_leaves_out():
    text = {k: v for k, v in GEMMA2_2B_TEXT.items() if k != "vocab_size"}
    assert ModelShape.from_hf_config({"vocab_size": 257_152, "text_config": text}).vocab == 257_152


def falcon(**extra):
    return {"model_type": "falcon", "num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544,
            "vocab_size": 65_024, **extra}


@pytest.mark.parametrize(("cfg", "kv_heads", "bf16_bytes_per_token"), [
    # Falcon-7B: the first decoder with multi-query attention keeps ONE KV head; head_dim 4544 / 71 = 64
    (falcon(multi_query=True, new_decoder_architecture=False), 1, 32 * 2 * 1 * 64 * 2),
    (falcon(), 1, 32 * 2 * 1 * 64 * 2),  # transformers' FalconConfig: multi_query defaults to true
    (falcon(multi_query=False), 71, 32 * 2 * 71 * 64 * 2),  # plain MHA
    # Falcon-40B: the new decoder ignores multi_query and reads num_kv_heads; head_dim 8192 / 128 = 64
    ({"model_type": "falcon", "num_hidden_layers": 60, "num_attention_heads": 128, "hidden_size": 8192,
      "num_kv_heads": 8, "multi_query": True, "new_decoder_architecture": True}, 8, 60 * 2 * 8 * 64 * 2),
    # ChatGLM: multi_query_group_num; head_dim 4096 / 32 = 128
    ({"model_type": "chatglm", "num_hidden_layers": 28, "num_attention_heads": 32, "hidden_size": 4096,
      "multi_query_group_num": 2}, 2, 28 * 2 * 2 * 128 * 2),
    # vLLM's key order: n_head_kv before num_key_value_heads
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "n_head_kv": 4,
      "num_key_value_heads": 2}, 4, 2 * 2 * 4 * 64 * 2),
])
def test_kv_heads_are_read_with_vllms_keys_and_falcon_rule(cfg, kv_heads, bf16_bytes_per_token):
    s = ModelShape.from_hf_config(cfg)
    assert s.kv_heads == kv_heads and kv_bytes_per_token(s, "bf16") == bf16_bytes_per_token


@pytest.mark.parametrize("extra", [{"attn_config": {"kv_n_heads": 8}}, {"block_configs": [{"attention": {}}]}])
def test_kv_heads_the_planner_cannot_read_are_refused(extra):
    with pytest.raises(PlanError, match=next(iter(extra))):
        ModelShape.from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, **extra})


@pytest.mark.parametrize(("heads", "kv_heads", "accepted"), [
    (28, 4, (1, 2, 4)),  # Qwen2.5-7B: 28 heads do not split over 8 GPUs (28 % 8 = 4)
    (40, 10, (1, 2)),  # Phi-3-medium: 10 KV heads neither split over nor replicate evenly on 4 or 8 GPUs
    (71, 1, (1,)),  # Falcon-7B: 71 heads, a prime
    (64, 8, (1, 2, 4, 8)),  # Llama 3.1 70B
])
def test_only_the_tensor_parallel_degrees_vllm_accepts(heads, kv_heads, accepted):
    s = ModelShape(layers=1, kv_heads=kv_heads, head_dim=128, attention_heads=heads)
    assert tuple(tp for tp in (1, 2, 4, 8) if not tp_refusal(s, tp)) == accepted
    for tp in {1, 2, 4, 8} - set(accepted):
        with pytest.raises(PlanError, match="refuses tensor parallel"):
            kv_replication(s, tp)


def test_a_fit_never_uses_a_degree_vllm_refuses():
    """Phi-3-medium's shape (40 layers, 40 heads, 10 KV heads, head_dim 128), 14e9 parameters in bf16, 16 sessions of
    128K tokens on 80 GiB GPUs at 90% with 15% overhead. TP 4 would need the fewest GPUs; vLLM refuses it."""
    cfg = {"num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10, "hidden_size": 5120,
           "num_parameters": 14e9}
    s = ModelShape.from_hf_config(cfg)
    (fit,) = plan(s, Workload(workflows=16, context=131_072), "bf16", "bf16", gpus=[Gpu("g", 80, 1.0)]).fits
    session_gib = 40 * 2 * 10 * 128 * 2 * 131_072 / GIB  # 25 GiB
    per_replica = math.floor((2 * 80 * 0.9 / 1.15 - 28e9 / GIB) / session_gib)  # TP 2: (125.2 - 26.1) / 25 = 3
    assert per_replica == 3
    assert (fit.tensor_parallel, fit.sessions_per_replica, fit.replicas, fit.gpus) == (2, 3, 6, 12)


@pytest.mark.parametrize(("tokens", "held"), [
    (1, 16), (16, 16), (17, 32), (8192 + 5 * 500, 10_704),  # whole blocks of 16: 669 x 16 = 10,704
])
def test_a_session_holds_whole_blocks(tokens, held):
    llama8b = ModelShape.from_preset("llama-3.1-8b")
    assert kv_bytes_for_context(llama8b, "fp8", tokens) == held * 32 * 2 * 8 * 128  # 65,536 B per token in FP8
    assert kv_bytes_for_context(llama8b, "fp8", tokens, block_size=32) == -(-tokens // 32) * 32 * 65_536


def test_a_sliding_layer_holds_its_window_and_one_block():
    """A 1,000-token window: 63 blocks of 16 (1,008 tokens) plus the block the window's start spills into."""
    s = ModelShape(layers=1, kv_heads=1, head_dim=64, sliding_window=1000, sliding_layers=1)
    per_token = 2 * 1 * 64 * 2  # K and V x 1 head x head_dim 64 x 2 bytes (bf16)
    assert kv_bytes_for_context(s, "bf16", 900) == 912 * per_token
    assert kv_bytes_for_context(s, "bf16", 1_010) == 1_024 * per_token
    assert kv_bytes_for_context(s, "bf16", 100_000) == (1_008 + 16) * per_token


LLAMA = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "max_position_embeddings": 8192}


@pytest.mark.parametrize(("extra", "limit"), [
    ({}, 8192),
    ({"n_positions": 4096}, 4096),  # the smallest of vLLM's length keys
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 32_768),  # vLLM scales the limit by the factor
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 8192),  # Llama 3.1: already in max_position_embeddings
    ({"max_position_embeddings": None}, 0),  # unknown: not checked
])
def test_the_longest_max_model_len_vllm_accepts(extra, limit):
    assert ModelShape.from_hf_config({**LLAMA, **extra}).max_positions == limit


def test_a_session_longer_than_the_model_accepts_is_warned_about_naming_both():
    s = ModelShape.from_hf_config(LLAMA)
    assert not [n for n in plan(s, Workload(workflows=1, context=8192), "bf16").notes if "max_position" in n]
    (note,) = [n for n in plan(s, Workload(workflows=1, context=8000, tool_calls=1, tool_tokens=500), "bf16").notes
               if "max_position" in n]
    assert "8,500 tokens" in note and "max_position_embeddings (8,192" in note and "vLLM refuses" in note
