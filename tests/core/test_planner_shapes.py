"""Model shapes read as vLLM reads them (found by review): the text config of a multimodal model, the KV-head keys of
Falcon, ChatGLM and friends, and the tensor-parallel degrees vLLM accepts. Expected values are worked by hand from
each config."""

from __future__ import annotations

from kvsched.core.planner import ModelShape

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


def test_the_top_level_fills_what_the_text_config_leaves_out():
    text = {k: v for k, v in GEMMA2_2B_TEXT.items() if k != "vocab_size"}
    assert ModelShape.from_hf_config({"vocab_size": 257_152, "text_config": text}).vocab == 257_152
