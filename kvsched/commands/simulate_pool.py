"""The pool `kvsched simulate` replays on: its size in blocks (`--capacity-blocks`, `--kv-gib`, a recording's own
pool, or `--pressure` over the trace's distinct or peak live blocks), split across `--replicas`, and the bytes a token
and a tier block take."""

from __future__ import annotations

import argparse
import math
from typing import Any

from kvsched.bench.args import MAX_COUNT, MAX_GIB

DEFAULT_PRESSURE = 2.0
DEFAULT_PRESET = "llama-3.1-8b"
DEFAULT_KV_DTYPE = "fp8"


def replica_capacity(args: argparse.Namespace, trace: Any, bytes_per_token: int) -> int:
    """Blocks of each replica's pool: the pool asked for, split across `--replicas` (what does not divide is left
    out, and the summary reports the pool replayed). A pool smaller than the replicas is refused: each replica would
    have been given one block, a larger pool than asked, quietly (found by review)."""
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    total = capacity_blocks(args, trace, bytes_per_token)
    if total < args.replicas:
        asked = f"--capacity-blocks {total}" if args.capacity_blocks is not None else f"a pool of {total} blocks"
        raise ValueError(f"{asked} cannot be split across --replicas {args.replicas}: each replica needs at least "
                         "one block; give a larger pool or fewer replicas")
    return total // args.replicas


def capacity_blocks(args: argparse.Namespace, trace: Any, bytes_per_token: int) -> int:
    if args.capacity_blocks is not None:
        if args.capacity_blocks <= 0:
            raise ValueError("--capacity-blocks must be positive")
        return int(args.capacity_blocks)
    if args.kv_gib is not None:
        from kvsched.core.planner import GIB, ModelShape, kv_capacity_tokens

        if not 0 < args.kv_gib <= MAX_GIB:
            raise ValueError(f"--kv-gib must be a positive number of GiB, not {args.kv_gib}")
        if args.preset is None and trace.recorded_bytes is not None:  # the recording engine's bytes per token
            return max(int(args.kv_gib * GIB) // (bytes_per_token * trace.block_size), 1)
        tokens = kv_capacity_tokens(ModelShape.from_preset(args.preset or DEFAULT_PRESET),
                                    args.kv_dtype or DEFAULT_KV_DTYPE, int(args.kv_gib * GIB), trace.block_size)
        return max(tokens // trace.block_size, 1)
    recorded = trace.recorded_capacity_blocks  # KVSCHED_RECORD_TRACE: the recording engine's own pool
    if args.pressure is None and recorded is not None:
        return recorded
    pressure = DEFAULT_PRESSURE if args.pressure is None else args.pressure
    if not 0 < pressure < math.inf:
        raise ValueError("--pressure must be a finite number > 0")
    basis = trace.peak_live_blocks() if args.pressure_basis == "live" else trace.working_set_blocks()
    if basis == 0:  # a pool of one block, every request rejected: no --pressure could help (found by review)
        what = ("reuses no block (no block recurs in a later request), so it has no live blocks"
                if args.pressure_basis == "live" else "names no block")
        raise ValueError(f"--pressure-basis {args.pressure_basis}: this trace {what} to size a pool from; give "
                         "--capacity-blocks or --kv-gib" + (", or --pressure-basis distinct"
                                                            if args.pressure_basis == "live" else ""))
    if not (blocks := basis / pressure) <= MAX_COUNT:  # found by review: 1e-320 made it infinite, a traceback
        raise ValueError(f"--pressure {pressure:g} makes a pool of {blocks:.4g} blocks, past {MAX_COUNT}")
    return max(math.ceil(blocks), 1)


def engine_bytes(args: argparse.Namespace, trace: Any) -> tuple[int, int | None]:
    """(KV bytes per token, FP8-tier bytes per block) the replay sizes pools and tiers by: an engine's recording's own
    unless --preset names a model, else the preset's; the tier's None for a model the FP8 tier does not serve (a
    tier asked for on it is refused: `simulate_tier.sized_tier`)."""
    from kvsched.core.planner import ModelShape, PlanError, fp8_tier_block_bytes, kv_bytes_per_token

    recorded = trace.recorded_bytes
    if args.preset is None and recorded is not None:
        if args.kv_dtype is not None:  # found by review: accepted, and the recording's bytes used all the same
            raise ValueError(f"--kv-dtype {args.kv_dtype} applies to a --preset's model; this recording sizes pools "
                             f"and bytes by its engine's own {recorded[0]} bytes per token: give --preset too, or "
                             "no --kv-dtype")
        return recorded
    shape = ModelShape.from_preset(args.preset or DEFAULT_PRESET)
    dtype = args.kv_dtype or DEFAULT_KV_DTYPE
    try:
        block_bytes: int | None = fp8_tier_block_bytes(shape, dtype, trace.block_size)
    except PlanError:  # MLA, sliding window
        block_bytes = None
    return kv_bytes_per_token(shape, dtype), block_bytes
