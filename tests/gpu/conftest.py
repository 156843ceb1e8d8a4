"""GPU tests: run by `make gpu-check` on a machine with CUDA; everywhere else every test here skips, saying why."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False here)"
    if reason is None and importlib.util.find_spec("triton") is None:
        # Found by review: the kernel and tier modules skip themselves without Triton (importorskip), so a GPU venv
        # without it (`.[gpu]` names no triton: it comes only as a dependency of torch's CUDA wheel for the platform)
        # passed `make gpu-check` with the Triton kernels never run, and the tier on the torch reference.
        raise pytest.UsageError("tests/gpu: CUDA is available but Triton is not installed; the GPU check needs it "
                                "(pip install triton) to run kvsched's kernels")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def gpu_tiny_model():  # type: ignore[no-untyped-def]
    """The tiny model in bfloat16, the GPUs' dtype, whatever the host CPU computes fastest. Found by review: the
    shared fixture builds it in this CPU's fastest dtype, float32 on hosts without native bf16 (AVX2 EPYCs, Cascade
    Lake Xeons: common A100 hosts), and vLLM serves float32 with no FlashAttention, so the GPU serve test ran on
    another attention backend than the one it is there for."""
    from kvsched.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test", dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_model_dir():  # type: ignore[no-untyped-def]
    return gpu_tiny_model()
