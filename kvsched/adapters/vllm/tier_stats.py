"""The FP8 tier's statistics (and its disk and shared levels'), as kvsched's `/metrics` and `/kvsched/sessions` show
them (kvsched.adapters.vllm.metrics names and documents each one)."""

from __future__ import annotations

import logging
from typing import Any

from kvsched.adapters.vllm import compat

logger = logging.getLogger("vllm.kvsched.fp8_tier")
CONNECTOR_STATS = ("restores", "tail_restores", "restored_blocks", "superseded_loads", "restored_tail_tokens",
                   "restore_misses", "load_failures", "err_sq", "ref_sq", "prefetched_blocks", "worker_seconds")

# The disk/shared levels' counters the workers keep (tier_levels_worker.TierLevelsWorker.counter_deltas), sent as
# deltas in TierWorkerMeta.counters and summed over workers and steps here (found by review: they never left the
# worker process). Shown with the levels' statistics.
WORKER_LEVEL_STATS = ("levels_copy_failures", "levels_dropped_write_jobs", "levels_write_jobs_dropped_for_bytes",
                      "levels_failed_write_jobs", "levels_shared_puts_dropped", "levels_dropped_fetch_jobs",
                      "levels_failed_fetch_jobs", "levels_fetches_given_up", "levels_fetch_thread_deaths")


def absorb_worker_meta(conn: Any, meta: Any) -> None:
    """The scheduler side takes in what the workers did this step (`TierWorkerMeta`, summed over workers)."""
    over = conn.fetches.reported(meta.fetch_landed)  # also once a reset turned the levels off: their slots come back
    if conn.levels is not None:
        conn.levels.written(meta.disk_done, meta.disk_full)
        conn.levels.fetch_failed(meta.fetch_failures)
        conn.levels.fetches_over(over)
    conn.stats["worker_seconds"] += meta.busy_s
    conn.stats["err_sq"] += meta.err_sq
    conn.stats["ref_sq"] += meta.ref_sq
    for name, n in meta.counters.items():  # kept after a reset turned the levels off: counters never go back
        conn.stats[name] = conn.stats.get(name, 0.0) + n
    if meta.disabled and not conn.disabled_reason:
        conn.disabled_reason = meta.disabled
        logger.warning("kvsched FP8 tier disabled by the worker: %s", meta.disabled)


def tier_stats(conn: Any) -> dict[str, Any]:
    """The tier's figures. Its byte figures are the engine's, every rank's share summed: under tensor/pipeline
    parallelism each of the engine's `world_size` ranks (on every node) holds its part of every slot (its heads of its
    layers; `block_bytes` is the first rank's, from the scheduler's KV cache spec, and each pipeline stage holds its
    own layers as vLLM splits them: kvsched.core.rank_shares). Found by review: they were one rank's, 1/N of the
    tier under `--tensor-parallel-size N`, when `--kvsched-fp8-tier-gb` is the host's total for the engine; then
    every stage was counted with the first stage's layers. The `rank` figures are the largest rank's."""
    d = conn.directory
    assert d is not None
    ref = conn.stats["ref_sq"]
    raw = conn.geometry is not None and conn.geometry.mode == "raw"
    shares = compat.rank_shares(conn.engine_config, conn.world_size)
    capacity = d.num_slots * d.block_bytes if conn.enabled else 0  # the first rank's
    out: dict[str, Any] = {
        "tier_enabled": float(conn.enabled),
        "tier_capacity_bytes": shares.engine(capacity), "tier_bytes": shares.engine(d.used_bytes),
        "tier_rank_capacity_bytes": shares.largest_rank(capacity), "tier_rank_bytes": shares.largest_rank(d.used_bytes),
        "tier_ranks": shares.world_size,
        "tier_blocks": d.used_slots, "tier_block_bytes": d.block_bytes,
        "tier_demotions": d.counters["demotions"], "tier_demoted_blocks": d.counters["demoted_blocks"],
        "tier_evicted_blocks": d.counters["evicted_blocks"], "tier_restores": conn.stats["restores"],
        "tier_declined_evictions": d.counters["declined_evictions"],
        "tier_restored_blocks": conn.stats["restored_blocks"], "tier_restore_misses": conn.stats["restore_misses"],
        "tier_tails": len(d.tail_of), "tier_tails_stored": d.counters["tails_stored"],
        "tier_restored_tail_tokens": conn.stats["restored_tail_tokens"],
        "tier_tail_restores": conn.stats["tail_restores"],
        "tier_superseded_loads": conn.stats["superseded_loads"],
        "tier_worker_seconds": conn.stats["worker_seconds"],
        "tier_load_failures": conn.stats["load_failures"],
        "tier_prefetched_blocks": conn.stats["prefetched_blocks"],
        "tier_kv_rel_rms_error": 0.0 if raw else (conn.stats["err_sq"] / ref) ** 0.5 if ref > 0 else -1.0,
        "tier_raw_fp8": float(raw),
    }
    if conn.disabled_reason:
        out["tier_disabled_reason"] = conn.disabled_reason
    if conn.levels is not None or conn.levels_final:
        out.update(conn.levels.stats() if conn.levels is not None else conn.levels_final)
        out.update(conn.fetches.stats())
        out.update((name, conn.stats.get(name, 0.0)) for name in WORKER_LEVEL_STATS)
    return out


# The levels' gauges of what they hold and can reach; their counters stay as they were.
LEVEL_GAUGES_OFF = ("disk_tier_capacity_bytes", "disk_tier_bytes", "disk_tier_blocks", "disk_tier_reading_blocks",
                    "store_up")


def levels_off(stats: dict[str, float]) -> dict[str, float]:
    """The disk/shared levels' statistics once a prefix-cache reset turned them off: found by review, their series
    vanished (a counter that disappears reads as a reset); now the counters stay, frozen, and the gauges are 0."""
    return {k: 0.0 if k in LEVEL_GAUGES_OFF else v for k, v in stats.items()}
