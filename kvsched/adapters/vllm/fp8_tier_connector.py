"""kvsched's FP8 demotion tier as a vLLM KV connector (`KVConnectorBase_V1`): no fork, the way offloading connectors plug in.

On by default with `--scheduler kvsched`, sized by `kvsched.core.tier.auto_budget_bytes` (at most 2x the KV pool's bytes
and a quarter of the host memory at start-up, split between GPUs); `--kvsched-fp8-tier-gb N` sets it (the host's total,
split between the engine's ranks on it: tier_host), 0 turns it off.

Scheduler side (engine-core process): a `TierDirectory` (kvsched.core.tier). kvsched's scheduler `demote`s the blocks
of released pins; for each new request (`get_num_new_matched_tokens`) the connector offers the run of its prefix (by
vLLM's block hashes) the tier holds past the local hit, then the session's partial last block (`save_tail`: vLLM
shares full blocks only). A queued request's prefix is restored ahead of scheduling (`add_prefetch`, tier_prefetch).
Each step's stores and loads travel to the workers in the connector metadata.

Worker side: a `TierStore` (fp8_tier_store) over each layer's views (tier_layout). Stores and prefetches run in
`handle_preemptions`, before anything of the step runs (a released block is copied before a new request can overwrite
it); restores in `start_load_kv`; on a GPU on their own stream, all complete before the forward (tier_link). A slot
failing its checksum goes to `get_block_ids_with_load_errors`: vLLM recomputes it (`kv_load_failure_policy:
recompute`, required). If the tier cannot hold this engine's cache (TierUnsupported: e.g. hybrid or MLA-bf16 models) or
prefix caching is off, it says why once in the log and the engine serves as without it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvsched.adapters.vllm import compat, tier_blob, tier_config, tier_host, tier_stats
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.settings_check import fault_every  # tests: corrupt every n-th stored slot
from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, MODULE_PATH, kv_transfer_config, kv_transfer_config_json
from kvsched.adapters.vllm.tier_fetches import FetchBook
from kvsched.adapters.vllm.tier_layout import TierGeometry, TierUnsupported, geometry_of, layer_views
from kvsched.adapters.vllm.tier_levels import TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_link import DEFAULT_STAGE_BYTES, link_for
from kvsched.adapters.vllm.tier_meta import TierStepMeta, TierWorkerMeta
from kvsched.adapters.vllm.tier_worker_hooks import TierWorkerHooks
from kvsched.core.tier import Load, TailKey, TierDirectory
from kvsched.core.tier_config import ENV_TIER_GB, TierConfig, TierConfigError, parse_tier_gib

logger = logging.getLogger("vllm.kvsched.fp8_tier")  # vLLM's handlers and VLLM_LOGGING_LEVEL apply

# vLLM turns prefix caching off itself for some models and platforms (MLA on CPU, non-causal attention, encoder-only)
NO_PREFIX_CACHING = "vLLM's prefix caching is off (flag, model or platform); the tier is keyed by its block hashes"
__all__ = ["CONNECTOR_NAME", "ENV_TIER_GB", "MODULE_PATH", "KVSchedFP8TierConnector", "kv_transfer_config",
           "kv_transfer_config_json"]


class KVSchedFP8TierConnector(TierWorkerHooks, KVConnectorBase_V1):
    """Host-memory FP8 tier for KV blocks kvsched releases under pressure (see module docstring)."""

    requires_kv_delivery = property(lambda self: False)  # best effort: a lost store is a later recompute, not an error

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.engine_config = vllm_config
        transfer = vllm_config.kv_transfer_config
        extra = dict(transfer.kv_connector_extra_config or {})
        requested = parse_tier_gib(extra.get("tier_gb", os.environ.get(ENV_TIER_GB)))
        self.measure_error = tier_config.measure_error_of(extra)
        self.levels_cfg = LevelsConfig.from_extra(extra)  # the disk and shared levels under the tier (optional)
        self.stage_bytes, self.stage_set = tier_config.stage_bytes_of(extra, DEFAULT_STAGE_BYTES)
        self.world_size = int(getattr(vllm_config.parallel_config, "world_size", 1) or 1)
        if transfer.kv_load_failure_policy != "recompute":
            raise TierConfigError("kvsched's FP8 tier needs kv_load_failure_policy 'recompute' in --kv-transfer-config "
                                  "(a slot that fails its checksum must be recomputed, not fail the request)")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.num_blocks = int(kv_cache_config.num_blocks) if kv_cache_config is not None else 0
        self.disabled_reason, self.geometry = "", cast("TierGeometry | None", None)
        if not vllm_config.cache_config.enable_prefix_caching:
            self.disabled_reason = NO_PREFIX_CACHING  # (found by review: raised in the worker, the engine died)
        else:
            try:
                self.geometry = geometry_of(kv_cache_config, tier_host.layout_name(vllm_config, kv_cache_config),
                                            vllm_config.parallel_config)
            except TierUnsupported as exc:
                self.disabled_reason = str(exc)
        block_bytes = self.geometry.block_bytes if self.geometry else 1
        self.directory: TierDirectory | None = None  # scheduler side
        self.num_slots = 0
        self._step = TierStepMeta()
        # req id -> (first block, slots, keys, matched tail (slot, tokens, key) or None)
        self._matched: dict[str, tuple[int, list[int], list[Any], tuple[int, int, TailKey] | None]] = {}
        self._step_loads: dict[int, Any] = {}  # this step's loads: block id -> key
        self._loading: deque[dict[int, Any]] = deque(maxlen=4)  # recent steps' loads (outputs may lag a step)
        self.on_load_failures: Callable[[set[int]], None] = lambda block_ids: None  # kvsched's prefetch cleanup
        self.steps_built = self.steps_done = 0  # connector metadata built / step outputs seen (prefetch ordering)
        self._prefetched_for: dict[str, int] = {}  # queued requests whose restore a prefetch started -> ready step
        self.stats: dict[str, float] = dict.fromkeys(tier_stats.CONNECTOR_STATS, 0.0)
        self.levels: TierLevels | None = None
        self.levels_final: dict[str, float] = {}  # their counters once a prefix-cache reset turned them off
        self.levels_worker: Any = None  # worker side
        self.store: TierStore | None = None
        self._errors: set[int] = set()
        self._worker_meta = TierWorkerMeta()
        self._fault_every = fault_every()
        if role == KVConnectorRole.SCHEDULER:
            budget, ranks, staging = 0, tier_host.ranks_on_host(vllm_config.parallel_config), 0  # each rank fills
            if self.geometry is not None:
                budget = tier_host.budget_bytes(requested, self.geometry, self.num_blocks, ranks)
                staging = tier_host.staging_bytes(self.stage_bytes, self.geometry, tier_blob.platform_type())
            shares = compat.rank_shares(vllm_config)  # each pipeline stage holds its own layers (slots fit them all)
            slots_share = max(budget - staging, 0)
            self.directory = TierDirectory(TierConfig(shares.first_rank_budget(slots_share, ranks)), block_bytes,
                                           value_of=lambda owner: 0.0)  # what a rank pins: slots and staging
            self.num_slots = self.directory.num_slots
            self.fetches = FetchBook(self.directory, self.world_size, block_bytes)
            if self.levels_cfg.enabled and self.geometry is not None and self.num_slots > 0:
                ident, desc = tier_blob.identity_of(vllm_config, self.geometry, self.world_size)
                self.levels = TierLevels(self.levels_cfg, ident, desc, block_bytes, self.world_size, shares)
                self.levels._busy_slots, self.levels.on_fetch = self._busy_slots, self.fetches.started
                self.directory.on_evict, self.fetches.lookups = self.levels.on_host_evict, self.levels.lookups
            elif self.levels_cfg.enabled:
                logger.warning("kvsched disk/shared tier levels need the FP8 tier (they restore through it); off")
            least = shares.host_budget_for(block_bytes, ranks)  # the host's bytes that hold one slot
            tier_host.log_start(self.disabled_reason, self.geometry, budget, requested is None, self.num_slots,
                                f"--kvsched-fp8-tier-gb / {ENV_TIER_GB}", ranks, least + staging * ranks, shares,
                                staging)

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason and self.num_slots > 0

    # ==== scheduler side =============================================================================================
    def attach(self, value_of: Any, pool_holds: Any = None) -> TierDirectory:
        """kvsched's scheduler gives the directory the pins' retention value and what the pool holds (tier_reach)."""
        assert self.directory is not None, "attach() is scheduler-side"
        self.directory.value_of, self.directory.reach.pool_holds = value_of, pool_holds
        return self.directory

    def demote(self, owner: Any, blocks: list[tuple[Any, int]], start: int | None = None) -> int:
        """`owner` lost the pins on `blocks` ((key, block id), prefix order, from `start` in its pin): copy them."""
        assert self.directory is not None
        if not self.enabled:
            return 0
        stores = self.directory.demote(owner, blocks, start)
        self._step.add_stores(stores)
        return len(stores)

    def publish_turn(self, owner: Any, blocks: Sequence[Any], rec: Any) -> None:
        """`owner`'s turn finished holding `blocks` (vLLM's cached full blocks, prefix order): the disk and shared
        levels keep a copy, written behind (tier_levels)."""
        if self.levels is not None and self.enabled:
            self.levels.turn_finished(owner, compat.cached_content_keys(blocks), rec)

    def promote(self, owner: Any, chain: Sequence[Any], start: int, limit: int, request_id: str | None = None) -> int:
        """A request of `owner` arrived: blocks of its prefix past `start` that only the disk or shared level holds
        get host slots, filled by the workers in the background (tier_fetches; the store's lookup first, tier_lookups);
        once landed they are prefetched like any tier block."""
        if self.levels is None or not self.enabled or self.directory is None:
            return 0
        return self.levels.promote(owner, chain, start, limit, self.directory, request_id)

    def reset_cache(self) -> bool:
        """Prefix-cache reset (new weights?): stale KV in the tier; the disk/shared levels are off to a restart."""
        if self.directory is not None:
            self.directory.clear()
            self.directory.on_evict = None
        if self.levels is not None:
            logger.warning("kvsched FP8 tier: prefix cache reset: disk/shared levels off until the engine restarts")
            # fetches planned since the last step were never sent, so never reported (found by review: held for good)
            self.fetches.cancel(self.levels.close())  # and no request waits for a store lookup any more
            self.levels, self.levels_final = None, tier_stats.levels_off(self.levels.stats())
        return True

    def end_session(self, owner: Any) -> None:
        if self.levels is not None:
            self.levels.session_ended(owner)

    def _busy_slots(self) -> set[int]:
        """Slots this step's stores and the fetches in flight write (a spill there would read another key's bytes)."""
        return set(self._step.store_slots) | set(self.fetches.slots)

    def save_tail(self, owner: Any, parent: Any, tokens: list[int], block_id: int) -> bool:
        """`owner`'s turn finished with `tokens` of KV (fewer than a block) in pool block `block_id`, after the full
        block whose content key is `parent`: plan their copy into the tier (this step, before vLLM reuses the block)."""
        assert self.directory is not None
        store = self.directory.put_tail(owner, parent, tokens, block_id) if self.enabled else None
        if store is not None:
            self._step.add_stores((store,))
        return store is not None

    def match_prefetch(self, keys: Sequence[Any], start: int, limit: int) -> list[int]:
        """Slots of the run of `keys[start:]` the tier holds (at most `limit`), locked for a prefetch this step."""
        if not self.enabled or self.directory is None:
            return []
        slots = self.directory.match(keys, start, limit)
        self.directory.lock(slots)
        return slots

    def add_prefetch(self, loads: Sequence[tuple[int, int, Any]], request_id: str | None = None,
                     cached_after: int = 0) -> None:
        """Restore `(slot, block id, key)` into blocks kvsched allocated ahead of scheduling, for the queued request
        `request_id` (its own restore adds only what this missed). Async scheduling caches them once `cached_after`
        step outputs were seen: the request waits (a step or two), or it would restore the same slots again."""
        if request_id is not None:
            self._prefetched_for[request_id] = cached_after
        self._step.prefetches.extend(Load(s, b) for s, b, _ in loads)
        self._step_loads.update((b, k) for _, b, k in loads)
        self.stats["prefetched_blocks"] += len(loads)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.directory is None or not self.enabled:
            return 0, False
        ready = self._prefetched_for.get(request.request_id, 0)
        if ready > self.steps_done and self.steps_built <= ready + 1:  # bounded: never held past two more steps
            return None, False  # vLLM schedules it at a later step
        bs = self.block_size
        start = num_computed_tokens // bs
        last = request.num_tokens - 1  # vLLM always computes the last prompt token
        keys = request.block_hashes
        slots = self.directory.match(keys, start, last // bs - start)  # it ends before a block still being fetched
        if start + len(slots) < last // bs and self.fetches.must_wait(request.request_id, keys[start + len(slots)]):
            return None, False  # vLLM asks again next step; the prefetch restores the blocks once they landed
        # Locked until this step's metadata is built: a demotion later in this step (this very request's allocation
        # may release pins) must not evict and reuse a slot this request is about to load.
        self.directory.lock(slots)
        end, tail = start + len(slots), None
        if (end and self.directory.tail_of and end * bs < last and end - 1 < len(keys)
                and compat.tail_keyed_by_tokens(request)):
            tail = self.directory.match_tail(keys[end - 1], request.all_token_ids[end * bs:min(last, (end + 1) * bs)])
            if tail is not None:
                self.directory.lock([tail[0]])
        self._matched[request.request_id] = (start, slots, list(keys[start:end]), tail)
        return len(slots) * bs + (tail[1] if tail else 0), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.directory is not None
        start, slots, keys, tail = self._matched.pop(request.request_id, (0, [], [], None))
        n = min(num_external_tokens // self.block_size, len(slots))
        rest = num_external_tokens - n * self.block_size
        if n <= 0 and rest <= 0:
            nxt = start + len(slots)
            hashes = request.block_hashes
            if self.enabled and nxt < len(hashes) and self.directory.was_evicted(hashes[nxt]):
                self.stats["restore_misses"] += 1
            return
        block_ids = blocks.get_block_ids()[0]
        loads = [Load(s, b) for s, b in zip(slots[:n], block_ids[start:start + n], strict=True)]
        load_keys = list(keys[:n])
        if rest > 0 and tail is not None and tail[1] == rest and n == len(slots):
            loads.append(Load(tail[0], block_ids[start + n]))
            load_keys.append(tail[2])
            self.stats["restored_tail_tokens"] += rest
        elif rest > 0:  # vLLM passes back exactly what get_num_new_matched_tokens offered: never expected
            logger.error("kvsched FP8 tier: vLLM took %d external tokens for request %s, not the %d offered",
                         num_external_tokens, request.request_id,
                         len(slots) * self.block_size + (tail[1] if tail else 0))
        self._step.loads.extend(loads)
        self._step_loads.update((ld.block_id, k) for ld, k in zip(loads, load_keys, strict=True))
        if n == 0:  # only the partial last block: at admission by design (the prefix cache holds full blocks only)
            self.stats["tail_restores"] += 1
        elif request.request_id not in self._prefetched_for:  # else counted as the prefetch's restore
            self.stats["restores"] += 1
        self.stats["restored_blocks"] += n

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.directory is not None
        meta, self._step = self._step, TierStepMeta()
        self.stats["superseded_loads"] += meta.drop_superseded()
        if self.levels is not None:
            meta.levels = self.levels.take_ops()  # before unlock_all: spills of slots it frees go to the next step
        self.steps_built += 1
        self.fetches.expire()  # a fetch a worker never reports holds its slot, not its session for good
        if self._step_loads:
            self._loading.append(self._step_loads)
            self._step_loads = {}
        self.directory.unlock_all()
        self._matched.clear()
        if meta.loads and scheduler_output is not None:
            # the loads must land before this step's forward: vLLM starts them after it unless the step has sync loads
            # (it infers that from the requests it admitted with external tokens; HiSparse's connector sets it so too)
            scheduler_output.has_sync_kv_loads = True
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.directory is not None
        self.steps_done += 1
        bad = set(connector_output.invalid_block_ids or ())
        if bad:  # those slots did not verify: forget them so they are recomputed, never read again
            keys = [step[b] for step in self._loading for b in bad if b in step]
            self.directory.forget(keys)
            self.stats["load_failures"] += len(bad)
            self.on_load_failures(bad)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, TierWorkerMeta):
            tier_stats.absorb_worker_meta(self, meta)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        self._prefetched_for.pop(request.request_id, None)
        self.fetches.forget_request(request.request_id)
        return False, None

    def tier_stats(self) -> dict[str, Any]:
        return tier_stats.tier_stats(self)

    # ==== worker side ================================================================================================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self.geometry is None:
            return  # the scheduler side logged why
        try:
            views = layer_views(kv_caches, self.geometry, self.num_blocks)
            link = link_for(views[0].cache.device)
        except (TierUnsupported, ValueError) as exc:
            logger.warning("kvsched FP8 tier disabled on this worker: %s", exc)
            self._worker_meta.disabled = str(exc)
            return
        stage, how = tier_host.stage_pool(link, self.geometry, self.stage_bytes, self.stage_set)
        self.store = TierStore(views, self.geometry.mode, link, measure_error=self.measure_error, stage=stage)
        pieces = "" if self.store.plan.whole else f" in {len(self.store.plan.spans)} pieces of its layers"
        logger.info("kvsched FP8 tier: copies staged %d blocks at a time%s through %s, at most %.1f MiB of device "
                    "memory a group (%s)", self.store.group_blocks, pieces, f"{stage.plan.host_bytes / 2**20:g} MiB of "
                    "pinned host memory (in the tier's budget)" if link.pin else "the kernels' outputs",
                    stage.device_bytes / 2**20, how)
        self.store.corrupt_every = self._fault_every
        if self.levels_cfg.enabled:
            from kvsched.adapters.vllm.compat import worker_rank
            from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker

            ident, desc = tier_blob.identity_of(self.engine_config, self.geometry, self.world_size)
            self.levels_worker = TierLevelsWorker(self.levels_cfg, ident, desc, worker_rank(), self.world_size,
                                                  self.store)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        meta = kv_connector_metadata
        if not isinstance(meta, TierStepMeta):
            return
        if meta.levels and (self.store is None or self.levels_worker is None):
            self._worker_meta.fetch_landed += [(f.key, f.slot, False) for f in meta.levels.fetches]  # never started
        if self.store is None:
            return self._load(meta.prefetches)  # no tier on this worker: each block reported failed (_load)
        t0 = time.perf_counter()
        try:
            self._before_step(meta)
        finally:
            self._worker_meta.busy_s += time.perf_counter() - t0

    def _before_step(self, meta: TierStepMeta) -> None:
        assert self.store is not None
        levels = meta.levels if self.levels_worker is not None else None
        if levels:  # spills read slots the stores below may overwrite; publishes read blocks loads may overwrite
            self.levels_worker.before_stores(levels)
        if meta.store_blocks:
            try:
                self.store.store(meta.store_blocks, meta.store_slots, meta.store_tokens)
            except Exception:  # never take the engine down for a cache: the slots fail their checksum, recomputed
                logger.exception("kvsched FP8 tier: storing %d blocks failed", len(meta.store_blocks))
                self.store.invalidate(meta.store_slots)
        if levels:  # host slots filled from disk or the shared store in the background: nothing waits for them here
            self.levels_worker.start_fetch(levels)
        self._load(meta.prefetches)  # into cached blocks a request of this very step may hit: before the forward

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = compat.connector_metadata(self)
        if not isinstance(meta, TierStepMeta) or not meta.loads:
            return
        t0 = time.perf_counter()
        self._load(meta.loads)
        self._worker_meta.busy_s += time.perf_counter() - t0

    def _load(self, loads: Sequence[Load]) -> None:
        """Restore `loads`; blocks that did not verify go to `get_block_ids_with_load_errors` (vLLM recomputes them),
        every one on a worker that turned its tier off (register_kv_caches): loads come until the scheduler learns it,
        a step later or two with async scheduling (found by review: it returned, and vLLM used the blocks' stale KV)."""
        block_ids = failed = [ld.block_id for ld in loads]  # unless the store loads them
        if self.store is not None and loads:
            try:
                failed = self.store.load([ld.slot for ld in loads], block_ids)
            except Exception:  # report every block of the step as not loaded: vLLM recomputes them
                logger.exception("kvsched FP8 tier: loading %d blocks failed", len(loads))
            # Every restore completes before the forward (a wait on the device, the host goes on): not layer by
            # layer, since vLLM skips `wait_for_layer_load` while it replays a FULL CUDA graph (tier_link).
            self.store.fence_all()
        self._errors.update(failed)
        self._worker_meta.loaded_blocks += len(loads) - len(failed)
        self._worker_meta.failed_blocks += len(failed)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        meta, self._worker_meta = self._worker_meta, TierWorkerMeta()
        if self.store is not None:
            meta.err_sq, meta.ref_sq = self.store.err_sq, self.store.ref_sq
            self.store.err_sq = self.store.ref_sq = 0.0
        if self.levels_worker is not None:
            self.levels_worker.fill(meta)
        return meta if meta else None
