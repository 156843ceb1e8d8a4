"""Which optional backends this process has: the C++ extension `kvsched._C` and Triton (`kvsched_kernels`).

Both are looked up lazily and may be missing; then the ops fall back to their torch reference.
"""

from __future__ import annotations

import functools
import importlib
import os
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any

from kvsched.ops.cpu_features import isa_cap_from_env

CXX_FUNCTIONS = (
    "retention_values", "score_select", "gather_quantize_fp8", "scatter_dequantize_fp8", "fp8_set_max_isa",
    "fp8_active_isa",
)


@functools.cache
def cxx() -> ModuleType | None:
    """`kvsched._C` when it is built and carries the kernels, else None. Its FP8 kernels are capped at
    `KVSCHED_CPU_ISA` when that is set (a bad value raises ValueError naming the variable)."""
    try:
        mod = importlib.import_module("kvsched._C")
    except ImportError:
        return None
    if not all(hasattr(mod, f) for f in CXX_FUNCTIONS):
        return None
    cap = isa_cap_from_env()
    if cap is not None:
        mod.fp8_set_max_isa(cap)
    return mod


def has_cxx() -> bool:
    return cxx() is not None


def triton_interpreted() -> bool:
    """True when the Triton kernels run in Triton's CPU interpreter: triton.jit made them interpreted when
    `kvsched_kernels` was imported (TRITON_INTERPRET=1 then; recorded as its INTERPRETED), and the variable is still
    set (Triton's interpreter reads it again at a launch and fails without it). Found by review: only the variable was
    read, at each call, so set after the import it offered Triton on a CPU, and the call failed in the GPU launcher.
    Without the variable triton is not imported (slow, and of no use to a CPU process that does not interpret)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    kernels = triton_kernels()
    return kernels is not None and bool(kernels.INTERPRETED)


@functools.cache
def triton_kernels() -> ModuleType | None:
    """The `kvsched_kernels` package when triton imports, else None."""
    try:
        importlib.import_module("triton")
        return importlib.import_module("kvsched_kernels")
    except ImportError:
        return None


def has_triton_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and triton_kernels() is not None


def has_triton_interpreter() -> bool:
    return triton_interpreted()


def on_device_of(tensor: Any) -> AbstractContextManager[Any]:
    """The context a Triton launch for `tensor` runs in: its CUDA device made current. Triton launches on the current
    device and its current stream, whatever device the arguments are on: a cache on cuda:1 while cuda:0 is current
    ran the kernel on cuda:0 with cuda:1's pointers (found by review). Nothing to do for a CPU tensor (interpreter)."""
    if tensor.device.type != "cuda":
        return nullcontext()
    import torch

    return torch.cuda.device(tensor.device)
