"""The plugin asks for the AMX permission vLLM's CPU attention needs and never asks for (plugin._allow_amx_tiles).

Found by review: the tiny model's `vllm serve` (any scheduler, either worker layout) died with SIGILL (exit code -4)
at a first prompt of at most 4 tokens on an AMX Xeon: vLLM 0.32's "amx" attention ran tile instructions before any
kernel had asked Linux for them (arch_prctl ARCH_REQ_XCOMP_PERM). Each case runs in a fresh process: the permission is
process-wide and, once held, cannot be dropped."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import pytest

from kvsched.ops.cpu_features import cpu_features
from tests import ahead
from tests.ahead import Run

pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(not cpu_features().amx, reason="needs an AMX CPU (vLLM's 'amx' attention ISA)")

# vLLM's CPU attention on a 4-token prefill, the ISA vLLM picks for a bf16 model with 32-token blocks on this CPU.
ATTENTION = """
import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

dt, heads, kv_heads, dim, block, blocks, tokens = torch.bfloat16, 4, 2, 64, 32, 8, 4
isa = _get_attn_isa(dt, block, dim)
assert isa == "amx", isa
k_cache, v_cache = torch.zeros(blocks, kv_heads, block * 2, dim, dtype=dt).chunk(2, dim=2)
q = torch.randn(tokens, heads, dim, dtype=dt)
k, v = (torch.randn(tokens, kv_heads, dim, dtype=dt) for _ in range(2))
starts, lens = torch.tensor([0, tokens], dtype=torch.int32), torch.tensor([tokens], dtype=torch.int32)
table = torch.arange(blocks, dtype=torch.int32).view(1, blocks)
meta = ops.cpu_attn_get_scheduler_metadata(
    num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=lens, dtype=dt,
    query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, torch.arange(tokens, dtype=torch.int64), isa)
out = torch.empty(tokens, heads, dim, dtype=dt)
ops.cpu_attention_with_kv_cache(
    query=q, key_cache=k_cache, value_cache=v_cache, output=out, query_start_loc=starts, seq_lens=lens,
    scale=dim ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
    scheduler_metadata=meta, s_aux=None)
assert torch.isfinite(out.float()).all()
print("attention ran")
"""
REGISTER = "from kvsched.adapters.vllm.plugin import register\nregister()\n"


def run(code: str) -> Callable[[], Run | None]:
    return lambda: Run([sys.executable, "-c", code]) if cpu_features().amx else None


TEST = "test_vllm_attention_dies_without_the_permission_and_runs_after_the_plugin_loads"
AHEAD = {f"{TEST}:bare": run(ATTENTION), f"{TEST}:loaded": run(REGISTER + ATTENTION)}  # tests/ahead.py


def test_vllm_attention_dies_without_the_permission_and_runs_after_the_plugin_loads() -> None:
    bare = ahead.result(sys.modules[__name__], f"{TEST}:bare", timeout_s=120)
    # vLLM still runs its tiles unasked: if this fails, vLLM asks for itself now and _allow_amx_tiles can go
    assert bare.returncode == -signal.SIGILL, (bare.returncode, bare.stderr[-2000:])
    loaded = ahead.result(sys.modules[__name__], f"{TEST}:loaded", timeout_s=120)
    assert loaded.returncode == 0 and "attention ran" in loaded.stdout, loaded.stderr[-2000:]
