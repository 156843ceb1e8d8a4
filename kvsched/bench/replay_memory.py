"""`kvsched bench replay`'s KV pools against this host's memory: `trace_engine.prepare` refuses a run past it before
any server starts."""

from __future__ import annotations

from collections.abc import Sequence


def host_memory_bytes() -> int:
    """This host's memory, total bytes, as the FP8 tier's sizing reads it (`tier_host.host_memory`)."""
    from kvsched.adapters.vllm.tier_host import host_memory

    return host_memory()[0]


def refuse_past_host(pressure: float, pools: Sequence[int], block_bytes: int) -> None:
    """ValueError unless the sides' pools (blocks, one a side) of `block_bytes` each fit in this host's memory at once.

    vLLM allocates a --num-gpu-blocks-override pool whole, whatever VLLM_CPU_KVCACHE_SPACE says, and every side's
    server keeps its pool from `serving.start_all` until its side has run. Found by review: any pool under MAX_COUNT
    passed (--pressure 1e-6 asked 183 GiB), then the largest pool alone was checked, in bf16 (the tiny model is
    float32 on a CPU without native bf16: twice the bytes)."""
    blocks = sum(pools)
    if (need := blocks * block_bytes) > (host := host_memory_bytes()):
        raise ValueError(f"--pressure {pressure:g} makes a pool of {max(pools)} blocks, {blocks} blocks in all (every "
                         f"side's server runs at once), {need / 2**30:.1f} GiB of KV cache: past this host's "
                         f"{host / 2**30:.1f} GiB of memory")
