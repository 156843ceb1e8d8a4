"""A finished request's pin, read per turn: the scheduler side's one hot reader of vLLM's block tables (bound once to
the scheduler; `blocks` holds the general readers it stands for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvsched.adapters.vllm.compat import blocks


def reusable_prefix(scheduler: Any, block_size: int) -> Callable[[Any], tuple[list[list[Any]], int]]:
    """`request -> (reusable_prefix_blocks, the tokens a hit on them covers)`, bound to the scheduler's KV-cache
    managers, which vLLM builds once with the scheduler. With one full-attention group (most models) it reads that
    group's table of blocks directly: the same run and count as `reusable_prefix_blocks` then `block_tokens`, without
    their look-ups per finished turn; otherwise those two calls (or `pin_hit_tokens` for several groups)."""
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if len(managers) == 1 and not isinstance(managers[0], blocks._SLIDING or blocks._sliding_window_manager()):
        table = managers[0].req_to_blocks

        def one_group(request: Any) -> tuple[list[list[Any]], int]:
            held = table.get(request.request_id) or []
            end = len(held)
            while end and (held[end - 1].block_hash is None or held[end - 1].is_null):
                end -= 1
            run = blocks.hashed_run(held, end)
            return [run], int(run[-1].block_hash_num_tokens or end * block_size) if run else 0

        return one_group

    def groups_of(request: Any) -> tuple[list[list[Any]], int]:
        groups = blocks.reusable_prefix_blocks(scheduler, request)
        if len(groups) == 1:
            return groups, blocks.block_tokens(groups[0], block_size)
        return groups, blocks.pin_hit_tokens(scheduler, groups, block_size) if groups else 0

    return groups_of
