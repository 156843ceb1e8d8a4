"""kvsched's FP8 demotion tier as a vLLM KV connector (`KVConnectorBase_V1`): no fork, the way offloading connectors plug in.

Scheduler side (engine-core process): a `TierDirectory` (kvsched.core.tier). kvsched's scheduler calls `demote` when
memory pressure releases a session's pins; vLLM calls `get_num_new_matched_tokens` for each new request, and the
connector offers the unbroken run of the request's prefix (by vLLM's block hashes) the tier holds past the local
prefix-cache hit, then the session's partial last block if the tier kept it (`save_tail`: vLLM's prefix cache only
shares full blocks, so the tokens past the last one are otherwise recomputed every turn). Each step's stores and loads
travel to the workers in the connector metadata.

Worker side: a `TierStore` (fp8_tier_store). Stores run in `handle_preemptions`, which vLLM calls before anything of the
step runs, so a released block is copied before a new request can overwrite it; loads run in `start_load_kv`,
synchronously before the forward pass. A slot that fails its checksum is reported through
`get_block_ids_with_load_errors` and vLLM recomputes those tokens (`kv_load_failure_policy: recompute`, required).

Enable with `vllm serve ... --scheduler kvsched --kvsched-fp8-tier-gb 2` (the plugin turns it into the
`--kv-transfer-config` below), or pass `--kv-transfer-config` yourself with `kv_transfer_config(2.0)`'s JSON.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvsched.adapters.vllm.fp8_tier_store import TierLayoutError, TierStore, block_bytes, block_views
from kvsched.core.tier import Load, Store, TailKey, TierConfig, TierConfigError, TierDirectory

logger = logging.getLogger(__name__)
CONNECTOR_NAME = "KVSchedFP8TierConnector"
MODULE_PATH = __name__
ENV_TIER_GB = "KVSCHED_FP8_TIER_GB"


def kv_transfer_config(tier_gb: float, measure_error: bool = True) -> dict[str, Any]:
    """The `--kv-transfer-config` that enables kvsched's FP8 tier with `tier_gb` GiB of host memory."""
    TierConfig.from_gib(tier_gb)  # validate early
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"tier_gb": tier_gb, "measure_error": measure_error}}


def kv_transfer_config_json(tier_gb: float) -> str:
    return json.dumps(kv_transfer_config(tier_gb))


@dataclass
class TierStepMeta(KVConnectorMetadata):
    """One step's tier work, scheduler -> workers: stores run first (before the step), then loads."""

    stores: list[Store] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)


