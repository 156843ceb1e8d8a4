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
from tests.integration.conftest import launch_meanwhile  # noqa: E402
from tests.vllm_layout import worker  # noqa: E402

pytestmark = pytest.mark.integration
BLOCK = 32
LOG_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
INFO_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')


def kv_spec(model_dir: Path, kv_gib: int, extra_args: list[str]) -> ServerSpec:
    return ServerSpec(model=model_dir, scheduler=None, max_model_len=512, block_size=BLOCK, kv_cache_gib=kv_gib,
                      env={"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)},
                      dtype="bfloat16", extra_args=extra_args, worker=worker())


def kv_tokens(server: VllmServer) -> tuple[int, int]:
    """(tokens from the start-up log, blocks x block size from /metrics) of a started vLLM engine."""
    infos = [k for k in server.metrics() if k.startswith("vllm:cache_config_info{")]
    log = server.log_path.read_text(errors="replace")
    match = LOG_LINE.search(log)
    assert match, server.log_tail()
    blocks = {int(m.group(1)) for k in infos if (m := INFO_BLOCKS.search(k))}
    assert len(blocks) == 1, infos
    return int(match.group(1).replace(",", "")), blocks.pop() * BLOCK


def config_only_llama(tiny_model_dir: Path, out: Path) -> Path:
    """A Llama shape vLLM has never seen, with no weights (`--load-format dummy` fills them)."""
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=6,
               intermediate_size=2048)
    cfg.pop("head_dim", None)  # derived: hidden / heads = 64
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory, stock_server, request):
    """The tiny model with 1 GiB of bf16 KV cache (the package's stock vLLM, conftest.stock_server: its pool sized by
    vLLM, INFO log), and the config-only Llama with 2 GiB of FP8 KV cache where the CPU backend supports one (AVX-512
    or AMX), else bf16."""
    config_only = config_only_llama(tiny_model_dir, tmp_path_factory.mktemp("config-only-llama"))
    kv_dtype = "fp8" if cpu_features().fp8_kv_cache else "bf16"
    extra = ["--load-format", "dummy", "--kv-cache-dtype", "fp8"] if kv_dtype == "fp8" else ["--load-format", "dummy"]
    assert stock_server.spec.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and stock_server.spec.num_blocks is None
    assert stock_server.spec.dtype == "bfloat16" and stock_server.spec.block_size == BLOCK
    launch_meanwhile(request, "serve_launched")  # test_serve's server: its start-up overlaps this one's
    with VllmServer(kv_spec(config_only, 2, extra)) as other:
        yield {"tiny": kv_tokens(stock_server), "config-only": (config_only, kv_dtype, kv_tokens(other))}


def check(shape: ModelShape, kv_dtype: str, kv_gib: int, logged: int, from_metrics: int) -> None:
    predicted = kv_capacity_tokens(shape, kv_dtype, kv_gib * GIB, block_size=BLOCK)
    print(f"\n{shape.name}: KV {kv_dtype}, {kv_gib} GiB -> planner {predicted:,} tokens, vLLM log {logged:,}, "
          f"vLLM metrics {from_metrics:,} ({(logged - predicted) / predicted:+.3%})")
    assert logged == from_metrics
    assert abs(predicted - logged) <= 0.02 * predicted, (predicted, logged)


def test_tiny_model_capacity_matches_vllm(tiny_model_dir, engines):
    shape = ModelShape.from_hf_config(tiny_model_dir, name="tiny-test")
    check(shape, "bf16", 1, *engines["tiny"])


def test_config_only_llama_capacity_matches_vllm(engines):
    """A Llama shape vLLM has never seen, with no weights, and an FP8 KV cache where the CPU backend supports one."""
    model_dir, kv_dtype, tokens = engines["config-only"]
    shape = ModelShape.from_hf_config(model_dir, name="config-only-llama")
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (6, 4, 64)
    check(shape, kv_dtype, 2, *tokens)
