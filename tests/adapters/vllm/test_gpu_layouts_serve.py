"""The GPU serve test's model (tests/gpu/conftest.py), checked where no GPU is: bfloat16 whatever the host CPU."""

from __future__ import annotations

from pathlib import Path

from kvsched import tiny_model


def test_the_gpu_tests_serve_a_bfloat16_model_on_a_host_whose_cpu_prefers_float32(monkeypatch, tmp_path) -> None:
    """On a host without native bf16 the shared fixture's model is float32, which vLLM serves without FlashAttention
    (found by review). The GPU tests' own fixture asks for bfloat16."""
    from tests.gpu.conftest import gpu_tiny_model

    built: list[str] = []
    monkeypatch.setattr(tiny_model, "resolve_dtype", lambda d: d or "float32")  # an AVX2-only host's choice
    monkeypatch.setattr(tiny_model, "build_model", lambda out, shape, seed, dtype: built.append(dtype) or Path(out))
    gpu_tiny_model()
    assert built == ["bfloat16"]


def test_the_gpu_check_refuses_a_cuda_host_without_triton(monkeypatch) -> None:
    """Without Triton the kernel and tier modules skip themselves, and `make gpu-check` passed having run none of
    kvsched's kernels (found by review): on a CUDA host the collection stops, saying why."""
    import importlib.util

    import pytest
    import torch

    from tests.gpu import conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(pytest.UsageError, match="Triton"):
        conftest.pytest_collection_modifyitems(None, [])  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    conftest.pytest_collection_modifyitems(None, [])  # type: ignore[arg-type]  # a CPU host: every test skips
