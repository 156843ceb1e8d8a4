"""Which sessions own each key the FP8 tier's directory holds (kvsched.core.tier).

Nearly every key has one owner (a session's own blocks; only a shared prefix such as a system prompt has more), so a
key's sole owner is stored as itself and a set is made only for a second one. A set per key made the tier's table a
tracked object per block for Python's garbage collector: `kvsched bench sched --tier` at 10,000 sessions added ~64 sets
a step while the tier filled (up to one per slot once full), three times the engine's gen-0 collections and gen-2
collections of ~170 ms instead of ~60 ms, on the scheduler's thread.

An owner is any hashable (a set never is); a key whose last owner left while a load still reads its slot stays with
no owner (`NOBODY`) until the directory frees it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

Key = Hashable
Owner = Hashable


class _Nobody:
    """A held key no session owns any more (an orphan, freed once this step's loads are planned)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOBODY"


NOBODY = _Nobody()
_ABSENT = object()


class KeyOwners:
    """key -> its owners. The directory's hot paths call `add`, `own` and `leave`; reads as sets (`get`, `[]`,
    `items`: frozensets, made per call) are for the rare paths and tests."""

    __slots__ = ("_of",)

    def __init__(self) -> None:
        self._of: dict[Key, Any] = {}  # a key's sole owner, a set of two or more, or NOBODY

    def add(self, key: Key, owner: Owner) -> None:
        """`key` enters the tier, owned by `owner` alone."""
        self._of[key] = owner

    def own(self, key: Key, owner: Owner) -> bool:
        """`owner` owns the held `key` too (an orphan is owned again); True if it did not already."""
        of = self._of
        cur = of.get(key, NOBODY)
        if cur is NOBODY:
            of[key] = owner
        elif type(cur) is set:
            if owner in cur:
                return False
            cur.add(owner)
        elif cur == owner:
            return False
        else:
            of[key] = {cur, owner}
        return True

    def leave(self, key: Key, owner: Owner) -> bool | None:
        """`owner` no longer owns `key`: None if the tier does not hold it, else whether other owners remain (with
        none left, the key stays held by NOBODY until the caller frees it)."""
        of = self._of
        cur = of.get(key, _ABSENT)
        if cur is _ABSENT:
            return None
        if type(cur) is set:
            cur.discard(owner)
            if len(cur) > 1:
                return True
            if cur:
                of[key] = next(iter(cur))  # back to one owner: the set goes
                return True
            of[key] = NOBODY
            return False
        if cur is not NOBODY and cur == owner:
            of[key] = NOBODY
            return False
        return cur is not NOBODY

    def owned(self, key: Key) -> bool:
        """True if a session owns `key` (held and not an orphan)."""
        return self._of.get(key, NOBODY) is not NOBODY

    def pop(self, key: Key) -> frozenset[Owner]:
        """Forget `key`; its owners (empty if none, or not held)."""
        return self._as_set(self._of.pop(key, NOBODY))

    def discard(self, key: Key) -> None:
        """Forget `key` (whoever owned it)."""
        self._of.pop(key, None)

    def get(self, key: Key, default: frozenset[Owner] | None = None) -> frozenset[Owner] | None:
        cur = self._of.get(key, _ABSENT)
        return default if cur is _ABSENT else self._as_set(cur)

    def __getitem__(self, key: Key) -> frozenset[Owner]:
        return self._as_set(self._of[key])

    def __contains__(self, key: object) -> bool:
        return key in self._of

    def __len__(self) -> int:
        return len(self._of)

    def items(self) -> Iterator[tuple[Key, frozenset[Owner]]]:
        return ((k, self._as_set(v)) for k, v in self._of.items())

    def clear(self) -> None:
        self._of.clear()

    @staticmethod
    def _as_set(cur: Any) -> frozenset[Owner]:
        if cur is NOBODY:
            return frozenset()
        if type(cur) is set:
            return frozenset(cur)
        return frozenset((cur,))
