"""The FP8 tier's footing on this machine: its size (the default rule applied to this host's memory and KV pool, or the
size asked for, refused when the machine cannot hold it) and the engine's KV cache layout name for the start-up log.

A size is one rank's: under tensor (or pipeline) parallelism every rank's worker holds its own copy of each slot (its
share of the heads or layers), so the scheduler's slots take that size on every rank. The default rule is one rank's
share already (the host's memory split between its GPUs); `--kvsched-fp8-tier-gb N` is the host's total for this
engine, split between its ranks on this host (`ranks_on_host`). Found by review: N was checked against the host's
memory as a total and given to every rank whole, so at TP=8 a 400 GiB tier on a 512 GiB host grew to 3.2 TB."""

from __future__ import annotations

import logging
import math
from typing import Any

from kvsched.adapters.vllm.tier_layout import TierGeometry
from kvsched.core.rank_shares import RankShares
from kvsched.core.tier_config import AUTO_HOST_FRACTION, AUTO_POOL_MULTIPLE, auto_budget_bytes, check_fits_host

logger = logging.getLogger("vllm.kvsched.fp8_tier")
AUTO_RULE = (f"min({AUTO_POOL_MULTIPLE:g} x the KV pool's bytes, {AUTO_HOST_FRACTION:g} x available host memory / "
             f"the GPUs or this engine's ranks on the host, whichever is more)")


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory: at most this process's cgroup limit, and at most the room its cgroups
    have left (a container's: found by review, the machine's whole memory was read inside a smaller container; then
    (review69) the container's limit was read as available however much of it was in use: `cgroup_memory`)."""
    import psutil

    from kvsched.adapters.vllm.cgroup_memory import cgroup_memory

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    if (found := cgroup_memory()) is not None:
        limit, room = found
        return min(total, limit), min(available, room)
    return total, available


def engines_per_host() -> int:
    """How many engines (one per GPU) may share this host's memory: the machine's GPU count, 1 on a CPU host."""
    return max(1, gpus_on_host())


def gpus_on_host() -> int:
    """The machine's GPU count (NVIDIA's library, else torch), 0 if it has none or they cannot be seen."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return max(0, int(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver or library: a CPU host, or a GPU the library cannot see
        pass
    try:
        import torch

        return max(0, torch.cuda.device_count())
    except Exception:
        return 0


def ranks_on_host(parallel_config: Any) -> int:
    """This engine's ranks on this host, each holding its own copy of the tier's slots: its world size (tensor x
    pipeline parallel), at most vLLM's local world size (a multi-node engine's per node, as `--nnodes` gives it) and,
    on a GPU host, at most the GPUs the default rule splits the host between. 1 without parallelism (no probe)."""
    world = int(getattr(parallel_config, "world_size", 1) or 1)
    if world <= 1:
        return 1
    try:
        local = int(parallel_config.local_world_size)
    except Exception:  # an older config, or nnodes not divisible by the data-parallel layout: the world size
        local = world
    gpus = gpus_on_host()
    return max(1, min(world, local, gpus) if gpus else min(world, local))


def pool_bytes(geometry: TierGeometry, num_blocks: int) -> int:
    """Bytes the engine's KV pool holds (every layer, in the cache's own dtype)."""
    per_block = len(geometry.layers) * geometry.heads * geometry.rows * geometry.content * geometry.dtype.itemsize
    return per_block * num_blocks


def budget_bytes(requested_gib: float | None, geometry: TierGeometry, num_blocks: int, ranks: int = 1) -> int:
    """One rank's tier budget: `requested_gib` (the host's total for this engine, refused with TierConfigError beyond
    the host's memory) split between the engine's `ranks` on this host, or the default rule."""
    total, available = host_memory()
    if requested_gib is not None:
        budget = int(requested_gib * 2**30)
        check_fits_host(budget, total)
        return budget // max(ranks, 1)
    # the host's share divided between the engines on it, and between this engine's ranks on it: on a CPU host (no
    # GPU to count) a TP=4 engine's four ranks took a quarter of the host each (found by review)
    return auto_budget_bytes(pool_bytes(geometry, num_blocks), available, max(engines_per_host(), ranks))


def _layer_bound(geometry: TierGeometry) -> int:
    """One layer's block staged alone, at most (tier_pieces.view_bound): a worker's view is a layer or less."""
    from kvsched.adapters.vllm.tier_pieces import view_bound

    return view_bound(geometry.block_bytes // max(len(geometry.layers), 1))


def stage_pool(link: Any, geometry: TierGeometry, stage_bytes: int, stage_set: bool) -> tuple[Any, str]:
    """The worker's copy staging (tier_link.StagePool) for `link`'s device, planned as `staging_bytes` counts it, and
    how its device bound was chosen (the start-up log)."""
    from kvsched.adapters.vllm import tier_link

    plan = tier_link.stage_plan(stage_bytes)
    device, how = tier_link.device_stage_bytes(link.device, plan, stage_bytes if stage_set else None)
    return tier_link.StagePool(plan, link.pin, allocate=link.pin, device_bytes=device), how


def staging_bytes(stage_bytes: int, geometry: TierGeometry, platform: str) -> int:
    """The host bytes each rank pins to stage its copies (tier_link.StagePlan: at most `stage_bytes`, whatever the
    model's slots; the worker plans with the same figures), counted in its budget: the slots get what is left. None on
    a CPU engine (`platform`, vLLM's device type): nothing is pinned there, and the copies' buffers are the kernels'
    outputs, freed within the step. TierConfigError when a buffer cannot hold one layer's block (tier_pieces)."""
    from kvsched.adapters.vllm.tier_link import STAGE_BUFFERS, stage_plan
    from kvsched.adapters.vllm.tier_pieces import refuse_unless_fits

    if platform != "cuda":  # tier_link.link_for: only a CUDA cache (ROCm's too) has a pinned, copied-through link
        return 0
    plan, need = stage_plan(stage_bytes), _layer_bound(geometry)
    refuse_unless_fits(need <= plan.buffer_bytes, plan.buffer_bytes, need, STAGE_BUFFERS)
    return plan.host_bytes


def layout_name(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """The engine's resolved KV cache layout (vLLM 0.32's `KVCacheLayout` name), when it says."""
    name = getattr(kv_cache_config, "kv_cache_layout", None)
    if name:
        return str(getattr(name, "name", name))
    try:
        return str(vllm_config.cache_config.get_resolved_kv_cache_layout().name)
    except Exception:  # an older config object: the name is for the log only
        return None


def log_start(disabled: str, geometry: TierGeometry | None, budget: int, auto: bool, num_slots: int,
              setting: str, ranks: int = 1, least: int | None = None, shares: RankShares | None = None,
              staging: int = 0) -> None:
    """The tier's one start-up line: why it is off, or its size (and the rule or `setting` that gave it; one rank's
    `budget`, on each of `ranks` on this host), what each rank holds and the layout. `least`: the host's bytes that
    hold one slot (default: a block on each of `ranks`; pipeline stages: RankShares.host_budget_for). `staging`: the
    part of each rank's `budget` its copies' staging buffers take. `shares`: the
    engine's pipeline stages, each rank holding its own layers' part of every slot (found by review: every rank was
    said to hold `budget`, though under uneven stages the stages' ranks hold different amounts, none of them that)."""
    if disabled or geometry is None:
        logger.warning("kvsched FP8 tier disabled: %s", disabled)
        return
    if num_slots == 0:  # found by review: a size below one block (e.g. 1e-12 GiB) ran without a tier, silently
        logger.warning("kvsched FP8 tier disabled: %d bytes (%s) hold no block of this model's %d bytes; give at "
                       "least %.6f GiB, or 0 to turn it off", budget, "auto: " + AUTO_RULE if auto else setting,
                       geometry.block_bytes, math.ceil((least or geometry.block_bytes * ranks) / 2**30 * 1e6) / 1e6)
        return
    each = f", {budget / 2**30:.2f} GiB for each of this engine's {ranks} ranks on this host" if ranks > 1 else ""
    slots = f"{num_slots} slots of {geometry.block_bytes} bytes"
    if shares is not None and shares.stage_layers:  # the block measured is a stage-0 rank's part of a slot
        slots += " on a stage-0 rank; a rank holds " + ", ".join(
            f"{num_slots * held / 2**30:.3g} GiB in stage {s} ({n} ranks{', no layers' if not held else ''})"
            for s, (n, held) in enumerate(shares.rank_bytes(geometry.block_bytes)))
    if staging:
        slots += f" and {staging / 2**20:.0f} MiB of copy staging on each rank (in the budget; KVSCHED_TIER_STAGE_MB)"
    logger.info("kvsched FP8 tier: %.2f GiB of host memory (%s)%s, %s; %s layout, %s (%d layers, %d heads x %d x %d "
                "%s per block)", budget * ranks / 2**30, "auto: " + AUTO_RULE if auto else setting, each, slots,
                geometry.layout, geometry.mode, len(geometry.layers),
                geometry.heads, geometry.rows, geometry.content, geometry.dtype)
