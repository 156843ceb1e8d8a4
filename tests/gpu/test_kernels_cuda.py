"""Triton kernels on CUDA against their torch reference, bit for bit (the dispatch layer picks Triton on CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvsched.ops import fp8, score  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 3, 32, 128), (4, 2, 16, 96), (3, 8, 1, 256)])
def test_triton_fp8_matches_the_reference_on_cuda(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])[None, :, None, None]).to(dtype).cuda()
    assert fp8.GATHER.resolve(x.device, x.dtype).name == "triton"
    ids = torch.tensor([5, 1, 1, 0], device="cuda")[: shape[0]] % shape[0]
    q_ref, s_ref = fp8.gather_quantize_blocks(x, ids, impl="torch")
    q, s = fp8.gather_quantize_blocks(x, ids)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    out_ref, out = torch.zeros_like(x), torch.zeros_like(x)
    uniq = torch.unique(ids)
    qu, su = fp8.gather_quantize_blocks(x, uniq, impl="torch")
    fp8.scatter_dequantize_blocks(qu, su, out_ref, uniq, impl="torch")
    fp8.scatter_dequantize_blocks(qu, su, out, uniq)
    assert torch.equal(out.view(torch.uint8), out_ref.view(torch.uint8))


def test_triton_score_and_select_matches_the_reference_on_cuda():
    from kvsched.bench.kernels import _candidates

    cols = [c.cuda() for c in _candidates(50_000)]
    ref = score.score_and_select(*cols, 64, impl="torch")
    got = score.score_and_select(*cols, 64)
    assert torch.equal(got.cpu(), ref.cpu())


def round_trip_matches_the_reference(x: torch.Tensor) -> None:
    """The dispatched kernels (Triton on CUDA) against the torch reference on the same device: codes, scales and the
    dequantized pages, bit for bit. Also run on the CPU's dispatch by tests/ops/test_gpu_cases.py, so the cases
    themselves are checked where no GPU is."""
    ids = torch.arange(x.shape[0], device=x.device).flip(0)
    q_ref, s_ref = fp8.gather_quantize_blocks(x, ids, impl="torch")
    q, s = fp8.gather_quantize_blocks(x, ids)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    out_ref, out = torch.zeros_like(x), torch.zeros_like(x)
    fp8.scatter_dequantize_blocks(q_ref, s_ref, out_ref, ids, impl="torch")
    fp8.scatter_dequantize_blocks(q_ref, s_ref, out, ids)
    assert torch.equal(out.view(torch.uint8), out_ref.view(torch.uint8))


def edge_pages(dtype: torch.dtype, device: str) -> torch.Tensor:
    """Found by review: the CUDA tests fed only random normal pages, never the e4m3 edges (ties to even, values past
    448 after scaling, subnormal scales) the interpreter test was written for."""
    from tests.ops.test_fp8 import e4m3_edge_values

    edges, cols = e4m3_edge_values(), 64
    page = torch.zeros(-(-edges.numel() // cols) * cols)
    page[: edges.numel()] = edges
    rows = page.view(-1, cols)
    return torch.stack([rows, rows * 0.75, rows * 2.0**-120]).unsqueeze(0).to(dtype).to(device)


# Pages of several tiles (found by review: every shape above fits one tile, so the loop over a page's tiles, the
# common case for head size 256 or block size 32-64, never ran on a GPU), and a permuted view (rows not adjacent).
MULTI_TILE_SHAPES = [(3, 2, 64, 256), (2, 1, 32, 512), (2, 4, 16, 512)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_fp8_rounds_the_e4m3_edges_like_the_reference_on_cuda(dtype):
    round_trip_matches_the_reference(edge_pages(dtype, "cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", MULTI_TILE_SHAPES)
def test_triton_fp8_pages_of_several_tiles_and_strided_views_on_cuda(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 30).to(dtype).cuda()
    round_trip_matches_the_reference(x)
    physical = torch.zeros(shape[0], shape[2], shape[1], shape[3] + 8, dtype=dtype, device="cuda")
    view = physical.permute(0, 2, 1, 3)[..., : shape[3]]
    view.copy_(x)
    round_trip_matches_the_reference(view)
    assert not physical[..., shape[3]:].any()  # padding columns untouched


def test_triton_launches_on_the_device_of_its_cache_not_the_current_one():
    """Triton launches on the current device: a cache on cuda:1 while cuda:0 is current ran on cuda:0 with cuda:1's
    pointers before the wrappers made the cache's device current (kvsched.ops.backends.on_device_of)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = (torch.randn(4, 2, 16, 128, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    with torch.cuda.device(0):
        round_trip_matches_the_reference(x.to("cuda:1"))
        cols = [c.to("cuda:1") for c in _score_columns(1000)]
        torch.testing.assert_close(score.retention_values(*cols), score.retention_values(*cols, impl="torch"),
                                   rtol=1e-12, atol=0.0)


def _score_columns(n: int) -> list[torch.Tensor]:
    from kvsched.bench.kernels import _candidates

    return list(_candidates(n))[:6]


def test_triton_fp8_addresses_blocks_past_2_to_the_31_elements_on_cuda():
    """A cache of more than 2**31 elements (one layer of a small model on an 80 GB GPU): block offsets are 64-bit
    products. Also checked in the interpreter (tests/adapters/vllm/test_gpu_layouts_launch.py)."""
    free, _ = torch.cuda.mem_get_info()
    if free < (5 << 30):
        pytest.skip(f"needs 5 GiB of free device memory, {free >> 20} MiB free")
    big = torch.empty(2**31 + 4096, dtype=torch.float16, device="cuda")
    cache = big.as_strided((3, 1, 16, 64), (2**30, 1024, 64, 1))
    cache.copy_(torch.randn(3, 1, 16, 64, generator=torch.Generator().manual_seed(2)).to("cuda", torch.float16))
    round_trip_matches_the_reference(cache)  # reads block 2 at element 2**31 (its scatter goes to a small buffer)
    ids = torch.tensor([2, 0])
    q, s = fp8.gather_quantize_blocks(cache, ids, impl="torch")
    cache[2].zero_()
    fp8.scatter_dequantize_blocks(q[:1].contiguous(), s[:1].contiguous(), cache, ids[:1])  # Triton writes it back
    assert torch.equal(cache[2:3], fp8.dequantize_kv_fp8(q[:1].contiguous(), s[:1].contiguous(), torch.float16,
                                                          impl="torch"))
    del big, cache
    torch.cuda.empty_cache()
