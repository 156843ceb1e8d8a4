"""vLLM's block pool, KV cache manager and scheduler internals kvsched reads or hooks (the scheduler side)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from kvsched.core.rank_shares import RankShares

# ---- blocks -----------------------------------------------------------------------------------------------------
_SLIDING: type | None = None  # vLLM's SlidingWindowManager, imported once (an import per finished turn costs a
# module lookup and a from-list walk)


def _sliding_window_manager() -> type:
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    global _SLIDING
    _SLIDING = SlidingWindowManager
    return SlidingWindowManager


def reusable_prefix_blocks(scheduler: Any, request: Any) -> list[list[Any]]:
    """Per KV-cache group, the blocks of a finished request that a later request's prefix-cache hit at the end of its
    hashed prefix needs, in position order.

    A full-attention group (any kind but sliding window): the leading run of hashed blocks, since a hit needs the whole
    hash chain from token 0 and blocks past the first unhashed one are of no use. A sliding-window group: the window of
    blocks ending where the hashed prefix ends (vLLM 0.32's `SlidingWindowManager.find_longest_cache_hit` needs that
    many contiguous cached blocks there, or a run from block 0), which starts past block 0 once the request is longer
    than the window; [] when they are no longer all cached. Found by review: a group leading with null blocks (every
    sliding-window group past its window) was never pinned, and the next turn of a hybrid model hit nothing."""
    sliding = _SLIDING or _sliding_window_manager()
    request_id = request.request_id
    out: list[list[Any]] = []
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        blocks = manager.req_to_blocks.get(request_id) or []  # as the coordinator's get_blocks, without its tuple
        end = len(blocks)  # hashed blocks form a prefix: usually only the last block is partial (unhashed)
        while end and (blocks[end - 1].block_hash is None or blocks[end - 1].is_null):
            end -= 1
        if isinstance(manager, sliding):
            out.append(_hit_window(scheduler, request, manager, blocks, end))
        else:
            out.append(hashed_run(blocks, end))
    return out


def hashed_run(blocks: list[Any], end: int) -> list[Any]:
    """A full-attention group's blocks a hit needs: its first `end` (hashed) blocks, or [] when the run has a gap.
    Hashes form a prefix: checking the first block is enough to know the run has no gap (O(1))."""
    return blocks[:end] if end and not (blocks[0].is_null or blocks[0].block_hash is None) else []


def _hit_window(scheduler: Any, request: Any, manager: Any, blocks: Sequence[Any], end: int) -> list[Any]:
    """The sliding-window group's blocks a hit ending at block `end` needs: the request's own (those still in its
    window), then, going back, blocks that left its window but are still cached (the window's first block leaves it
    a token before the request's last block fills)."""
    need = max(1, manager._contiguous_blocks_for_hit(manager.sliding_window, manager.block_size, manager.use_eagle))
    start = end
    while start and end - start < need and not blocks[start - 1].is_null and blocks[start - 1].block_hash is not None:
        start -= 1
    window = list(blocks[start:end])
    if window and start and len(window) < need:
        from vllm.v1.core.kv_cache_utils import resolve_block_hashes

        hashes = resolve_block_hashes(request.block_hashes, hash_block_size(scheduler), manager.block_size)
        pool = block_pool(scheduler)
        while start and len(window) < need and start - 1 < len(hashes):
            found = pool.get_cached_block(hashes[start - 1], [manager.kv_cache_group_id])
            if not found:
                break
            start -= 1
            window.insert(0, found[0])
    return window if len(window) >= need or (window and not start) else []


def pin_hit_tokens(scheduler: Any, groups: Sequence[Sequence[Any]], block_size: int) -> int:
    """Tokens a later request's hit on a pin of `groups` (`reusable_prefix_blocks`) covers: the least over its
    full-attention and sliding-window groups, as vLLM's hybrid hit is the length every group can serve (0 when one
    cannot). Groups of other kinds, whose hits kvsched does not model, do not count (the first group's when none is
    left)."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager

    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    counted = [g for g, m in zip(groups, managers, strict=False) if isinstance(m, (FullAttentionManager,
               SlidingWindowManager)) and getattr(m.kv_cache_spec, "prefix_cacheable", True)] or list(groups[:1])
    return min((block_tokens(g, block_size) for g in counted), default=0)


def partial_tail(scheduler: Any, request: Any, prefix: Sequence[Any], block_size: int) -> tuple[bytes, list[int],
                                                                                             int] | None:
    """The finished request's KV past its hashed `prefix` (first KV-cache group), when it is less than one block:
    (content key of the last prefix block, the tokens, the block holding them); None otherwise.

    Only tokens whose KV a forward pass wrote count: every token but the last sampled one (which was never fed back),
    and, for a request aborted in the middle of its prefill, none past the last scheduled chunk (vLLM hashes full
    blocks when it schedules them, so `prefix` may end inside the prompt). With async scheduling a further step may
    still be in flight for the request, but it only writes past them. None as well for a request whose KV at a
    position depends on more than the token id there (prompt embeddings, multimodal inputs): a tail is keyed by its
    token ids alone (see `tail_keyed_by_tokens`)."""
    k = len(prefix)
    kv_end = min(request.num_tokens - 1, request.num_computed_tokens)
    if not tail_keyed_by_tokens(request):
        return None
    if not k or not k * block_size < kv_end < (k + 1) * block_size:
        return None
    blocks = scheduler.kv_cache_manager.coordinator.get_blocks(request.request_id)[0]
    if len(blocks) <= k or blocks[k].is_null or int(prefix[-1].block_hash_num_tokens or k * block_size) != k * block_size:
        return None
    return block_content_key(prefix[-1]), list(request.all_token_ids[k * block_size:kv_end]), blocks[k].block_id


def tail_keyed_by_tokens(request: Any) -> bool:
    """True if the request's KV past a full block is fixed by that block's hash and the token ids after it, so a
    partial block may be stored and matched by them (`kvsched.core.tier.TailKey`). vLLM's block hashes also cover
    prompt embeddings and multimodal inputs (`generate_block_hash_extra_keys`; an embedded position's token id is 0,
    an image's placeholders are the same ids for every image): such a request neither stores nor loads a tail. (LoRA
    and the cache salt are in the parent block's hash chain already.)"""
    return getattr(request, "prompt_embeds", None) is None and not getattr(request, "mm_features", None)


def block_tokens(blocks: Sequence[Any], block_size: int) -> int:
    """Tokens covered by a prefix run of blocks (a block's hash records the tokens from position 0 it covers)."""
    if not blocks:
        return 0
    return int(blocks[-1].block_hash_num_tokens or len(blocks) * block_size)


def block_content_key(block: Any) -> bytes:
    """The content hash of a cached block as requests carry it (`Request.block_hashes`): vLLM stores a block's hash
    with its KV-cache group id appended (`make_block_hash_with_group_id`)."""
    from vllm.v1.core.kv_cache_utils import get_block_hash

    return bytes(get_block_hash(block.block_hash))


def cached_content_keys(blocks: Sequence[Any]) -> list[tuple[Hashable, int]]:
    """(content key, block id) of each of `blocks` that is in the prefix cache, in order: `block_content_key` for a
    whole released pin or finished turn at once (one import and one property read per block, not three calls)."""
    from vllm.v1.core.kv_cache_utils import get_block_hash

    out: list[tuple[Hashable, int]] = []
    for b in blocks:
        h = b.block_hash
        if h is not None:
            out.append((bytes(get_block_hash(h)), b.block_id))
    return out


def fp8_tier(scheduler: Any) -> Any:
    """kvsched's FP8 tier connector, if the engine runs with it (`--kvsched-fp8-tier-gb` / `--kv-transfer-config`)."""
    connector = getattr(scheduler, "connector", None)
    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector

    return connector if isinstance(connector, KVSchedFP8TierConnector) else None


def worker_rank() -> int:
    """This worker's rank in the tensor-parallel group (0 without one): the disk and shared levels keep a file/entry
    per rank."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised (a single process): rank 0
        return 0


def block_pool(scheduler: Any) -> Any:
    return scheduler.kv_cache_manager.block_pool


def hold_blocks(scheduler: Any, blocks: Sequence[Any]) -> None:
    """Take a reference on blocks (out of the free queue if they were there): vLLM cannot evict them."""
    block_pool(scheduler).touch(blocks)


def return_blocks(scheduler: Any, blocks_evict_first_first: Sequence[Any]) -> None:
    """Drop references; blocks that reach zero join the free queue in this order (the first is evicted first)."""
    block_pool(scheduler).free_blocks(blocks_evict_first_first)


def block_pool_calls(scheduler: Any) -> tuple[Callable[[Sequence[Any]], None], Callable[[Sequence[Any]], None],
                                               Callable[[], int]]:
    """(hold_blocks, return_blocks, num_free_blocks) bound to the scheduler's block pool, which lives as long as the
    scheduler: the pins' calls on every finished turn and release skip three attribute lookups each."""
    pool = block_pool(scheduler)
    return pool.touch, pool.free_blocks, pool.get_num_free_blocks


def pool_holds(scheduler: Any) -> Callable[[Hashable], bool]:
    """Whether the block pool holds a tier key's block referenced (a request or a pin): a prefix-cache lookup of the
    hash `cached_content_keys` gives (KV-cache group 0, the tier's), no scan (kvsched.core.tier_reach)."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id as with_group

    get = block_pool(scheduler).cached_block_hash_to_block.get_one_block
    return lambda key: isinstance(key, bytes) and (b := get(with_group(key, 0))) is not None and b.ref_cnt > 0


def prefix_cache_full(scheduler: Any) -> bool:
    """True when vLLM's next allocation evicts a cached block: the free queue's first block holds a hash (every block
    never used or freed without one has been taken). O(1)."""
    queue = block_pool(scheduler).free_block_queue
    head = queue.fake_free_list_head.next_free_block
    return head is not None and head is not queue.fake_free_list_tail and head.block_hash is not None


def num_free_blocks(scheduler: Any) -> int:
    return int(block_pool(scheduler).get_num_free_blocks())


def num_waiting(scheduler: Any) -> int:
    """Requests waiting to be scheduled."""
    return len(scheduler.waiting)


def num_block_ids(scheduler: Any) -> int:
    """Block ids run over range(this): the pool's blocks, its null block included (fixed for the scheduler's life)."""
    return len(block_pool(scheduler).blocks)


def num_total_blocks(scheduler: Any) -> int:
    """Usable blocks (vLLM reserves one null block)."""
    return int(block_pool(scheduler).num_gpu_blocks) - 1


def data_parallel_size(scheduler: Any) -> int:
    """Engines of one data-parallel deployment (each has its own scheduler); 1 when not said."""
    return max(int(getattr(getattr(scheduler, "parallel_config", None), "data_parallel_size", 1) or 1), 1)


def world_size(scheduler: Any) -> int:
    """The engine's ranks (tensor x pipeline parallel, every node), each holding its part of every KV block; 1 when not
    said."""
    return max(int(getattr(getattr(scheduler, "parallel_config", None), "world_size", 1) or 1), 1)


def rank_shares(vllm_config: Any, world: int | None = None) -> RankShares:
    """The engine's ranks (`world`, else its world size) and its pipeline stages' hidden layers as vLLM splits them
    (`vllm.distributed.utils.get_pp_indices`, which each stage's model is built with; it follows
    VLLM_PP_LAYER_PARTITION): how its ranks share each KV block (kvsched.core.rank_shares)."""
    parallel = vllm_config.parallel_config
    world = max(int(world or getattr(parallel, "world_size", 1) or 1), 1)
    stages = max(int(getattr(parallel, "pipeline_parallel_size", 1) or 1), 1)
    if stages == 1:
        return RankShares(world)
    return RankShares(world, _stage_layers(int(vllm_config.model_config.get_total_num_hidden_layers()), stages,
                                           os.environ.get("VLLM_PP_LAYER_PARTITION")))


@functools.lru_cache(maxsize=8)
def _stage_layers(layers: int, stages: int, partition: str | None) -> tuple[int, ...]:
    """Once per layout (`partition`: the environment's, in the key; vLLM logs an uneven split at every call)."""
    from vllm.distributed.utils import get_pp_indices

    return tuple(end - start for start, end in (get_pp_indices(layers, rank, stages) for rank in range(stages)))


def hash_block_size(scheduler: Any) -> int:
    """Tokens per entry of a request's `block_hashes` (vLLM's `hash_block_size`; the block size unless a hybrid
    model's groups hash at a finer grain)."""
    return int(getattr(scheduler, "hash_block_size", None) or scheduler.cache_config.block_size)


def kv_bytes_per_token(scheduler: Any) -> float:
    """KV bytes one token occupies across all layers, from the engine's own KV cache spec (follows the cache dtype)."""
    cfg = scheduler.kv_cache_config
    total = 0.0
    for group in cfg.kv_cache_groups:
        spec = group.kv_cache_spec
        total += len(group.layer_names) * spec.page_size_bytes / spec.block_size
    return total


def cached_prefix(scheduler: Any, chain: Sequence[Any], limit: int) -> list[Any]:
    """The blocks of the leading run of `chain` (a request's block hashes) vLLM's prefix cache holds now (group 0),
    at most `limit` of them."""
    pool = block_pool(scheduler)
    out: list[Any] = []
    for block_hash in chain[:limit]:
        found = pool.get_cached_block(block_hash, [0])
        if not found:
            break
        out.append(found[0])
    return out


def new_blocks(scheduler: Any, n: int) -> list[Any]:
    """`n` blocks taken from the free queue (evicting its least recent cached blocks), referenced once by the caller."""
    return list(block_pool(scheduler).get_new_blocks(n))


def can_cache_without_request(scheduler: Any) -> bool:
    """True when blocks can be entered into the prefix cache from their hashes alone: with KV cache events on, vLLM
    derives each event's extra keys from the request that computed the block."""
    return not getattr(block_pool(scheduler), "enable_kv_cache_events", False)


def cache_restored_blocks(scheduler: Any, blocks: Sequence[Any], chain: Sequence[Any], first: int,
                          request: Any = None) -> None:
    """Enter `blocks`, which hold the KV of `chain[first:first + len(blocks)]`, into vLLM's prefix cache under those
    hashes (as vLLM caches a request's full blocks), so that a request whose prefix matches hits them."""
    from types import SimpleNamespace

    owner = request if request is not None else SimpleNamespace(block_hashes=list(chain))
    padded = [None] * first + list(blocks)
    block_size = int(scheduler.cache_config.block_size)
    block_pool(scheduler).cache_full_blocks(owner, padded, first, first + len(blocks), block_size, 0)


def evict_from_prefix_cache(scheduler: Any, block_ids: set[int]) -> None:
    """Remove blocks from the prefix cache (their KV must not be hit); referenced blocks stay allocated."""
    scheduler.kv_cache_manager.evict_blocks(block_ids)


def async_scheduling(scheduler: Any) -> bool:
    """True when the engine schedules a step before the previous step's output is processed (GPU async scheduling)."""
    return bool(getattr(getattr(scheduler, "scheduler_config", None), "async_scheduling", False))


def connector_metadata(connector: Any) -> Any:
    """This step's metadata on a worker-side KV connector (`KVConnectorBase_V1._get_connector_metadata`)."""
    return connector._get_connector_metadata()


# `KVCacheManager.allocate_slots`'s parameters and defaults in vLLM 0.32: with exactly these, the wrapper below takes
# them by name and passes them on by position (about 0.1 us less per call than *args/**kwargs; it runs for every
# scheduled request every step). Any other signature gets the generic wrapper.
_ALLOCATE_SLOTS_PARAMS = (("request", None), ("num_new_tokens", None), ("num_new_computed_tokens", 0),
                          ("new_computed_blocks", None), ("num_lookahead_tokens", 0),
                          ("num_external_computed_tokens", 0), ("delay_cache_blocks", False), ("num_encoder_tokens", 0),
                          ("full_sequence_must_fit", False), ("reserved_blocks", 0), ("has_scheduled_reqs", True),
                          ("skip_zeroing_group_ids", ()))


def _has_032_allocate_slots_signature(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    empty = inspect.Parameter.empty
    return [(p.name, None if p.default is empty else p.default) for p in params] == list(_ALLOCATE_SLOTS_PARAMS) and all(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def wrap_allocate_slots(scheduler: Any, on_shortage: Callable[[Any, int, int], bool]) -> None:
    """Make the KV cache manager call `on_shortage(request, num_new_tokens, own_free_hits)` when it cannot allocate,
    and retry while it returns True. `own_free_hits`: the request's prefix-cache hits that sit in the free queue (they
    count as free blocks, but the request takes them out of the queue, so they cannot serve its new tokens).

    This is how pins yield to live requests before vLLM preempts or queues anything: vLLM's scheduler preempts (or
    stops admitting) exactly when `allocate_slots` returns None."""
    manager = scheduler.kv_cache_manager
    if getattr(manager.allocate_slots, "__kvsched_wrapped__", False):
        return
    original = manager.allocate_slots

    def retry(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        request = args[0] if args else kwargs["request"]
        num_new_tokens = args[1] if len(args) > 1 else kwargs.get("num_new_tokens", 0)
        # tokens a KV connector (the FP8 tier) loads need new blocks too
        num_new_tokens += args[5] if len(args) > 5 else kwargs.get("num_external_computed_tokens", 0)
        if type(num_new_tokens) is not int:  # a connector's numpy count: the compiled bookkeeping takes Python ints
            num_new_tokens = int(num_new_tokens)  # only (found by an audit: its TypeError took the engine down)
        hits = args[3] if len(args) > 3 else kwargs.get("new_computed_blocks")
        # counted before every try (as vLLM does): a release of the request's own session's pin frees its hits
        while on_shortage(request, num_new_tokens,
                          sum(b.ref_cnt == 0 for g in hits.blocks for b in g) if hits is not None else 0):
            result = original(*args, **kwargs)
            if result is not None:
                return result
        return None

    def allocate_slots(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)  # called for every scheduled request every step: keep this path short
        return result if result is not None else retry(args, kwargs)

    def allocate_slots_032(request: Any, num_new_tokens: int, num_new_computed_tokens: int = 0,
                           new_computed_blocks: Any = None, num_lookahead_tokens: int = 0,
                           num_external_computed_tokens: int = 0, delay_cache_blocks: bool = False,
                           num_encoder_tokens: int = 0, full_sequence_must_fit: bool = False, reserved_blocks: int = 0,
                           has_scheduled_reqs: bool = True, skip_zeroing_group_ids: tuple[int, ...] = ()) -> Any:
        result = original(request, num_new_tokens, num_new_computed_tokens, new_computed_blocks, num_lookahead_tokens,
                          num_external_computed_tokens, delay_cache_blocks, num_encoder_tokens, full_sequence_must_fit,
                          reserved_blocks, has_scheduled_reqs, skip_zeroing_group_ids)
        if result is not None:
            return result
        return retry((request, num_new_tokens, num_new_computed_tokens, new_computed_blocks, num_lookahead_tokens,
                      num_external_computed_tokens, delay_cache_blocks, num_encoder_tokens, full_sequence_must_fit,
                      reserved_blocks, has_scheduled_reqs, skip_zeroing_group_ids), {})

    wrapper = allocate_slots_032 if _has_032_allocate_slots_signature(original) else allocate_slots
    wrapper.__kvsched_wrapped__ = True  # type: ignore[attr-defined]
    manager.allocate_slots = wrapper
