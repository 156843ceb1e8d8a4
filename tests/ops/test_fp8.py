"""FP8 e4m3 KV block quantization: implementations are bit-identical to the torch reference, the round trip stays
within e4m3's error bound, gather/scatter move exactly the named blocks, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from kvsched.ops import fp8
from kvsched.ops.cpu_features import ISAS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(5, 1, 16, 64), (9, 3, 32, 128), (4, 2, 16, 96), (3, 8, 1, 256)]  # [blocks, kv_heads, block_size, 2*head]


def cache_of(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])[None, :, None, None]  # heads differ in scale
    return x.to(dtype)


def bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference_bit_for_bit(impl, shape, dtype):
    x = cache_of(shape, dtype)
    q_ref, s_ref = fp8.quantize_kv_fp8(x, impl="torch")
    q, s = fp8.quantize_kv_fp8(x, impl=impl)
    assert q.dtype == torch.float8_e4m3fn and s.shape == shape[:2]
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    assert torch.equal(fp8.dequantize_kv_fp8(q, s, dtype, impl=impl), fp8.dequantize_kv_fp8(q_ref, s_ref, dtype,
                                                                                            impl="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_is_within_the_e4m3_bound(impl, dtype):
    x = cache_of((6, 4, 32, 128), dtype, seed=3)
    q, s = fp8.quantize_kv_fp8(x, impl=impl)
    y = fp8.dequantize_kv_fp8(q, s, dtype, impl=impl).float()
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 3), keepdim=True)
    out_ulp = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    bound = amax * 2**-4 + s[:, :, None, None] * 2**-10 + xf.abs() * out_ulp
    assert bool(((y - xf).abs() <= bound).all())
    rel_rms = ((y - xf).pow(2).mean() / xf.pow(2).mean()).sqrt().item()
    assert rel_rms <= 0.07  # the bound the FP8 tier is held to


def test_special_values(impl):
    x = torch.zeros(2, 1, 16, 64)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0])
    q, s = fp8.quantize_kv_fp8(x, impl=impl)
    y = fp8.dequantize_kv_fp8(q, s, torch.float32, impl=impl)
    assert torch.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 3.0 and y[0, 0, 0, 2] == -3.0  # inf saturates to amax
    assert s[1, 0].item() == 2.0**-126 and torch.equal(y[1], x[1])  # an all-zero page survives exactly


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_scatter_move_exactly_the_named_blocks(impl, dtype):
    cache = cache_of((12, 2, 16, 64), dtype, seed=5)
    ids = torch.tensor([7, 0, 11, 3])
    q, s = fp8.gather_quantize_blocks(cache, ids, impl=impl)
    q_ref, s_ref = fp8.quantize_kv_fp8(cache[ids], impl="torch")
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    target = torch.zeros_like(cache)
    dest = torch.tensor([1, 2, 9, 4])
    fp8.scatter_dequantize_blocks(q, s, target, dest, impl=impl)
    assert torch.equal(target[dest], fp8.dequantize_kv_fp8(q_ref, s_ref, dtype, impl="torch"))
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[dest] = False
    assert not target[untouched].any()


def test_strided_cache_views(impl):
    # vLLM's NHD layout keeps the logical [B, H, N, C] view with H and N swapped in memory
    physical = cache_of((6, 16, 3, 64), torch.bfloat16, seed=7)
    view = physical.permute(0, 2, 1, 3)
    assert not view.is_contiguous()
    ids = torch.tensor([5, 1])
    q, s = fp8.gather_quantize_blocks(view, ids, impl=impl)
    q_ref, s_ref = fp8.quantize_kv_fp8(view[ids].contiguous(), impl="torch")
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    fp8.scatter_dequantize_blocks(q, s, view, torch.tensor([0, 2]), impl=impl)
    assert torch.equal(view[torch.tensor([0, 2])], fp8.dequantize_kv_fp8(q_ref, s_ref, torch.bfloat16, impl="torch"))


def test_bad_input_is_refused(impl):
    cache = cache_of((4, 2, 16, 64), torch.float16)
    with pytest.raises(IndexError, match="out of range"):
        fp8.gather_quantize_blocks(cache, torch.tensor([0, 4]), impl=impl)
    with pytest.raises(IndexError):
        fp8.gather_quantize_blocks(cache, torch.tensor([-1]), impl=impl)
    q, s = fp8.gather_quantize_blocks(cache, torch.tensor([0, 1]), impl=impl)
    with pytest.raises(ValueError, match="unique"):
        fp8.scatter_dequantize_blocks(q, s, cache, torch.tensor([2, 2]), impl=impl)
    with pytest.raises(ValueError, match="does not match"):
        fp8.scatter_dequantize_blocks(q, s, cache, torch.tensor([3]), impl=impl)
    with pytest.raises(ValueError, match="4-D"):
        fp8.quantize_kv_fp8(cache[0], impl=impl)
    with pytest.raises(ValueError, match="scales"):
        fp8.dequantize_kv_fp8(q, s[:, :1].contiguous(), torch.float16, impl=impl)
    with pytest.raises(ValueError):
        fp8.quantize_kv_fp8(cache.to(torch.float64), impl="torch")
    for chosen in (impl, None):  # found by review: the automatic choice served float64
        with pytest.raises(ValueError, match="float64"):
            fp8.dequantize_kv_fp8(q, s, torch.float64, impl=chosen)
    for ids in (torch.tensor([1.9, 0.5]), torch.tensor([True, False])):  # found by review: 1.9 was block 1
        with pytest.raises(TypeError, match="integer"):
            fp8.gather_quantize_blocks(cache, ids, impl=impl)
    aliased = cache[:1].expand(4, -1, -1, -1)  # found by review: the C++ path wrote one block over another
    with pytest.raises(ValueError, match="overlapping"):
        fp8.scatter_dequantize_blocks(q, s, aliased, torch.tensor([0, 2]), impl=impl)


def test_tensors_on_another_device_are_refused_not_dereferenced(impl):
    """Found by review: a q or scales tensor on another device than the cache (CUDA beside a CPU cache; `meta` here)
    sent a device pointer to the host kernel: a segfault."""
    cache = cache_of((4, 2, 16, 64), torch.float16)
    q, s = fp8.gather_quantize_blocks(cache, torch.tensor([0, 1]), impl=impl)
    with pytest.raises(ValueError, match="device"):
        fp8.scatter_dequantize_blocks(q, s.to("meta"), cache, torch.tensor([2, 3]), impl=impl)
    with pytest.raises(ValueError, match="device"):
        fp8.scatter_dequantize_blocks(q.to("meta"), s.to("meta"), cache, torch.tensor([2, 3]), impl=impl)
    with pytest.raises(ValueError, match="device"):
        fp8.dequantize_kv_fp8(q, s.to("meta"), torch.float16, impl=impl)
    with pytest.raises(ValueError, match="device"):
        fp8.gather_quantize_blocks(cache, torch.tensor([0, 1]), impl=impl, out=(q, s.to("meta")))


def test_gather_into_a_preallocated_buffer(impl):
    cache = cache_of((10, 2, 16, 64), torch.bfloat16, seed=9)
    ids = torch.tensor([9, 4, 4, 0])  # ids may repeat for a gather
    q_ref, s_ref = fp8.gather_quantize_blocks(cache, ids, impl="torch")
    buf = (torch.empty_like(q_ref), torch.empty_like(s_ref))
    q, s = fp8.gather_quantize_blocks(cache, ids, out=buf, impl=impl)
    assert q.data_ptr() == buf[0].data_ptr() and s.data_ptr() == buf[1].data_ptr()
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="out q"):
        fp8.gather_quantize_blocks(cache, ids[:2], out=buf, impl=impl)


# ----------------------------------------------------------------------------------------------- C++ code paths
# The C++ kernels have two vector paths (AVX-512: full-width body, masked tail; AVX2: 8 lanes, scalar tail; both scan
# bf16/fp16 amax in 16-bit lanes) and a scalar path (pages with NaN/inf, CPUs without AVX2). Every path this CPU can
# run must equal the reference on shapes that exercise every tail: runs shorter than a vector, runs of 16k + r
# elements, strided rows that cannot merge into one run. The scalar path is tested on every machine.
TAIL_SHAPES = [(3, 2, 1, 1), (4, 3, 5, 37), (2, 2, 16, 200), (3, 1, 7, 16), (2, 5, 3, 33), (2, 2, 9, 201)]
FP8_DTYPE = torch.float8_e4m3fn


@pytest.fixture(params=ISAS)
def cxx_path(request):
    from kvsched.ops import backends
    from tests.cpu import require_isa
    from tests.ops.conftest import require_cxx

    require_cxx()
    require_isa(request.param)
    mod = backends.cxx()
    before = mod.fp8_active_isa()
    mod.fp8_set_max_isa(request.param)
    try:
        assert mod.fp8_active_isa() == request.param
        yield request.param
    finally:
        mod.fp8_set_max_isa(before)


def e4m3_edge_values() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours and the floats just either side of each midpoint
    (ties round to even; a single ulp decides), signed zeros, values below half the smallest subnormal and 448."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x00..0x7E: every finite non-negative code
    vals = codes.view(FP8_DTYPE).float()
    mids = (vals[:-1] + vals[1:]) / 2  # exact in float32
    up, down = torch.nextafter(mids, torch.full_like(mids, 1e9)), torch.nextafter(mids, torch.zeros_like(mids))
    tiny = torch.tensor([2.0**-10, 2.0**-11, 2.0**-20, 1e-45, 0.0, 447.0, 448.0])
    pos = torch.cat([vals, mids, up, down, tiny])
    return torch.cat([pos, -pos])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TAIL_SHAPES)
def test_cxx_paths_match_reference_on_every_tail(cxx_path, shape, dtype):
    x = cache_of(shape, dtype, seed=sum(shape))
    q_ref, s_ref = fp8.quantize_kv_fp8(x, impl="torch")
    q, s = fp8.quantize_kv_fp8(x, impl="cxx")
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    y_ref = fp8.dequantize_kv_fp8(q_ref, s_ref, dtype, impl="torch")
    assert torch.equal(fp8.dequantize_kv_fp8(q, s, dtype, impl="cxx"), y_ref)
    # the same pages seen through a strided view whose rows do not follow each other in memory
    physical = torch.zeros(shape[0], shape[2], shape[1], shape[3] + 3, dtype=dtype)
    view = physical.permute(0, 2, 1, 3)[..., : shape[3]]
    view.copy_(x)
    q2, s2 = fp8.quantize_kv_fp8(view, impl="cxx")
    assert torch.equal(bits(q2), bits(q_ref)) and torch.equal(s2, s_ref)
    fp8.scatter_dequantize_blocks(q, s, view, torch.arange(shape[0]), impl="cxx")
    assert torch.equal(view, y_ref) and not physical[..., shape[3]:].any()  # padding columns untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_cxx_paths_round_ties_and_subnormals_like_the_reference(cxx_path, dtype):
    edges = e4m3_edge_values()
    cols = 64
    n = -(-edges.numel() // cols) * cols
    page = torch.zeros(n)
    page[: edges.numel()] = edges
    x = torch.stack([page.view(-1, cols),  # amax 448: scale 1, so the page is rounded as is
                     page.view(-1, cols) * 0.75,  # a scale that is not a power of two
                     page.view(-1, cols) * 2.0**-120]).unsqueeze(0).to(dtype)  # tiny scale, float32 subnormals
    if dtype == torch.float32:
        assert x[0, 0].abs().amax().item() == 448.0
    q_ref, s_ref = fp8.quantize_kv_fp8(x, impl="torch")
    q, s = fp8.quantize_kv_fp8(x, impl="cxx")
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("page", [(4, 32), (16, 256), (9, 201)])  # small pages convert each code; large use a table
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2.0**-126, 2.0**-117 * 3, 1e-3, 7.5, 2.0**100])
def test_cxx_paths_dequantize_every_code_like_the_reference(cxx_path, dtype, scale, page):
    n = 2 * page[0] * page[1]
    codes = torch.randperm(n, generator=torch.Generator().manual_seed(n)) % 256  # every code, shuffled
    q = codes.to(torch.uint8).view(FP8_DTYPE).reshape(1, 2, *page).contiguous()
    s = torch.full((1, 2), scale, dtype=torch.float32)
    ref = fp8.dequantize_kv_fp8(q, s, dtype, impl="torch")
    out = fp8.dequantize_kv_fp8(q, s, dtype, impl="cxx")
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))


def test_cxx_paths_quantize_pages_near_the_float_range(cxx_path):
    x = cache_of((2, 2, 16, 48), torch.float32, seed=11)
    x = x / x.abs().amax() * 3.0e38  # amax close to float32's largest value: 1/scale is near its smallest normal
    x[1, 1] *= 2.0**-140  # a page of float32 subnormals
    q_ref, s_ref = fp8.quantize_kv_fp8(x, impl="torch")
    q, s = fp8.quantize_kv_fp8(x, impl="cxx")
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("aligned", [True, False])
def test_cxx_paths_on_outputs_large_enough_to_stream(cxx_path, aligned):
    # >= 8 MiB of output switches the C++ kernels to non-temporal stores (64-byte aligned runs only)
    shape = (264, 8, 16, 256)
    physical = cache_of((shape[0], shape[1], shape[2], shape[3] + 1), torch.bfloat16, seed=13)
    x = physical[..., :-1] if aligned else physical[..., 1:]
    ids = torch.randperm(shape[0], generator=torch.Generator().manual_seed(1))[:-3]
    q_ref, s_ref = fp8.gather_quantize_blocks(x, ids, impl="torch")
    q, s = fp8.gather_quantize_blocks(x.contiguous() if aligned else x, ids, impl="cxx")
    assert q.numel() >= 8 << 20
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    target = torch.zeros_like(physical)
    view = target[..., :-1] if aligned else target[..., 1:]
    view = view.contiguous() if aligned else view
    fp8.scatter_dequantize_blocks(q, s, view, ids, impl="cxx")
    assert torch.equal(view[ids], fp8.dequantize_kv_fp8(q_ref, s_ref, torch.bfloat16, impl="torch"))
    untouched = torch.ones(shape[0], dtype=torch.bool)
    untouched[ids] = False
    assert not view[untouched].any()


@pytest.mark.parametrize("value,expect", [("scalar", "scalar"), (" AVX2 ", "avx2"), ("", None)])
def test_the_isa_cap_comes_from_the_environment(monkeypatch, value, expect):
    from kvsched.ops.cpu_features import isa_cap_from_env

    monkeypatch.setenv("KVSCHED_CPU_ISA", value)
    assert isa_cap_from_env() == expect


def test_a_bad_isa_cap_names_the_variable(monkeypatch):
    from kvsched.ops.cpu_features import isa_cap_from_env

    monkeypatch.setenv("KVSCHED_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KVSCHED_CPU_ISA='sse9': choose one of scalar, avx2, avx512"):
        isa_cap_from_env()


def test_the_isa_cap_reaches_the_kernels_of_a_new_process():
    """What `KVSCHED_CPU_ISA=scalar make test` relies on: the cap is applied when kvsched._C is first used."""
    import os
    import subprocess
    import sys

    from tests.ops.conftest import require_cxx

    require_cxx()
    code = "from kvsched.ops import backends; print(backends.cxx().fp8_active_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, KVSCHED_CPU_ISA="scalar"),
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "scalar"
