"""vLLM's block pool as the pool `kvsched.core.pin_apply.PinApplier` applies pins to (blocks are vLLM's
KVCacheBlock objects; every access to the pool goes through compat)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

from kvsched.adapters.vllm import compat


class VllmPinPool:
    """`kvsched.core.pin_apply.PinPool` over the scheduler's KV cache manager, counting the pins' references."""

    __slots__ = ("scheduler", "refs", "_hold", "_return", "_num_free")

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.refs: Counter[int] = Counter()  # block id -> pins holding it
        self._hold, self._return, self._num_free = compat.block_pool_calls(scheduler)

    def hold(self, blocks: list[Any]) -> None:
        self._hold(blocks)
        refs = self.refs
        for b in blocks:
            i = b.block_id
            refs[i] = refs.get(i, 0) + 1

    def hold_allocated(self, blocks: list[Any]) -> None:
        self.refs.update(b.block_id for b in blocks)

    def give_back(self, blocks: list[Any]) -> None:
        refs = self.refs
        for b in blocks:
            i = b.block_id
            n = refs[i] - 1
            if n > 0:
                refs[i] = n
            else:
                refs.pop(i, None)  # dict's own: Counter's `del` is a Python method
        self._return(blocks)

    def num_free(self) -> int:
        return int(self._num_free())

    def num_pinned(self) -> int:
        return len(self.refs)

    def cached_keys(self, blocks: list[Any]) -> list[tuple[Hashable, int]]:
        return compat.cached_content_keys(blocks)
