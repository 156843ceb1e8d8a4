"""The planner's KV capacity against what a real vLLM engine allocates (CPU backend, `VLLM_CPU_KVCACHE_SPACE`).

vLLM reports its pool twice at start-up: the INFO log line "CPU KV cache size: N tokens" (v1/core/kv_cache_utils.py,
`update_kv_cache_capacity`) and the `vllm:cache_config_info` gauge whose labels carry `num_gpu_blocks` and
`block_size`. Both are read; the planner must agree with them within 2%.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.core.planner import GIB, ModelShape, kv_capacity_tokens  # noqa: E402
from kvsched.ops.cpu_features import cpu_features  # noqa: E402
from kvsched.serving import ServerSpec, VllmServer  # noqa: E402

pytestmark = pytest.mark.integration
BLOCK = 32
LOG_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
INFO_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')


def vllm_kv_tokens(model_dir: Path, kv_gib: int, extra_args: list[str]) -> tuple[int, int]:
    """(tokens from the start-up log, blocks x block size from /metrics) of a vLLM engine on `model_dir`."""
    spec = ServerSpec(model=model_dir, scheduler=None, max_model_len=512, block_size=BLOCK, kv_cache_gib=kv_gib,
                      env={"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)},
                      dtype="bfloat16", extra_args=extra_args)
    with VllmServer(spec) as server:
        infos = [k for k in server.metrics() if k.startswith("vllm:cache_config_info{")]
    log = server.log_path.read_text(errors="replace")
    match = LOG_LINE.search(log)
    assert match, server.log_tail()
    blocks = {int(m.group(1)) for k in infos if (m := INFO_BLOCKS.search(k))}
    assert len(blocks) == 1, infos
    return int(match.group(1).replace(",", "")), blocks.pop() * BLOCK


def check(shape: ModelShape, kv_dtype: str, kv_gib: int, logged: int, from_metrics: int) -> None:
    predicted = kv_capacity_tokens(shape, kv_dtype, kv_gib * GIB, block_size=BLOCK)
    print(f"\n{shape.name}: KV {kv_dtype}, {kv_gib} GiB -> planner {predicted:,} tokens, vLLM log {logged:,}, "
          f"vLLM metrics {from_metrics:,} ({(logged - predicted) / predicted:+.3%})")
    assert logged == from_metrics
    assert abs(predicted - logged) <= 0.02 * predicted, (predicted, logged)


def test_tiny_model_capacity_matches_vllm(tiny_model_dir):
    shape = ModelShape.from_hf_config(tiny_model_dir, name="tiny-test")
    check(shape, "bf16", 1, *vllm_kv_tokens(tiny_model_dir, 1, []))


def test_config_only_llama_capacity_matches_vllm(tiny_model_dir, tmp_path):
    """A Llama shape vLLM has never seen, with no weights (`--load-format dummy` fills them), and an FP8 KV cache
    where the CPU backend supports one (AVX-512 or AMX, as vLLM checks)."""
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=6,
               intermediate_size=2048)
    cfg.pop("head_dim", None)  # derived: hidden / heads = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_hf_config(tmp_path, name="config-only-llama")
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (6, 4, 64)
    kv_dtype = "fp8" if cpu_features().fp8_kv_cache else "bf16"
    extra = ["--load-format", "dummy", "--kv-cache-dtype", "fp8"] if kv_dtype == "fp8" else ["--load-format", "dummy"]
    check(shape, kv_dtype, 2, *vllm_kv_tokens(tmp_path, 2, extra))
