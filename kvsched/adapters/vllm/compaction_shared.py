"""Compaction checkpoints in the shared store (`KVSCHED_STORE_URL` / `--kvsched-store-url`), so that a session served
by another replica next turn is served compacted at once instead of being summarised again (or, past the context cap,
refused): each summary is saved when it is made, with the digest of the exact message prefix it replaces, and a
session this API server has no state for is looked up before its request is planned.

Best effort like the rest of the shared level: the store's calls run in a thread with short timeouts, and while it is
down a session is planned from this server's own state (a new summary is made if the trigger says so).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

from kvsched.core.compaction import CompactionStore
from kvsched.core.shared_state import DEFAULT_STATE_TTL_S, compaction_key, decode_checkpoints, encode_checkpoints

logger = logging.getLogger(__name__)
ENV_STORE_URL = "KVSCHED_STORE_URL"


class SharedCheckpoints:
    def __init__(self, store: Any, ttl_s: float = DEFAULT_STATE_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Future[Any]] = set()

    @classmethod
    def from_env(cls) -> SharedCheckpoints | None:
        url = os.environ.get(ENV_STORE_URL)
        if not url:
            return None
        try:
            from kvsched.adapters.store.redis_store import open_store
            from kvsched.adapters.vllm.tier_levels import ENV_STATE_TTL, ttl_setting

            # the same TTL as the tier's session metadata (KVSCHED_STORE_STATE_TTL_S), checked at start-up
            return cls(open_store(url), ttl_setting(ENV_STATE_TTL, None, DEFAULT_STATE_TTL_S))
        except Exception as exc:  # a bad URL must not take the API server down: compaction runs locally
            logger.error("kvsched compaction: shared store %r unusable (%s); summaries stay on this server", url, exc)
            return None

    async def load_into(self, local: CompactionStore, session: str) -> int:
        """Adopt the session's checkpoints from the store (a session this server has not seen). Returns how many."""
        raw = await asyncio.to_thread(self.store.get_state, compaction_key(session))
        checkpoints = decode_checkpoints(raw)
        if checkpoints:
            local.adopt(session, checkpoints)
            self.counters["shared_checkpoints_loaded"] += len(checkpoints)
        return len(checkpoints)

    def save(self, local: CompactionStore, session: str) -> None:
        """Write the session's checkpoints behind (the request does not wait)."""
        value = encode_checkpoints(local.checkpoints(session))
        self._spawn(self.store.put_state, compaction_key(session), value, self.ttl_s)
        self.counters["shared_checkpoints_saved"] += 1

    def forget(self, session: str) -> None:
        self._spawn(self.store.delete_state, compaction_key(session))

    def _spawn(self, fn: Any, *args: Any) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
