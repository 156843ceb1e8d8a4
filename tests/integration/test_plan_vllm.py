"""The planner's KV capacity against what a real vLLM engine allocates (CPU backend, `VLLM_CPU_KVCACHE_SPACE`).

vLLM reports its pool twice at start-up: the INFO log line "CPU KV cache size: N tokens" (v1/core/kv_cache_utils.py,
`update_kv_cache_capacity`) and the `vllm:cache_config_info` gauge whose labels carry `num_gpu_blocks` and
`block_size`. Both are read; the planner must agree with them within 2%.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.core.planner import GIB, ModelShape, kv_capacity_tokens  # noqa: E402
from kvsched.serving import ServerSpec, VllmServer  # noqa: E402
from tests.integration import early  # noqa: E402
from tests.integration.conftest import launch_meanwhile, started_early  # noqa: E402
from tests.integration.servers import PLAN_BLOCK, config_only_llama, plan_kv_spec, plan_specs  # noqa: E402, F401

pytestmark = pytest.mark.integration
BLOCK = PLAN_BLOCK
LOG_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
INFO_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')


def kv_spec(model_dir: Path, kv_gib: int, extra_args: list[str]) -> ServerSpec:
    return plan_kv_spec(model_dir, kv_gib, extra_args)


def kv_tokens(server: VllmServer) -> tuple[int, int]:
    """(tokens from the start-up log, blocks x block size from /metrics) of a started vLLM engine."""
    infos = [k for k in server.metrics() if k.startswith("vllm:cache_config_info{")]
    log = server.log_path.read_text(errors="replace")
    match = LOG_LINE.search(log)
    assert match, server.log_tail()
    blocks = {int(m.group(1)) for k in infos if (m := INFO_BLOCKS.search(k))}
    assert len(blocks) == 1, infos
    return int(match.group(1).replace(",", "")), blocks.pop() * BLOCK


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory, stock_server, request):
    """The tiny model with 1 GiB of bf16 KV cache (the package's stock vLLM, conftest.stock_server: its pool sized by
    vLLM, INFO log), and the config-only Llama with 2 GiB of FP8 KV cache where the CPU backend supports one (AVX-512
    or AMX), else bf16 (servers.plan_specs: spawned as test_fp8_tier's servers stopped, early.py, else now)."""
    specs, kv_dtype = plan_specs(tiny_model_dir, tmp_path_factory.mktemp("config-only-llama"))
    assert stock_server.spec.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and stock_server.spec.num_blocks is None
    assert stock_server.spec.dtype == "bfloat16" and stock_server.spec.block_size == BLOCK
    launch_meanwhile(request, "serve_launched")  # test_serve's server: its start-up overlaps this one's
    with started_early(early.PLAN, specs) as named:
        other = named["config-only"]
        yield {"tiny": kv_tokens(stock_server), "config-only": (other.spec.model, kv_dtype, kv_tokens(other))}


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
