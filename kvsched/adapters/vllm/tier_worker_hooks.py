"""The FP8 tier connector's worker-side hooks that only close a step (split from fp8_tier_connector, at its size
limit): its copies are all enqueued before the forward, so these have little left to do."""

from __future__ import annotations

from typing import Any


class TierWorkerHooks:
    """Mixed into `KVSchedFP8TierConnector`, which sets `store`, `levels_worker` and `_errors`."""

    store: Any
    levels_worker: Any
    _errors: set[int]

    def wait_for_layer_load(self, layer_name: str) -> None:  # `start_load_kv` fenced every load: nothing left here
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # stores run in handle_preemptions

    def wait_for_save(self) -> None:
        if self.store is not None:
            self.store.seal_ready()  # check in the stores whose copies completed during the step

    def shutdown(self) -> None:
        """Writes still queued for the disk and shared levels get a few seconds (a restart then finds them)."""
        if self.levels_worker is not None:
            self.levels_worker.close(flush_s=10.0)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors
