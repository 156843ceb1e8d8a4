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
