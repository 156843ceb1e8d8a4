"""vLLM's recovery from a KV connector's failed loads (the FP8 tier's checksum failures), and the two gaps in it
kvsched closes (the scheduler side)."""

from __future__ import annotations

from typing import Any


def fix_load_failure_recovery(scheduler: Any) -> None:
    """Work around vLLM 0.32's AsyncScheduler losing a request after a KV load failure (found by kvsched's
    fault-injection test): `_handle_invalid_blocks` rolls the request back and `update_from_output` then skips its
    output, so the output placeholder the step added is never consumed and the scheduler never runs the request again
    (`num_computed_tokens + 2 - placeholders >= prompt + max_tokens`). The rolled-back requests get back the
    placeholders of the step whose output was discarded. Failed blocks leave the prefix cache (`_failed_load_blocks`).
    Idempotent."""
    if getattr(scheduler._handle_invalid_blocks, "__kvsched_wrapped__", False):
        return
    handle, update = scheduler._handle_invalid_blocks, scheduler.update_from_output
    current: list[Any] = [None]

    def update_from_output(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        current[0] = scheduler_output
        try:
            return update(scheduler_output, *args, **kwargs)
        finally:
            current[0] = None

    def handle_invalid_blocks(*args: Any, **kwargs: Any) -> set[str]:
        garbage = _failed_load_blocks(scheduler, *args, **kwargs)  # read before vLLM rolls the requests back
        affected: set[str] = handle(*args, **kwargs)
        if garbage and affected and getattr(scheduler, "recompute_kv_load_failures", False):
            scheduler.kv_cache_manager.evict_blocks(garbage)
        out = current[0]
        if out is None or not hasattr(scheduler, "_spec_token_placeholders"):  # not an AsyncScheduler
            return affected
        spec = getattr(out, "scheduled_spec_decode_tokens", None) or {}
        for req_id in affected:
            request = scheduler.requests.get(req_id)
            if request is None or req_id not in out.num_scheduled_tokens or request.is_prefill_chunk:
                continue
            added = int(getattr(scheduler, "num_sampled_tokens_per_step", 1)) + len(spec.get(req_id, ()))
            request.num_output_placeholders = max(0, request.num_output_placeholders - added)
        return affected

    handle_invalid_blocks.__kvsched_wrapped__ = True  # type: ignore[attr-defined]
    scheduler._handle_invalid_blocks = handle_invalid_blocks
    scheduler.update_from_output = update_from_output


def _failed_load_blocks(scheduler: Any, invalid_block_ids: set[int], num_scheduled_tokens: dict[str, int],
                        *_: Any, **__: Any) -> set[int]:
    """The blocks of running requests from their first block whose KV load failed on: the failed ones and those the
    same forward pass computed from them. vLLM's `recompute` policy (the one the FP8 tier needs) leaves them in the
    prefix cache, counting on the rolled-back request to recompute them; found by review: when that request is aborted
    or preempted first, the next request with the same prefix was served the garbage as a prefix-cache hit. They stay
    allocated to their requests (which recompute into them), only out of the prefix cache."""
    if not invalid_block_ids or len(scheduler.kv_cache_config.kv_cache_groups) != 1:  # vLLM refuses several groups
        return set()
    manager, block_size = scheduler.kv_cache_manager, int(scheduler.cache_config.block_size)
    out: set[int] = set()
    for request in scheduler.running:
        (ids,) = manager.get_block_ids(request.request_id)
        computed = request.num_computed_tokens - num_scheduled_tokens.get(request.request_id, 0)
        for i, block_id in enumerate(ids[:-(-computed // block_size)]):
            if block_id in invalid_block_ids:
                out.update(ids[i:])
                break
    return out
