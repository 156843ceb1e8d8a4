"""The GPU tests' kernel cases (tests/gpu/test_kernels_cuda.py) run on this machine's dispatch (C++ on the CPU), so a
case that is itself wrong (a shape, a view, an edge page) fails here and not first on someone's GPU."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_kernels_cuda import MULTI_TILE_SHAPES, edge_pages, round_trip_matches_the_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_pages_round_trip_on_the_cpu_dispatch(dtype):
    round_trip_matches_the_reference(edge_pages(dtype, "cpu"))


@pytest.mark.parametrize("shape", MULTI_TILE_SHAPES)
def test_multi_tile_pages_and_views_round_trip_on_the_cpu_dispatch(shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 30).to(torch.bfloat16)
    round_trip_matches_the_reference(x)
    physical = torch.zeros(shape[0], shape[2], shape[1], shape[3] + 8, dtype=torch.bfloat16)
    view = physical.permute(0, 2, 1, 3)[..., : shape[3]]
    view.copy_(x)
    round_trip_matches_the_reference(view)
