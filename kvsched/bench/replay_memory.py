"""The KV memory a benchmark's servers would hold against this host's memory: `kvsched bench replay`
(`trace_engine.prepare`) and `kvsched bench agents` (`agents_sizing`) refuse a run past it before any server starts.

Both start every side's server at once (`serving.start_all`), then run the sides one after another, each server
stopped after its side: all the pools are held from the start (vLLM allocates a --num-gpu-blocks-override pool whole,
whatever VLLM_CPU_KVCACHE_SPACE says), and while a side with kvsched's FP8 tier runs, its tier fills in host memory
beside its own pool and the pools of the sides still to run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class HostMemoryError(ValueError):
    """The sides' KV memory is past this host's (raised before any server starts): `--pressure P makes {detail}`, the
    option that sized the pools named; `detail` for a command that sets the pressure itself (`kvsched demo`)."""

    def __init__(self, pressure: float, detail: str) -> None:
        super().__init__(f"--pressure {pressure:g} makes {detail}")
        self.pressure, self.detail = pressure, detail


@dataclass(frozen=True, slots=True)
class SideMemory:
    """One side's server: its pool (blocks) and its FP8 tier's host bytes once full (0: no tier), and how that size
    was given (for the refusal)."""

    name: str
    pool_blocks: int
    tier_bytes: int = 0
    tier_setting: str = ""


def host_memory_bytes() -> int:
    """This host's memory, total bytes, as the FP8 tier's sizing reads it (`tier_host.host_memory`)."""
    from kvsched.adapters.vllm.tier_host import host_memory

    return host_memory()[0]


def tier_geometry(shape: Any, dtype: str, block_tokens: int) -> Any:
    """The FP8 tier's geometry (`tier_layout.TierGeometry`) in a CPU engine of the tiny model (`shape`, a
    `tiny_model.ModelShape`, in `dtype`): vLLM's full-attention spec of a Llama gives every layer a page per KV head
    of `block_tokens` rows of K and V (tests/bench/test_bench_tier_memory.py checks it against vLLM's own spec)."""
    import torch

    from kvsched.adapters.vllm.tier_layout import QUANTIZE, TierGeometry

    return TierGeometry(tuple(f"model.layers.{i}.self_attn.attn" for i in range(shape.num_hidden_layers)),
                        shape.num_key_value_heads, block_tokens, 2 * shape.head_dim, getattr(torch, dtype), QUANTIZE,
                        "HND")


def side_memory(name: str, pool_blocks: int, tier_gib: float | str | None, shape: Any, dtype: str,
                block_tokens: int) -> SideMemory:
    """A side's memory. `tier_gib`: its FP8 tier as the engine reads it (`engine_settings.tier_gib`: GiB, 0 off, or
    "auto"), None for stock vLLM. The tier's bytes are the engine's (`fp8_tier_connector`): its budget
    (`tier_host.budget_bytes`: the size asked for, or the default rule on this pool and this host's available memory)
    in whole slots of `TierGeometry.block_bytes` (FP8, a scale per head); a CPU engine pins no copy staging."""
    from kvsched.adapters.vllm import tier_host
    from kvsched.core.tier_config import TierConfigError

    if tier_gib is None or tier_gib == 0:
        return SideMemory(name, pool_blocks)
    geometry = tier_geometry(shape, dtype, block_tokens)
    asked = None if tier_gib == "auto" else float(tier_gib)
    try:
        budget = tier_host.budget_bytes(asked, geometry, pool_blocks)
    except TierConfigError:  # past the host's memory (the engine would refuse it): counted as asked, refused below
        budget = int((asked or 0.0) * 2**30)
    setting = f"{asked:g} GiB asked" if asked is not None else f"auto: {tier_host.AUTO_RULE}"
    return SideMemory(name, pool_blocks, budget // geometry.block_bytes * geometry.block_bytes, setting)


def refuse_past_host(pressure: float, sides: Sequence[SideMemory], block_bytes: int) -> None:
    """HostMemoryError unless the sides' servers (in the order they run) fit in this host's memory at once: every
    pool (blocks of `block_bytes`) from the start, and while a side with a tier runs, its tier full beside its own pool
    and the later sides' (the earlier sides' servers have stopped).

    Found by review: any pool under MAX_COUNT passed (--pressure 1e-6 asked 183 GiB), then the largest pool alone was
    checked, in bf16 (the tiny model is float32 on a CPU without native bf16: twice the bytes); then the FP8 tier's
    host memory (by default twice its pool's bytes) was not counted at all."""
    pools = [s.pool_blocks for s in sides]
    start = sum(pools) * block_bytes
    need, peak = start, None
    for i, side in enumerate(sides):
        if side.tier_bytes and (held := sum(pools[i:]) * block_bytes + side.tier_bytes) > need:
            need, peak = held, (i, side)
    if need <= (host := host_memory_bytes()):
        return
    why = ""
    if peak is not None:
        i, side = peak
        why = (f" (while side {side.name} runs: {sum(pools[i:])} blocks of pools still held, and its FP8 tier full, "
               f"{side.tier_bytes / 2**30:.1f} GiB by its size, {side.tier_setting})")
    raise HostMemoryError(pressure, f"a pool of {max(pools)} blocks, {sum(pools)} blocks in all (every side's server "
                                    f"runs at once), {need / 2**30:.1f} GiB of KV cache: past this host's "
                                    f"{host / 2**30:.1f} GiB of memory{why}")
