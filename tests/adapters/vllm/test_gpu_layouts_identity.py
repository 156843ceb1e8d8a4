"""One logical page [H, N, C], two meanings: vLLM's CPU backend reads C of a page as its K rows then its V rows, the
CUDA backends (FlashAttention, FlashInfer, Triton attention) as each token's K then V. A block framed on one must not
be served on the other (found by review: same geometry, dtype and block size gave one identity, so a CPU and a GPU
replica sharing a store or a disk directory restored each other's blocks scrambled, their CRCs intact)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from kvsched.adapters.vllm import tier_blob
from tests.adapters.vllm.test_tier_identity import GEO, HF, identity


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "llama"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return d


def test_the_cuda_and_cpu_backends_pages_never_share_an_identity(model: Path, monkeypatch) -> None:
    from vllm.platforms import current_platform

    on_cpu = identity(model)
    monkeypatch.setattr(current_platform, "device_type", "cuda")  # what a GPU engine's processes see
    on_cuda = identity(model)
    monkeypatch.setattr(current_platform, "device_type", "rocm")
    assert len({on_cpu, on_cuda, identity(model)}) == 3


def test_the_cpu_identity_is_what_it_was(model: Path) -> None:
    """CPU engines keep reading the blocks their disk level already holds: their identity takes no new field."""
    from vllm.platforms import current_platform

    assert current_platform.device_type == "cpu" and tier_blob.platform_type() == "cpu"
    cfg = NS(model_config=NS(model=str(model), revision=None, hf_config=HF(), quantization=None, dtype=torch.bfloat16),
             cache_config=NS(block_size=32, cache_dtype="auto"))
    desc = tier_blob.identity_of(cfg, GEO, 1)[1]
    assert "platform" not in desc and "kv_rows" not in desc
