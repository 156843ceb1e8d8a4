"""The shared store's reads at a request's arrival, for `TierLevels` (tier_levels): the session's metadata (did
another replica serve its last turn?) and which blocks past what the pool, the host tier and the disk hold the store
has. Read inline, on the scheduler thread, while the store's reads are fast (`ReadCost`: the fetch is planned at the
arrival); else queued for the lookup thread (tier_lookups), whose answers `poll` takes once a step."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_lookups import Lookup, StoreLookups
from kvsched.core.shared_state import SessionMeta, block_key
from kvsched.core.store_health import ReadCost

# Sessions whose metadata was read here (ended ones leave at once): forgetting a live one costs one GET, never a second
# moved count (its turn here made the store name this replica); 50,000 (~12 MiB) is far more sessions than one engine
# keeps alive.
SEEN_SESSIONS_MEMORY = 50_000


class ArrivalReads:
    """The arrival reads' half of `TierLevels` (which sets these attributes and `_bad_value`, `_session_key`)."""

    store: Any
    lookups: StoreLookups | None
    read_cost: ReadCost
    cfg: LevelsConfig
    identity: str
    world_size: int
    counters: Counter[str]
    _answers: dict[str, tuple[bool, dict[bytes, bool]]]
    _seen_sessions: OrderedDict[Any, None]

    _bad_value: Callable[[str], None]  # counted, logged once
    _session_key: Callable[[Any], str]  # the store key of a session's metadata

    def poll(self) -> list[str]:
        """Once a step, on the scheduler thread: the store lookups' answers. A session's metadata counts it (moved or
        not); an answer its request still waits for is kept for that request's next `promote`, this step only.
        Returns those requests' ids."""
        self._answers.clear()
        self.read_cost.new_step()
        if self.lookups is None:
            return []
        for a in self.lookups.poll():
            if a.seconds is not None:
                self.read_cost.note(a.seconds, inline=False)
            for what in a.errors:
                self._bad_value(what)
            if a.meta_failed:  # not read: the session's next request asks again
                self._seen_sessions.pop(a.lookup.owner, None)
            moved = a.lookup.moved or (a.lookup.meta_key is not None and self._moved(a.meta))
            if a.live and a.lookup.request_id is not None:
                self._answers[a.lookup.request_id] = (moved, a.held())
        return list(self._answers)

    def _first_arrival(self, owner: Any) -> str | None:
        """The store key of `owner`'s metadata if this is its first request on this engine and the store is up."""
        if owner in self._seen_sessions:
            self._seen_sessions.move_to_end(owner)
            return None
        if self.store is not None and not self.store.up:  # down: not asked, so not seen (its next request asks)
            return None
        self._seen_sessions[owner] = None
        while len(self._seen_sessions) > SEEN_SESSIONS_MEMORY:
            self._seen_sessions.popitem(last=False)
        return self._session_key(owner) if self.store is not None and self.store.up else None

    def _look_up(self, owner: Any, meta_key: str | None, request_id: str | None, want: list[bytes],
                 moved: bool = False) -> None:
        """Queue the store's reads of `owner`'s metadata and of which of `want` it holds; the request waits only for
        the latter. `moved`: the metadata, read inline, already said the session moved."""
        if self.lookups is None or (meta_key is None and not want):
            return
        names = tuple(block_key(self.identity, k, r) for k in want for r in range(self.world_size))
        if not self.lookups.submit(Lookup(request_id if want else None, owner, meta_key, tuple(want), names, moved)):
            if meta_key is not None:
                self._seen_sessions.pop(owner, None)  # not asked: its next request asks

    def _held_run(self, want: list[bytes]) -> list[bytes]:
        """On the scheduler thread: the run of `want` (prefix order) whose every rank's frame the store holds."""
        names = [block_key(self.identity, k, r) for k in want for r in range(self.world_size)]
        present, _ = self._read(lambda: self.store.has_blocks(names))
        if not isinstance(present, list) or len(present) != len(names):
            present = [False] * len(names)  # (all([]) is True: a short answer must not read as "all present")
        run = 0
        while run < len(want) and all(present[run * self.world_size:(run + 1) * self.world_size]):
            run += 1
        return want[:run]

    def _read(self, read: Callable[[], Any]) -> tuple[Any, bool]:
        """`read()` of the store on the scheduler thread, timed (`ReadCost`): (its value, True), or (None, False) if it
        raised or the store went down during it. Nothing the store holds or does may raise into the engine core
        (counted, logged once)."""
        t = time.perf_counter()
        try:
            return read(), self.store.up
        except Exception as exc:  # noqa: BLE001 - the engine must outlive any store value or client error
            self._bad_value(f"a store read failed ({type(exc).__name__}: {exc})")
            return None, False
        finally:
            self.read_cost.note(time.perf_counter() - t, inline=True)

    def _moved(self, raw: Any) -> bool:
        """A session's metadata as read: True (counted) if another replica served its last turn."""
        meta = SessionMeta.decode(raw)
        if raw is not None and meta is None:
            self._bad_value("malformed session metadata (ignored)")
        if meta is not None and meta.replica and meta.replica != self.cfg.replica:
            self.counters["moved_sessions"] += 1
            return True
        return False
