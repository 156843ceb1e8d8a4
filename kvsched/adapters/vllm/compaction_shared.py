"""Compaction checkpoints in the shared store (`KVSCHED_STORE_URL` / `--kvsched-store-url`), so that a session served
by another replica next turn is served compacted at once instead of being summarised again (or, past the context cap,
refused): each summary is saved when it is made, with the digest of the exact message prefix it replaces, and a
session this API server has no state for is looked up before its request is planned.

Best effort like the rest of the shared level: the store's calls run in a thread with short timeouts, and while it is
down a session is planned from this server's own state (a new summary is made if the trigger says so). What the store
holds is not trusted: a malformed checkpoint is dropped (`shared_checkpoints_bad`), and a load that fails in any way
leaves the session to this server's own state, logged once (found by review: one bad row failed every request of the
session with HTTP 400 until its state's TTL).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

from kvsched.core.compaction import Checkpoint, CompactionStore
from kvsched.core.env import env_setting
from kvsched.core.shared_state import (
    DEFAULT_STATE_TTL_S,
    checkpoint_rows,
    compaction_key,
    encode_checkpoints,
    merge_checkpoints,
)

logger = logging.getLogger("vllm.kvsched.compaction")  # vLLM's handlers apply: its log shows these
ENV_STORE_URL = "KVSCHED_STORE_URL"


PENDING_WAIT_S = 2.0  # a load waits this long at most for this server's own write of the key (a slow store)


class SharedCheckpoints:
    def __init__(self, store: Any, ttl_s: float = DEFAULT_STATE_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._last: dict[str, asyncio.Future[Any]] = {}  # each key's newest write: the next one waits for it
        self._bad_logged = False

    @classmethod
    def from_env(cls) -> SharedCheckpoints | None:
        url = env_setting(os.environ, ENV_STORE_URL)  # blanks: unset (core.env)
        if not url:
            return None
        try:
            from kvsched.adapters.store.redis_store import open_store
            from kvsched.adapters.vllm.tier_levels_config import ENV_STATE_TTL, ttl_setting

            # the same TTL as the tier's session metadata (KVSCHED_STORE_STATE_TTL_S), checked at start-up
            return cls(open_store(url), ttl_setting(ENV_STATE_TTL, None, DEFAULT_STATE_TTL_S))
        except Exception as exc:  # a bad URL must not take the API server down: compaction runs locally
            from kvsched.adapters.store.redis_store import redacted

            logger.error("kvsched compaction: shared store %r unusable (%s); summaries stay on this server",
                         redacted(url), str(exc).replace(url, redacted(url)))
            return None

    async def load_into(self, local: CompactionStore, session: str) -> int:
        """Adopt the session's checkpoints from the store (a session this server has not seen). Returns how many.
        This server's pending write of the key lands first, for up to PENDING_WAIT_S (found by review: a request right
        after its conversation's end read the store before the end's drop and adopted the ended summary)."""
        key = compaction_key(session)
        if (pending := self._last.get(key)) is not None:
            await asyncio.wait([pending], timeout=PENDING_WAIT_S)
        try:
            raw = await asyncio.to_thread(self.store.get_state, key)
            checkpoints, bad = checkpoint_rows(raw)
        except Exception as exc:  # noqa: BLE001 - the session is planned from this server's own state
            self.note_failure(exc)
            return 0
        if isinstance(undecodable := getattr(self.store, "counters", {}).get("bad_values"), int):
            self.counters["shared_store_bad_values"] = undecodable  # values not even UTF-8 (the store's count)
        if bad:
            self.counters["shared_checkpoints_bad"] += bad
            self._log_once(f"{bad} malformed checkpoint(s) dropped")
        if checkpoints:
            local.adopt(session, checkpoints)
            self.counters["shared_checkpoints_loaded"] += len(checkpoints)
        return len(checkpoints)

    def note_failure(self, exc: BaseException) -> None:
        """A shared load that raised: counted, logged once; the request goes on with this server's own state."""
        self.counters["shared_checkpoint_errors"] += 1
        self._log_once(f"loading checkpoints failed ({type(exc).__name__}: {exc})")

    def _log_once(self, what: str) -> None:
        if not self._bad_logged:
            self._bad_logged = True
            logger.warning("kvsched compaction: shared store: %s; the session is planned from this server's own "
                           "state (further ones are counted, not logged)", what[:300])

    def save(self, local: CompactionStore, session: str, drop_roots: frozenset[str] = frozenset(),
             drop_digests: frozenset[str] = frozenset()) -> None:
        """Write the session's checkpoints behind (the request does not wait), merged with those other replicas
        wrote (`merge_checkpoints`), in one atomic read-merge-write (`update_state`): found by review, two replicas
        saving at the same moment each wrote what it had read before the other's write, and one's newest row was
        lost. The key goes once nothing is left."""
        ours = local.checkpoints(session, own=True)
        self._spawn(self._merge, compaction_key(session), ours, local.config.checkpoints_per_session, drop_roots,
                    drop_digests)
        self.counters["shared_checkpoints_saved"] += 1

    def _merge(self, key: str, ours: list[Checkpoint], per_conversation: int, drop_roots: frozenset[str],
               drop_digests: frozenset[str]) -> None:
        def merged(raw: str | None) -> str | None:
            theirs, _ = checkpoint_rows(raw)
            rows = merge_checkpoints(theirs, ours, per_conversation, drop_roots, drop_digests)
            return encode_checkpoints(rows) if rows else None

        self.store.update_state(key, merged, self.ttl_s)

    def _spawn(self, fn: Any, key: str, *args: Any) -> None:
        """Run `fn(key, *args)` in a thread, after this server's earlier writes of `key`: found by review, a later save
        (a conversation ended: its rows go) could land before an earlier one (its summary), which wrote them back."""
        before = self._last.get(key)

        async def write() -> None:
            if before is not None:
                await asyncio.wait([before])
            await asyncio.to_thread(fn, key, *args)

        task = asyncio.ensure_future(write())
        self._last[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: str, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if self._last.get(key) is task:
            del self._last[key]
