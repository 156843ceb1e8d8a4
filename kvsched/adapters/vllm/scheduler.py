"""kvsched's scheduler: vLLM's AsyncScheduler plus session-pinned KV retention.

Only hooks are overridden; scheduling itself is vLLM's. Select it with `vllm serve MODEL --scheduler kvsched`
(or `--scheduler-cls kvsched.adapters.vllm.scheduler.KVSchedScheduler`).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from kvsched import compiled
from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.session_pins import SessionPins
from kvsched.core.config import RetentionConfig

logger = logging.getLogger("vllm.kvsched.scheduler")  # vLLM's handlers and VLLM_LOGGING_LEVEL apply


class KVSchedScheduler(AsyncScheduler):
    """Keeps each session's prefix blocks referenced between turns; pins yield to live requests first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if refusal := compat.unsupported_vllm():  # --scheduler-cls and the offline API skip the parser's check
            raise RuntimeError(refusal)
        super().__init__(*args, **kwargs)
        self.kvsched = SessionPins(self, RetentionConfig.from_env())
        # "compiled", "pure" (not built) or "pure: <why>" (a stale build not used): kvsched/compiled.py
        logger.info("kvsched: per-turn bookkeeping %s", compiled.mode)
        compat.fix_load_failure_recovery(self)
        # kvsched pins a finished request's prefix just before vLLM frees its blocks; a step's finished turns together
        compat.batch_finished_frees(self, self.kvsched.on_request_finished)

    def add_request(self, request: Any) -> None:
        # A streaming-input request's next chunk (or its end marker) comes with the id of a request vLLM already
        # holds: still one request of one turn, which kvsched counted when it arrived and settles when it finishes.
        known = request.request_id in self.requests
        if known:  # before vLLM handles it: an end marker finishes the request at once
            self.kvsched.on_request_updated(request)
        super().add_request(request)
        if not known:
            self.kvsched.on_request_added(request)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self.kvsched.before_schedule()
        output = super().schedule(*args, **kwargs)
        self.kvsched.on_scheduled(output)
        return output

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """Pins go first (they hold blocks the reset needs free), unless the reset fails anyway: then they stay."""
        preempts_all = bool(args[0] if args else kwargs.get("reset_running_requests", False))
        if preempts_all or self.kvsched.reset_can_succeed():
            self.kvsched.release_all()
        return bool(super().reset_prefix_cache(*args, **kwargs))

    def __call__(self, op: str, *args: Any) -> Any:
        """Entry point of engine-core utility calls from kvsched's API-server middleware (see compat)."""
        return self.kvsched.handle(op, *args)
