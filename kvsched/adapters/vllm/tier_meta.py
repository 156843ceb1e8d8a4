"""What the FP8 tier's connector sends between its scheduler and worker sides each step."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvsched.adapters.vllm.tier_levels import LevelOps
from kvsched.core.tier import Load, Store


@dataclass
class TierStepMeta(KVConnectorMetadata):
    """One step's tier work, scheduler -> workers: the disk/shared levels' spills and publishes, the tier's stores,
    the levels' fetches (started in the background), then prefetches (all before the step), then the scheduled
    requests' loads.

    The stores travel as three lists of ints (pool block, slot, tokens: 0 for a full block), the worker's arguments
    as they are: a `Store` object per block, held from the release that planned it until the step's output was
    dropped, set off most of the extra garbage collections the tier cost the scheduler (`bench sched --tier`, 10,000
    sessions, 1,500 steps: 302 gen-0 collections with them, 134 with ints, 92 without the tier)."""

    store_blocks: list[int] = field(default_factory=list)
    store_slots: list[int] = field(default_factory=list)
    store_tokens: list[int] = field(default_factory=list)
    prefetches: list[Load] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    levels: LevelOps | None = None

    def add_stores(self, stores: Iterable[Store]) -> None:
        blocks, slots, tokens = self.store_blocks, self.store_slots, self.store_tokens
        for st in stores:
            blocks.append(st.block_id)
            slots.append(st.slot)
            tokens.append(st.tokens)

    @property
    def stores(self) -> list[Store]:
        """The step's stores as records (tests, logs)."""
        return [Store(b, s, t) for b, s, t in zip(self.store_blocks, self.store_slots, self.store_tokens, strict=True)]

    def drop_superseded(self) -> int:
        """Keep only the last load planned into each block; returns how many were dropped. A block planned for a load
        may be released and handed out again later in the same step (a prefetched pin yields to pressure and another
        prefetch or admission takes the block): only the last is current. Prefetches run before admissions' loads,
        in planning order."""
        last: dict[int, int] = {}
        planned = [*self.prefetches, *self.loads]
        for i, ld in enumerate(planned):
            last[ld.block_id] = i
        if len(last) == len(planned):
            return 0
        n = len(self.prefetches)
        self.prefetches = [ld for i, ld in enumerate(self.prefetches) if last[ld.block_id] == i]
        self.loads = [ld for i, ld in enumerate(self.loads) if last[ld.block_id] == n + i]
        return len(planned) - len(last)


@dataclass
class TierWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: what the store did (summed over workers)."""

    loaded_blocks: int = 0
    failed_blocks: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    disabled: str = ""  # why this worker cannot run the tier (reported once)
    disk_done: list[tuple[Any, bool]] = field(default_factory=list)  # disk writes completed: (key, ok)
    disk_full: bool = False
    fetch_failures: list[tuple[Any, str]] = field(default_factory=list)  # (key, level) that failed their checks
    fetch_landed: list[tuple[Any, int, bool]] = field(default_factory=list)  # (key, slot, filled): fetches over
    busy_s: float = 0.0  # seconds the worker spent in the tier's copies this step (before and during the forward)
    counters: dict[str, int] = field(default_factory=dict)  # the levels' counters since the last report (tier_stats)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TierWorkerMeta)
        return TierWorkerMeta(self.loaded_blocks + other.loaded_blocks, self.failed_blocks + other.failed_blocks,
                              self.err_sq + other.err_sq, self.ref_sq + other.ref_sq, self.disabled or other.disabled,
                              self.disk_done + other.disk_done, self.disk_full or other.disk_full,
                              self.fetch_failures + other.fetch_failures,
                              self.fetch_landed + other.fetch_landed, max(self.busy_s, other.busy_s),
                              dict(Counter(self.counters) + Counter(other.counters)))

    def __bool__(self) -> bool:
        return bool(self.loaded_blocks or self.failed_blocks or self.ref_sq or self.disabled or self.disk_done
                    or self.disk_full or self.fetch_failures or self.fetch_landed or self.busy_s or self.counters)
