"""vLLM's block pool as the pool `kvsched.core.pin_apply.PinApplier` applies pins to (blocks are vLLM's
KVCacheBlock objects; every access to the pool goes through compat)."""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from kvsched.adapters.vllm import compat


class BlockRefs(Mapping[int, int]):
    """Block id -> pins holding it, for the blocks at least one pin holds: a read-only view of `VllmPinPool`'s counts.

    The counts are an array over vLLM's block ids (the pool's size is fixed) and the pool keeps how many are above 0,
    rather than a dict of the held ids: at 10,000 sessions the pins hold ~48,000 distinct blocks, each finished turn
    adds ~12 and releases as many, and a dict that large inserting and deleting ids was the hottest line of the pins'
    per-turn Python (`kvsched bench sched`'s profile: BENCHMARKS.md, "Scheduler overhead")."""

    __slots__ = ("_pool",)

    def __init__(self, pool: VllmPinPool) -> None:
        self._pool = pool

    def __getitem__(self, block_id: int) -> int:
        counts = self._pool.counts
        n = counts[block_id] if type(block_id) is int and 0 <= block_id < len(counts) else 0
        if not n:
            raise KeyError(block_id)
        return n

    def __len__(self) -> int:
        return self._pool.distinct

    def __iter__(self) -> Iterator[int]:  # O(pool blocks): stats, a prefix-cache reset and tests only
        return (i for i, n in enumerate(self._pool.counts) if n)


class VllmPinPool:
    """`kvsched.core.pin_apply.PinPool` over the scheduler's KV cache manager, counting the pins' references."""

    __slots__ = ("scheduler", "counts", "distinct", "refs", "_hold", "_return", "_num_free")

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.counts = array("I", bytes(array("I").itemsize * compat.num_block_ids(scheduler)))  # block id -> pins
        self.distinct = 0  # block ids whose count is above 0
        self.refs: Mapping[int, int] = BlockRefs(self)  # block id -> pins holding it (those held only)
        self._hold, self._return, self._num_free = compat.block_pool_calls(scheduler)

    def hold(self, blocks: list[Any]) -> None:
        self._hold(blocks)
        self.hold_allocated(blocks)

    def hold_allocated(self, blocks: list[Any]) -> None:
        counts = self.counts
        new = 0
        for b in blocks:
            i = b.block_id
            n = counts[i]
            counts[i] = n + 1
            if not n:
                new += 1
        self.distinct += new

    def give_back(self, blocks: list[Any]) -> None:
        """(A block no pin holds, e.g. a refused prefetch's, is returned to vLLM and its count stays 0.)"""
        counts = self.counts
        gone = 0
        for b in blocks:
            i = b.block_id
            n = counts[i]
            if n:
                counts[i] = n - 1
                if n == 1:
                    gone += 1
        self.distinct -= gone
        self._return(blocks)

    def num_free(self) -> int:
        return int(self._num_free())

    def num_pinned(self) -> int:
        return self.distinct

    def cached_keys(self, blocks: list[Any]) -> list[tuple[Hashable, int]]:
        return compat.cached_content_keys(blocks)
