"""The FP8 tier's host memory in the benchmarks' refusal of a run past this host's memory (replay_memory): a kvsched
side's tier fills while its side runs, beside its own pool and the pools of the sides still to run, at the size its
engine gives it. Found by review: `kvsched bench replay` counted the pools alone, though its `kvsched` side's tier
takes twice its pool's bytes by default."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.vllm import tier_host
from kvsched.bench import replay_memory, trace_engine
from kvsched.ops import cpu_features as features
from kvsched.tiny_model import SIZES

GIB = 2**30
TRACE = ('{"kvsched_trace": 1, "block_size": 512}\n'
         '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n'
         '{"t": 9, "session": "a", "prompt_tokens": 1536, "output_tokens": 4, "blocks": ["x", "y", "z"]}\n')
POOL_BLOCK = trace_engine.BLOCK_TOKENS * SIZES["test"].kv_bytes_per_token("bfloat16")  # 32,768 bytes
TIER_SLOT = 2 * 2 * (trace_engine.BLOCK_TOKENS * 128 + 4)  # 2 layers x 2 KV heads x (32 rows of K and V in FP8 + scale)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_tier_geometry_is_the_one_vllm_s_spec_gives_the_engine(size, dtype):
    """replay_memory sizes the tier by the geometry the engine reads from vLLM's KV cache spec (tier_layout.geometry_of
    on the FullAttentionSpec vLLM builds for a Llama layer), without starting an engine."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvsched.adapters.vllm.tier_layout import geometry_of

    shape = SIZES[size]
    spec = FullAttentionSpec(block_size=32, num_kv_heads=shape.num_key_value_heads, head_size=shape.head_dim,
                             dtype=getattr(torch, dtype))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_hidden_layers)]
    config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=names)])
    ours = replay_memory.tier_geometry(shape, dtype, 32)
    assert ours == geometry_of(config, "HND")
    assert tier_host.pool_bytes(ours, 1) == 32 * shape.kv_bytes_per_token(dtype)  # what the refusal counts a block


def args_of(tmp_path: Path, sides: str) -> argparse.Namespace:
    (path := tmp_path / "t.jsonl").write_text(TRACE)
    return argparse.Namespace(trace=path, start_s=0.0, seconds=60.0, time_scale=1.0, pressure=1.0, sides=sides,
                              max_output_tokens=4, model_size="test", out=None)


@pytest.fixture
def host(monkeypatch):
    """A bf16 CPU whose total memory the test sets (`host.total`), with 64 GiB available (the default tier's 1/4 of
    available memory never binds)."""
    monkeypatch.setattr(features, "cpu_features", lambda: features.CpuFeatures("x86_64", True, True, True, False))
    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)
    state = SimpleNamespace(total=64 * GIB)
    monkeypatch.setattr(tier_host, "host_memory", lambda: (state.total, 64 * GIB))
    return state


def test_the_tier_sides_tier_is_counted_as_it_fills(tmp_path, host, monkeypatch):
    n = trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks
    tier = 2 * n * POOL_BLOCK // TIER_SLOT * TIER_SLOT  # the default rule: 2x the pool's bytes, in whole FP8 slots
    host.total = n * POOL_BLOCK + tier - 1  # the pool fits, the pool and its full tier do not
    with pytest.raises(ValueError, match=rf"makes a pool of {n} blocks, {n} blocks in all .*, "
                                         rf"{(n * POOL_BLOCK + tier) / GIB:.1f} GiB of KV cache: past this host's .* "
                                         r"\(while side kvsched runs: .* its FP8 tier full, .* GiB by its size, "
                                         r"auto: "):
        trace_engine.prepare(args_of(tmp_path, "kvsched"))
    host.total += 1
    assert trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks == n  # exactly enough: taken
    host.total -= 1
    assert trace_engine.prepare(args_of(tmp_path, "kvsched-no-tier")).num_blocks == n  # no tier: the pool alone
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "0")  # the tier off as the engine reads it
    assert trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks == n


def test_a_tier_size_asked_for_is_counted_at_that_size(tmp_path, host, monkeypatch):
    n = trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "1")
    slots = GIB // TIER_SLOT * TIER_SLOT  # the GiB's whole slots, as the engine makes them
    host.total = n * POOL_BLOCK + slots - 1
    with pytest.raises(ValueError, match=r"its FP8 tier full, 1\.0 GiB by its size, 1 GiB asked\)"):
        trace_engine.prepare(args_of(tmp_path, "kvsched"))
    host.total += 1
    assert trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks == n


def test_a_side_s_tier_is_counted_beside_the_later_sides_pools_only(tmp_path, host):
    """The sides run in the order given, each server stopped after its side: run last, the tier side's tier fills
    after the same-memory side's server (3x the pool) has stopped."""
    n = trace_engine.prepare(args_of(tmp_path, "kvsched")).num_blocks
    same = trace_engine.same_memory_blocks(n)
    tier = 2 * n * POOL_BLOCK // TIER_SLOT * TIER_SLOT
    host.total = (n + same) * POOL_BLOCK + tier // 2  # both pools and half the tier
    with pytest.raises(ValueError, match=rf"{n + same} blocks in all .* \(while side kvsched runs: {n + same} blocks "
                                         r"of pools still held"):
        trace_engine.prepare(args_of(tmp_path, "kvsched,stock-same-memory"))
    assert trace_engine.prepare(args_of(tmp_path, "stock-same-memory,kvsched")).num_blocks == n
