"""The planner's KV capacity against what a real vLLM engine allocates (CPU backend, `VLLM_CPU_KVCACHE_SPACE`)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

pytest.importorskip("vllm")

from kvsched.core.planner import GIB, ModelShape, kv_capacity_tokens  # noqa: E402
from kvsched.serving import ServerSpec, VllmServer  # noqa: E402

pytestmark = pytest.mark.integration
BLOCK = 32


def vllm_kv_tokens(model_dir, extra_args=()):
    spec = ServerSpec(model=model_dir, scheduler=None, max_model_len=512, block_size=BLOCK, kv_cache_gib=1,
                      env={"VLLM_LOGGING_LEVEL": "INFO"}, extra_args=["--dtype", "bfloat16", *extra_args])
    with VllmServer(spec) as server:
        pass
    match = re.search(r"KV cache size: ([\d,]+) tokens", server.log_path.read_text())
    assert match, server.log_tail()
    return int(match.group(1).replace(",", ""))


def test_tiny_model_capacity_matches_vllm(tiny_model_dir):
    shape = ModelShape.from_hf_config(tiny_model_dir)
    predicted = kv_capacity_tokens(shape, "bf16", 1 * GIB, block_size=BLOCK)
    assert abs(predicted - vllm_kv_tokens(tiny_model_dir)) <= 0.02 * predicted


def test_config_only_llama_capacity_matches_vllm(tiny_model_dir, tmp_path):
    # A Llama shape vLLM has never seen, no weights: vLLM fills them with --load-format dummy.
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=6,
               intermediate_size=2048)
    cfg.pop("head_dim", None)  # derived: hidden / heads = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_hf_config(tmp_path)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (6, 4, 64)
    predicted = kv_capacity_tokens(shape, "bf16", 1 * GIB, block_size=BLOCK)
    measured = vllm_kv_tokens(tmp_path, ["--load-format", "dummy"])
    assert abs(predicted - measured) <= 0.02 * predicted, (predicted, measured)
