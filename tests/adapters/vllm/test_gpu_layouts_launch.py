"""Triton launches for GPU KV caches, checked on the CPU: the device a launch runs on, and element offsets past 2**31
(an H100's cache for a small model holds more than 2**31 elements per layer; a 32-bit product of block id and block
stride wraps there and reads or writes another block's memory, or faults)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from kvsched.ops import backends, fp8, score
from tests import ahead
from tests.ahead import Run

ROOT = Path(__file__).resolve().parents[3]


def test_a_cuda_tensor_launches_on_its_own_device_and_a_cpu_tensor_changes_nothing() -> None:
    ctx = backends.on_device_of(NS(device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # built without touching CUDA
    assert not isinstance(backends.on_device_of(torch.zeros(1)), torch.cuda.device)


def test_every_triton_launch_runs_on_the_device_of_its_tensors(monkeypatch) -> None:
    """Found by review: Triton launches on the current device, not its arguments'; the wrappers made no device
    current, so a cache on cuda:1 with cuda:0 current ran on cuda:0 with cuda:1's pointers."""
    entered: list[torch.Tensor] = []
    launched: list[tuple[str, bool]] = []
    inside = [False]

    @contextmanager
    def on_device_of(t):
        entered.append(t)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    def kernel(name):
        def run(*args):
            launched.append((name, inside[0]))
            if name == "gather_quantize":
                c = args[0]
                return (torch.zeros((args[1].numel(), *c.shape[1:]), dtype=fp8.FP8),
                        torch.ones((args[1].numel(), c.shape[1])))
            return torch.zeros(args[0].shape[0], dtype=torch.float64)
        return run

    fake = NS(fp8=NS(gather_quantize=kernel("gather_quantize"), scatter_dequantize=kernel("scatter_dequantize")),
              score=NS(retention_values=kernel("retention_values")))
    monkeypatch.setattr(backends, "on_device_of", on_device_of, raising=False)
    monkeypatch.setattr(backends, "triton_kernels", lambda: fake)
    cache = torch.zeros(4, 2, 8, 16)
    q, s = fp8.gather_quantize_blocks_triton(cache, torch.tensor([1, 3]))
    fp8.scatter_dequantize_blocks_triton(q, s, cache, torch.tensor([0, 2]))
    fp8.quantize_kv_fp8_triton(cache)
    fp8.dequantize_kv_fp8_triton(q, s, torch.float16)
    score.retention_values_triton(*[torch.ones(3, dtype=torch.float64)] * 6)
    assert [name for name, _ in launched] == ["gather_quantize", "scatter_dequantize", "gather_quantize",
                                              "scatter_dequantize", "retention_values"]
    assert all(ok for _, ok in launched) and len(entered) == 5
    assert entered[0] is cache and entered[1] is cache and entered[3] is q


LARGE = """
import torch
from kvsched.ops import fp8
# 2**31 + 4 Ki float16 elements: 4 GiB of address space, three pages of it touched (torch.empty maps, never writes)
big = torch.empty(2**31 + 4096, dtype=torch.float16)
cache = big.as_strided((3, 1, 16, 64), (2**30, 1024, 64, 1))  # block 2 starts at element 2**31; its stride fits int32
g = torch.Generator().manual_seed(0)
cache[0].copy_(torch.randn(1, 16, 64, generator=g) * 5)
cache[2].copy_(torch.randn(1, 16, 64, generator=g))
ids = torch.tensor([2, 0])
q, s = fp8.gather_quantize_blocks(cache, ids, impl="triton")
q_ref, s_ref = fp8.gather_quantize_blocks(cache, ids, impl="torch")
assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
cache[2].zero_()
fp8.scatter_dequantize_blocks(q[:1].contiguous(), s[:1].contiguous(), cache, torch.tensor([2]), impl="triton")
assert torch.equal(cache[2:3], fp8.dequantize_kv_fp8(q_ref[:1].contiguous(), s_ref[:1].contiguous(), torch.float16,
                                                      impl="torch"))
print("ok")
"""


def large_offsets() -> Run | None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None  # the test skips
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    return Run([sys.executable, "-c", LARGE], env=env)


LARGE_TEST = "test_the_fp8_kernels_address_blocks_past_2_to_the_31_elements"
AHEAD = {LARGE_TEST: large_offsets}  # tests/ahead.py


def test_the_fp8_kernels_address_blocks_past_2_to_the_31_elements() -> None:
    """In Triton's interpreter (its own process: TRITON_INTERPRET is read when triton is imported). With the block id
    loaded as int32 instead of int64 the process dies of a segmentation fault (checked)."""
    pytest.importorskip("triton")
    proc = ahead.result(sys.modules[__name__], LARGE_TEST, timeout_s=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
