"""The FP8 tier's copies through the Triton kernels, the implementation the dispatch layer picks on a CUDA cache, on
caches laid out by vLLM 0.32's own allocator for every attention backend's spec, every KVCacheLayout and a kernel
block split. On the CPU the tier runs the C++ kernels, and the Triton checks (tests/ops/triton_checks.py) take
contiguous pages: nothing ran the tier's own calls (views of permuted and block-outermost layouts, kernel-block views
`grouped[:, j]`, the int16 view of a bf16 view, a partial block's gathered copy) through Triton before a GPU would.
In Triton's CPU interpreter, in a process of its own (TRITON_INTERPRET is read when triton is imported)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests import ahead
from tests.ahead import Run

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import functools
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout
import kvsched_kernels.fp8 as kernels
import kvsched.adapters.vllm.fp8_tier_store as tier_store
from kvsched.ops import fp8
from tests.adapters.vllm.test_tier_layout import NUM_BLOCKS, round_trip
from tests.adapters.vllm.tier_engine_caches import BACKEND_SPECS, engine_caches

launches = []
for name in ("gather_quantize", "scatter_dequantize"):  # count the kernels' launches: Triton, not a fallback, ran
    launch = getattr(kernels, name)
    setattr(kernels, name, lambda *a, _f=launch, _n=name: launches.append(_n) or _f(*a))
# The store takes the ops by name; on a CPU cache the dispatch picks C++, so they are bound to Triton here.
for op in ("gather_quantize_blocks", "scatter_dequantize_blocks", "dequantize_kv_fp8"):
    setattr(tier_store, op, functools.partial(getattr(fp8, op), impl="triton"))
for backend in sorted(set(BACKEND_SPECS) - {"cpu_attn"}):  # the GPU backends
    for layout in KVCacheLayout:
        round_trip(*engine_caches(BACKEND_SPECS[backend], layout, NUM_BLOCKS))
spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
for layout in (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC):
    round_trip(*engine_caches(spec, layout, NUM_BLOCKS, kernel_block_size=16))
# a partial last block (its gathered, non-finite-free copy) on a permuted layout
config, caches = engine_caches(BACKEND_SPECS["flash_attn"], KVCacheLayout.BLNHC, NUM_BLOCKS)
from kvsched.adapters.vllm.tier_layout import geometry_of, layer_views
from tests.adapters.vllm.tier_engine_caches import fill
fill(caches)
for t in caches.values():
    t[4, :, 9:] = float("nan")
store = tier_store.TierStore(layer_views(caches, geometry_of(config, None), NUM_BLOCKS), "quantize")
store.store([4], [0], [9])
assert store.load([0], [6]) == []
for t in caches.values():
    x, y = t[4, :, :9].float(), t[6, :, :9].float()
    assert float((x - y).norm() / x.norm()) < 0.07
print(launches.count("gather_quantize"), launches.count("scatter_dequantize"))
"""


def round_trips() -> Run | None:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("vllm") is None:
        return None  # the test skips
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    return Run([sys.executable, "-c", SCRIPT], env=env, cwd=str(ROOT))


AHEAD = {"test_the_tier_round_trips_every_backend_layout_through_the_triton_kernels": round_trips}  # tests/ahead.py


def test_the_tier_round_trips_every_backend_layout_through_the_triton_kernels() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("vllm")
    name = "test_the_tier_round_trips_every_backend_layout_through_the_triton_kernels"
    proc = ahead.result(sys.modules[__name__], name, timeout_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathers, scatters = map(int, proc.stdout.split()[-2:])
    # the float specs' stores quantize (a gather per layer view, and the error sample's dequantize) and restore
    assert gathers >= 3 * 6 * 2 and scatters >= 3 * 6 * 2, proc.stdout
