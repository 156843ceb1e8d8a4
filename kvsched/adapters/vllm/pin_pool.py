"""vLLM's block pool as the pool `kvsched.core.pin_apply.PinApplier` applies pins to (blocks are vLLM's
KVCacheBlock objects; every access to the pool goes through compat)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

from kvsched.adapters.vllm import compat


class VllmPinPool:
    """`kvsched.core.pin_apply.PinPool` over the scheduler's KV cache manager."""

    __slots__ = ("scheduler",)

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def hold(self, blocks: list[Any]) -> None:
        compat.hold_blocks(self.scheduler, blocks)

    def give_back(self, blocks: list[Any]) -> None:
        compat.return_blocks(self.scheduler, blocks)

    def num_free(self) -> int:
        return compat.num_free_blocks(self.scheduler)

    def block_ids(self, blocks: list[Any]) -> Iterator[int]:
        return (b.block_id for b in blocks)

    def cached_keys(self, blocks: list[Any]) -> list[tuple[Hashable, int]]:
        return [(compat.block_content_key(b), b.block_id) for b in blocks if b.block_hash is not None]
