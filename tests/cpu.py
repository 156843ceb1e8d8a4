"""The one place tests ask what this CPU can do: every test that needs a CPU feature skips through here, with the
reason, using the probes vLLM itself uses (kvsched.ops.cpu_features), not /proc/cpuinfo flags."""

from __future__ import annotations

import pytest

from kvsched.ops.cpu_features import cpu_features


def require_isa(isa: str) -> None:
    """Skip unless the C++ kernels' `isa` path can run here ('scalar' runs everywhere)."""
    from kvsched.ops import backends

    mod = backends.cxx()
    if mod is None:
        pytest.skip("kvsched._C is not built")
    best = mod.fp8_best_isa()
    order = ("scalar", "avx2", "avx512")
    if order.index(isa) > order.index(best):
        pytest.skip(f"the {isa} kernel path needs a CPU with {isa.upper()}; this one's best is {best}")


def require_fp8_kv_cache() -> None:
    """Skip unless vLLM's CPU backend accepts `--kv-cache-dtype fp8` here (AVX-512 or AMX)."""
    reason = cpu_features().fp8_kv_cache_refusal()
    if reason:
        pytest.skip(reason)

