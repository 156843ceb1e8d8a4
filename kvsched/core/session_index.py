"""The session table by owner (tenant, cache salt), so that a tenant's session-route call costs its own sessions, not
the table's. Found by review: every list, summary or delete walked the whole table on the engine-core thread, which
runs such calls before its next step, so a burst of them from any key with no sessions at all stalled decoding.

Kept without hooks in the policy. `RetentionPolicy.sessions` is ordered by `SessionRecord.activity`: a record is added
at the end with the next activity number and moved to the end with a new one whenever it is active (`_new_record`,
`_touch`; tests/core/test_session_index.py holds the policy to that). The records added since the last look are
therefore in the tail whose activity is above the highest seen then, and `sync` walks only that tail. Removals are found
lazily: an owner's keys no longer in the table are dropped when that owner is looked up, and the index is rebuilt once
it holds more than twice the table (amortized O(1) per session added).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Protocol

from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import SessionKey

Owner = tuple[str | None, str | None]  # (tenant, cache salt), compared as `kvsched.core.tenancy.Caller.owns` does


class HasSessions(Protocol):
    sessions: OrderedDict[SessionKey, SessionRecord]


class SessionIndex:
    """Owner -> its keys (an insertion-ordered set), over `policy.sessions`; call from the thread that changes it."""

    REBUILD_SLACK: Final = 1024  # stale entries tolerated beyond the table's size before a rebuild

    def __init__(self, policy: HasSessions) -> None:
        self._policy = policy
        self._table: OrderedDict[SessionKey, SessionRecord] = policy.sessions
        self._owners: dict[Owner, dict[SessionKey, None]] = {}
        self._entries = 0  # keys held, stale ones included
        self._seen = 0  # the highest activity indexed
        self.rebuilds = 0
        self.rebuild()

    def rebuild(self) -> None:
        """Index the whole table afresh (O(table))."""
        self._table = table = self._policy.sessions
        owners: dict[Owner, dict[SessionKey, None]] = {}
        self._owners = owners
        for key in table:  # (inline: ~4x faster than `_add` per key)
            keys = owners.get(owner := (key.tenant, key.cache_salt))
            if keys is None:
                owners[owner] = {key: None}
            else:
                keys[key] = None
        self._entries = len(table)
        self._seen = table[next(reversed(table))].activity if table else 0  # the last is the most recent
        self.rebuilds += 1

    def sync(self) -> int:
        """Index the records added since the last call: the table's tail of higher activity. Returns how many records
        it walked."""
        table = self._policy.sessions
        if table is not self._table or self._entries > 2 * len(table) + self.REBUILD_SLACK:
            self.rebuild()
            return len(table)
        seen = top = self._seen
        walked = 0
        for key in reversed(table):
            activity = table[key].activity
            if activity <= seen:
                break
            walked += 1
            top = max(top, activity)
            self._add(key)
        self._seen = top
        return walked

    def owned(self, tenant: str | None, cache_salt: str | None) -> list[SessionKey]:
        """The owner's keys now in the table (its stale ones dropped on the way). O(its keys + records added since the
        last call)."""
        self.sync()
        owner = (tenant, cache_salt)
        keys = self._owners.get(owner)
        if not keys:
            return []
        table = self._table
        live = [k for k in keys if k in table]
        if len(live) < len(keys):
            self._entries -= len(keys) - len(live)
            if live:
                self._owners[owner] = dict.fromkeys(live)
            else:
                del self._owners[owner]
        return live

    def __len__(self) -> int:
        return self._entries

    def _add(self, key: SessionKey) -> None:
        keys = self._owners.setdefault((key.tenant, key.cache_salt), {})
        if key not in keys:
            keys[key] = None
            self._entries += 1
