"""What this CPU can do, read the way vLLM's CPU backend reads it, and what follows for kvsched.

vLLM decides on the CPU with torch's own probes (`torch.cpu._is_avx512_supported()`, `_is_avx512_bf16_supported()`,
`_is_amx_tile_supported()`; see `vllm/platforms/cpu.py` and `vllm/v1/attention/backends/cpu_attn.py`): an FP8 KV cache
needs AVX-512 or AMX, and the bf16 kernels it loads (`vllm._C`) are the fast ones only with AVX512-BF16. kvsched asks
the same probes, so a test skips, a server refuses and a model picks its dtype for the reason vLLM would act on, not
for a `/proc/cpuinfo` flag that may disagree with it (a hypervisor can hide a flag from one and not the other).

`KVSCHED_CPU_ISA=scalar|avx2|avx512` caps the C++ kernels' instruction set (tests and benchmarks of the slower paths
on a faster machine); unset, the kernels run the best path the CPU has.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

ISAS = ("scalar", "avx2", "avx512")  # the C++ kernels' paths, slowest first
ISA_ENV = "KVSCHED_CPU_ISA"


class UnsupportedCpu(RuntimeError):
    """This CPU cannot run what was asked (e.g. an FP8 KV cache without AVX-512/AMX)."""


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    arch: str
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run on bf16 hardware (AVX512-BF16 or AMX); without it vLLM's CPU kernels emulate bf16 and a
        bf16 model prefills many times slower than the same model in float32."""
        return self.avx512_bf16 or self.amx

    @property
    def fp8_kv_cache(self) -> bool:
        """vLLM's CPU attention accepts `--kv-cache-dtype fp8` (x86 with AVX-512 or AMX; `_get_attn_isa`)."""
        return self.arch == "x86_64" and (self.avx512 or self.amx)

    def fastest_dtype(self) -> str:
        """The model dtype this CPU computes fastest: bfloat16 with native bf16, else float32."""
        return "bfloat16" if self.native_bf16 else "float32"

    def fp8_kv_cache_refusal(self) -> str | None:
        """One line saying why this CPU cannot hold an FP8 KV cache, or None when it can."""
        if self.fp8_kv_cache:
            return None
        if self.arch != "x86_64":
            return f"--kv-cache-dtype fp8 on vLLM's CPU backend needs an x86-64 CPU with AVX-512 or AMX; this is {self.arch}"
        return ("--kv-cache-dtype fp8 on vLLM's CPU backend needs AVX-512 or AMX, and this CPU has neither "
                f"(it has {'AVX2' if self.avx2 else 'no AVX2 either'}); serve without it (the FP8 tier still works)")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "native_bf16": self.native_bf16, "fp8_kv_cache": self.fp8_kv_cache,
                "fastest_dtype": self.fastest_dtype()}


@functools.cache
def cpu_features() -> CpuFeatures:
    import torch

    probes = torch.cpu
    x86 = platform.machine() in ("x86_64", "AMD64")
    return CpuFeatures(
        arch="x86_64" if x86 else platform.machine(),
        avx2=x86 and bool(probes._is_avx2_supported()),
        avx512=x86 and bool(probes._is_avx512_supported()),
        avx512_bf16=x86 and bool(probes._is_avx512_bf16_supported()),
        amx=x86 and bool(probes._is_amx_tile_supported()),
    )


def isa_cap_from_env() -> str | None:
    """The `KVSCHED_CPU_ISA` cap, validated; None when unset. A bad value raises ValueError naming the variable."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ISAS:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r}: choose one of {', '.join(ISAS)}")
    return value


def request_amx_tiles() -> bool | None:
    """Ask Linux for this process's permission to run AMX tile instructions (arch_prctl ARCH_REQ_XCOMP_PERM for
    XTILEDATA, through torch's `_init_amx`): a process must hold it before its first tile instruction, or the kernel
    kills it with SIGILL. vLLM 0.32's CPU attention runs tiles (its "amx" ISA: a bf16 model, a block size that is a
    multiple of 32, an AMX CPU) without asking; only other kernels ask: oneDNN's matmul, made at load for any linear
    weight over 1 MiB, and vLLM's small-weight GEMM (a linear weight of at most 1 MiB) from a 5-token batch on. So the
    tiny model's worker died (exit code -4) at a first batch of at most 4 tokens (found by review: a first prompt
    "hello").
    Process-wide and idempotent. None on a CPU without AMX, else whether the process holds the permission."""
    if not cpu_features().amx:
        return None
    import torch

    return bool(torch.cpu._init_amx())
