"""`kvsched bench replay`'s refusal of a pool past the host's memory (trace_engine.prepare, replay_memory), on what the
run really allocates: every side's server starts at once and keeps its --num-gpu-blocks-override pool (allocated
whole) until its side has run (`serving.start_all`), in the dtype the tiny model is built in, float32 on a CPU
without native bf16. Found by review: only the largest pool, in bf16, was checked, so the default four sides (about 6
pools' worth at once) passed on a host that held half of them, and an AVX2 host's float32 pools passed at half their
size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvsched.bench import replay_memory, trace_engine
from kvsched.ops import cpu_features as features
from kvsched.tiny_model import SIZES

TRACE = ('{"kvsched_trace": 1, "block_size": 512}\n'
         '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n'
         '{"t": 9, "session": "a", "prompt_tokens": 1536, "output_tokens": 4, "blocks": ["x", "y", "z"]}\n')
BF16_BLOCK = trace_engine.BLOCK_TOKENS * SIZES["test"].kv_bytes_per_token("bfloat16")  # a pool block's bytes


def args_of(tmp_path: Path, sides: str) -> argparse.Namespace:
    (path := tmp_path / "t.jsonl").write_text(TRACE)
    return argparse.Namespace(trace=path, start_s=0.0, seconds=60.0, time_scale=1.0, pressure=1.0, sides=sides,
                              max_output_tokens=4, model_size="test", out=None)


def test_the_sides_pools_are_counted_together_as_their_servers_run_at_once(tmp_path, monkeypatch):
    sides = ",".join(trace_engine.SIDES)
    monkeypatch.setattr(features, "cpu_features", lambda: features.CpuFeatures("x86_64", True, True, True, False))
    n = trace_engine.prepare(args_of(tmp_path, sides)).num_blocks
    same = trace_engine.same_memory_blocks(n)
    # a host holding the same-memory side's pool with room to spare, but not the four pools at once
    monkeypatch.setattr(replay_memory, "host_memory_bytes", lambda: int(1.5 * same * BF16_BLOCK))
    with pytest.raises(ValueError, match=rf"makes a pool of {same} blocks, {3 * n + same} blocks in all \(every "
                                         r"side's server runs at once\), .* GiB of KV cache: past this host's"):
        trace_engine.prepare(args_of(tmp_path, sides))
    assert trace_engine.prepare(args_of(tmp_path, "stock-same-memory")).num_blocks == n  # that pool alone fits


def test_a_cpu_without_native_bf16_counts_its_float32_pools_at_their_size(tmp_path, monkeypatch):
    """On such a CPU `ensure_tiny_model` builds (and the server serves) the model in float32: 4 bytes an element."""
    monkeypatch.setattr(features, "cpu_features", lambda: features.CpuFeatures("x86_64", True, False, False, False))
    n = trace_engine.prepare(args_of(tmp_path, "stock")).num_blocks  # the real host holds it
    monkeypatch.setattr(replay_memory, "host_memory_bytes", lambda: int(1.5 * n * BF16_BLOCK))
    with pytest.raises(ValueError, match=rf"makes a pool of {n} blocks, {n} blocks in all"):
        trace_engine.prepare(args_of(tmp_path, "stock"))


def test_a_side_named_twice_is_one_server_and_one_pool(tmp_path, monkeypatch):
    """`run_benchmark` starts one server a side name (a dict of them): "stock,stock" is one pool, not two."""
    monkeypatch.setattr(features, "cpu_features", lambda: features.CpuFeatures("x86_64", True, True, True, False))
    n = trace_engine.prepare(args_of(tmp_path, "stock")).num_blocks
    monkeypatch.setattr(replay_memory, "host_memory_bytes", lambda: int(1.5 * n * BF16_BLOCK))
    assert trace_engine.prepare(args_of(tmp_path, "stock,stock")).num_blocks == n