@dataclass
class TierWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: what the store did (summed over workers)."""

    loaded_blocks: int = 0
    failed_blocks: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TierWorkerMeta)
        return TierWorkerMeta(self.loaded_blocks + other.loaded_blocks, self.failed_blocks + other.failed_blocks,
                              self.err_sq + other.err_sq, self.ref_sq + other.ref_sq)


class KVSchedFP8TierConnector(KVConnectorBase_V1):
    """Host-memory FP8 tier for KV blocks kvsched releases under pressure (see module docstring)."""

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a lost store is a future recompute, never an error

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = TierConfig.from_gib(extra.get("tier_gb", os.environ.get(ENV_TIER_GB, "0")))
        self.measure_error = bool(extra.get("measure_error", True))
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            raise TierConfigError("kvsched's FP8 tier needs kv_load_failure_policy 'recompute' in --kv-transfer-config "
                                  "(a slot that fails its checksum must be recomputed, not fail the request)")
        if not vllm_config.cache_config.enable_prefix_caching:
            raise TierConfigError("kvsched's FP8 tier needs prefix caching (it is keyed by vLLM's block hashes)")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.num_blocks, self.block_bytes, self.layers = _pool_shape(kv_cache_config)
        self.num_slots = self.config.budget_bytes // self.block_bytes
        # scheduler side
        self.directory: TierDirectory | None = None
        self._step = TierStepMeta()
        # req id -> (first block, slots, keys, matched tail (slot, tokens, key) or None)
        self._matched: dict[str, tuple[int, list[int], list[Any], tuple[int, int, TailKey] | None]] = {}
        self._step_loads: dict[int, Any] = {}  # this step's loads: block id -> key
        self._loading: deque[dict[int, Any]] = deque(maxlen=4)  # recent steps' loads (outputs may lag a step)
        self.stats: dict[str, float] = {"restores": 0, "restored_blocks": 0, "restored_tail_tokens": 0,
                                        "restore_misses": 0, "load_failures": 0, "err_sq": 0.0, "ref_sq": 0.0}
        # worker side
        self.store: TierStore | None = None
        self._errors: set[int] = set()
        self._worker_meta = TierWorkerMeta()
        if role == KVConnectorRole.SCHEDULER:
            self.directory = TierDirectory(self.config, self.block_bytes, value_of=lambda owner: 0.0)

    # ==== scheduler side =============================================================================================
    def attach(self, value_of: Any) -> TierDirectory:
        """kvsched's scheduler takes the directory and gives it the pins' retention value for its eviction order."""
        assert self.directory is not None, "attach() is scheduler-side"
        self.directory.value_of = value_of
        return self.directory

    def demote(self, owner: Any, blocks: list[tuple[Any, int]]) -> int:
        """`owner` lost the pins on `blocks` ((content key, block id), prefix order): plan their copy into the tier."""
        assert self.directory is not None
        stores = self.directory.demote(owner, blocks)
        self._step.stores.extend(stores)
        return len(stores)

    def save_tail(self, owner: Any, parent: Any, tokens: list[int], block_id: int) -> bool:
        """`owner`'s turn finished with `tokens` of KV (fewer than a block) in pool block `block_id`, after the full
        block whose content key is `parent`: plan their copy into the tier (this step, before vLLM reuses the block)."""
        assert self.directory is not None
        store = self.directory.put_tail(owner, parent, tokens, block_id)
        if store is not None:
            self._step.stores.append(store)
        return store is not None

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.directory is None or self.num_slots == 0:
            return 0, False
        bs = self.block_size
        start = num_computed_tokens // bs
        last = request.num_tokens - 1  # vLLM always computes the last prompt token
        keys = request.block_hashes
        slots = self.directory.match(keys, start, last // bs - start)
        # Locked until this step's metadata is built: a demotion later in this step (this very request's allocation
        # may release pins) must not evict and reuse a slot this request is about to load.
        self.directory.lock(slots)
        end = start + len(slots)
        tail = None
        if end and self.directory.tail_of and end * bs < last and end - 1 < len(keys):
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
            if nxt < len(hashes) and self.directory.was_evicted(hashes[nxt]):
                self.stats["restore_misses"] += 1
            return
        block_ids = blocks.get_block_ids()[0]
        loads = [(s, b, k) for s, b, k in zip(slots[:n], block_ids[start:start + n], keys[:n], strict=True)]
        if rest > 0 and tail is not None and tail[1] == rest and n == len(slots):
            loads.append((tail[0], block_ids[start + n], tail[2]))
            self.stats["restored_tail_tokens"] += rest
        elif rest > 0:  # vLLM passes back exactly what get_num_new_matched_tokens offered: never expected
            logger.error("kvsched FP8 tier: vLLM took %d external tokens for request %s, not the %d offered",
                         num_external_tokens, request.request_id,
                         len(slots) * self.block_size + (tail[1] if tail else 0))
        self._step.loads.extend(Load(s, b) for s, b, _ in loads)
        self._step_loads.update((b, k) for _, b, k in loads)
        self.stats["restores"] += 1
        self.stats["restored_blocks"] += n

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.directory is not None
        meta, self._step = self._step, TierStepMeta()
        if self._step_loads:
            self._loading.append(self._step_loads)
            self._step_loads = {}
        self.directory.unlock_all()
        self._matched.clear()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.directory is not None
        bad = connector_output.invalid_block_ids or set()
        if bad:  # those slots did not verify: forget them so they are recomputed, never read again
            keys = [step[b] for step in self._loading for b in bad if b in step]
            self.directory.forget(keys)
            self.stats["load_failures"] += len(bad)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, TierWorkerMeta):
            self.stats["err_sq"] += meta.err_sq
            self.stats["ref_sq"] += meta.ref_sq

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        return False, None

    def tier_stats(self) -> dict[str, float]:
        d = self.directory
        assert d is not None
        ref = self.stats["ref_sq"]
        return {
            "tier_capacity_bytes": d.num_slots * d.block_bytes, "tier_bytes": d.used_bytes,
            "tier_blocks": d.used_slots, "tier_block_bytes": d.block_bytes,
            "tier_demotions": d.counters["demotions"], "tier_demoted_blocks": d.counters["demoted_blocks"],
            "tier_evicted_blocks": d.counters["evicted_blocks"], "tier_restores": self.stats["restores"],
            "tier_restored_blocks": self.stats["restored_blocks"], "tier_restore_misses": self.stats["restore_misses"],
            "tier_tails": len(d.tail_of), "tier_tails_stored": d.counters["tails_stored"],
            "tier_restored_tail_tokens": self.stats["restored_tail_tokens"],
            "tier_load_failures": self.stats["load_failures"],
            "tier_kv_rel_rms_error": 0.0 if self.layers["raw"] else (self.stats["err_sq"] / ref) ** 0.5 if ref > 0
            else -1.0,
            "tier_raw_fp8": float(self.layers["raw"]),
        }

    # ==== worker side ================================================================================================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        views = block_views(kv_caches, self.num_blocks)
        if block_bytes(views) != self.block_bytes:
            raise TierLayoutError(f"KV cache tensors give {block_bytes(views)} tier bytes per block, the KV cache spec "
                                  f"{self.block_bytes}: layout not supported by the FP8 tier")
        self.store = TierStore(views, self.num_slots, measure_error=self.measure_error)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.store is None or not isinstance(kv_connector_metadata, TierStepMeta) or not kv_connector_metadata.stores:
            return
        stores = kv_connector_metadata.stores
        before = (self.store.err_sq, self.store.ref_sq)
        try:
            self.store.store([s.block_id for s in stores], [s.slot for s in stores], [s.tokens for s in stores])
        except Exception:  # never take the engine down for a cache: the slots fail their checksum and are recomputed
            logger.exception("kvsched FP8 tier: storing %d blocks failed", len(stores))
            self.store.invalidate([s.slot for s in stores])
        self._worker_meta.err_sq += self.store.err_sq - before[0]
        self._worker_meta.ref_sq += self.store.ref_sq - before[1]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.store is None or not isinstance(meta, TierStepMeta) or not meta.loads:
            return
        try:
            failed = self.store.load([ld.slot for ld in meta.loads], [ld.block_id for ld in meta.loads])
        except Exception:  # report every block of the step as not loaded: vLLM recomputes them
            logger.exception("kvsched FP8 tier: loading %d blocks failed", len(meta.loads))
            failed = [ld.block_id for ld in meta.loads]
        self._errors.update(failed)
        self._worker_meta.loaded_blocks += len(meta.loads) - len(failed)
        self._worker_meta.failed_blocks += len(failed)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        meta, self._worker_meta = self._worker_meta, TierWorkerMeta()
        if not (meta.loaded_blocks or meta.failed_blocks or meta.ref_sq):
            return None
        return meta


def _pool_shape(kv_cache_config: Any) -> tuple[int, int, dict[str, Any]]:
    """(num_blocks, tier bytes per block, layer facts) from vLLM's KV cache config: one full-attention group only."""
    if kv_cache_config is None:
        raise TierConfigError("the FP8 tier needs vLLM's KV cache config")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise TierConfigError(f"the FP8 tier supports models with one KV cache group (full attention); this one has "
                              f"{len(groups)}")
    spec = groups[0].kv_cache_spec
    heads, head_size = int(getattr(spec, "num_kv_heads", 0)), int(getattr(spec, "head_size", 0))
    if not heads or not head_size or getattr(spec, "sliding_window", None):
        raise TierConfigError(f"the FP8 tier supports full-attention KV caches, not {type(spec).__name__}")
    raw = spec.dtype.itemsize == 1
    per_block = len(groups[0].layer_names) * heads * (spec.block_size * 2 * head_size + (0 if raw else 4))
    return int(kv_cache_config.num_blocks), per_block, {"raw": raw, "heads": heads, "head_size": head_size}
