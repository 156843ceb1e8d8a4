"""The finished requests of one `update_from_output`, pinned and freed together (the scheduler side).

vLLM 0.32's `Scheduler.update_from_output` frees each request that finishes in its output loop as it meets it
(`_free_request` -> `_free_blocks`), between the outputs of the others. kvsched pins a finished request's prefix just
before that free. Holding the frees back to the end of the loop runs kvsched's per-turn code for a step's finished
turns back to back, warm. Nothing in the loop reads the block pool's free queue or reference counts (it caches other
requests' blocks, reads their own blocks, builds outputs), so the frees are flushed, each request pinned then freed in
the order vLLM met them (the same pins, releases and free-queue order as one at a time), before anything after the loop
can see the pool: the KV connector's update and stats, the KV cache events, `make_stats` (the KV usage vLLM reports),
and at the latest when `update_from_output` returns. Outside `update_from_output` (an abort through `finish_requests`,
a reset) a free is handled at once, as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FinishBatch:
    """Replaces the scheduler's `_free_blocks`: `before(request)` (kvsched's pin) then vLLM's free, for each request;
    held while `update_from_output` runs its loop (`held` is a list then, None otherwise)."""

    def __init__(self, scheduler: Any, before: Callable[[Any], None]) -> None:
        self.before = before
        self.free = scheduler._free_blocks  # vLLM's own
        self.held: list[Any] | None = None
        scheduler._free_blocks = self._free_blocks

    def _free_blocks(self, request: Any) -> None:
        held = self.held
        if held is not None:
            held.append(request)
            return
        self.before(request)
        self.free(request)

    def flush(self) -> None:
        """Pin and free the held requests, in order. Every one is freed even if a pin fails (the first error is raised
        after): no request's blocks stay held past the call that freed them in vLLM."""
        held = self.held
        if not held:
            return
        self.held = []
        before, free = self.before, self.free
        error: Exception | None = None
        for request in held:
            try:
                before(request)
            except Exception as exc:  # noqa: BLE001 (raised below, once every request is freed)
                error = error or exc
            free(request)
        if error is not None:
            raise error

    def flushing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with the held frees flushed first: a call after the loop that may read the pool."""
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.held:
                self.flush()
            return fn(*args, **kwargs)

        return call


def batch_finished_frees(scheduler: Any, before: Callable[[Any], None]) -> FinishBatch:
    """Call `before(request)` each time vLLM's scheduler is about to free a finished request's blocks
    (`Scheduler._free_blocks`, private in vLLM 0.32: every path that ends a request goes through it, aborts and KV
    transfers included), while they are still the request's: the moment to pin its reusable prefix. Within
    `update_from_output` the frees of its loop are held and flushed together (module docstring). Idempotent: the
    batch is kept on the scheduler as `kvsched_finishes`."""
    existing = getattr(scheduler, "kvsched_finishes", None)
    if isinstance(existing, FinishBatch):
        existing.before = before
        return existing
    batch = FinishBatch(scheduler, before)
    update = scheduler.update_from_output

    def update_from_output(*args: Any, **kwargs: Any) -> Any:
        if batch.held is not None:  # re-entered: leave the outer call's batch to it
            return update(*args, **kwargs)
        batch.held = []
        try:
            return update(*args, **kwargs)
        finally:
            try:
                batch.flush()
            finally:
                batch.held = None

    scheduler.update_from_output = update_from_output
    # After the loop, whichever of these comes first sees the pool as stock vLLM's would: the connector's update
    # (then the frees of its finished transfers, held after these), its stats, the KV events, the stats.
    scheduler._update_from_kv_xfer_finished = batch.flushing(scheduler._update_from_kv_xfer_finished)
    scheduler.make_stats = batch.flushing(scheduler.make_stats)
    manager = scheduler.kv_cache_manager
    manager.take_events = batch.flushing(manager.take_events)
    connector = getattr(scheduler, "connector", None)
    if connector is not None:
        connector.get_kv_connector_stats = batch.flushing(connector.get_kv_connector_stats)
    scheduler.kvsched_finishes = batch
    return batch


def before_each_free(scheduler: Any, before: Callable[[Any], None]) -> None:
    """Call `before(request)` each time vLLM's scheduler is about to free a request's blocks (`Scheduler._free_blocks`,
    private in vLLM 0.32), one request at a time, with no batching: the benchmark floor's hook
    (kvsched/bench/sched_floor.py). vLLM's free runs even if `before` raises, so no request's blocks stay held."""
    free = scheduler._free_blocks  # vLLM's own

    def _free_blocks(request: Any) -> None:
        try:
            before(request)
        finally:
            free(request)

    scheduler._free_blocks = _free_blocks
