"""The FP8 tier's partial last blocks of a shared inferred session's answers (`kvsched.core.shared_turns`).

The tier keeps one partial last block per session (`TierDirectory.tail_of`: the KV past its last full block, which
vLLM's prefix cache never shares), and a turn's tail replaces its session's. Two users whose identical first prompt
joined one inferred session each continue their own answer, so a repeating turn's tail replaced the other user's,
whose next turn then recomputed up to a block of its own answer (found by review: the tier side of the union pin).
While the session is shared, the tail a repeating turn would replace is kept under a companion owner (`TailOwner`) of
the session, at most `cap - 1` of them (the session's own tail is the cap's last answer, as `JoinedPins` counts), the
oldest going first; they go when a turn that did not repeat the last prompt finishes (it continued one answer: the
sharing is over; the other answers' tails pass to the companion session that keeps their blocks, `hand_over`) or the
session ends. A companion is worth nothing to the tier's value order (`PinApplier.tier_value`
values sessions only), so under pressure its tail yields first; by recency it is as old as the turn that kept it.
A handed-over tail leaves when its answer leaves the companion session (its user is back: `keep_after`). The
simulator, whose tokens are synthetic, finds a tail through its owners (`tail_after`), the handed-over ones by the
full block they follow: the returning user's turn is a session of its own, and the engine loads the tail for it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from kvsched.core.tier import TailKey, TierDirectory

__all__ = ["MAX_SESSIONS", "SharedTails", "TailOwner"]

# Shared sessions whose other answers' tails are kept, the least recently kept forgotten first (their tails go): most
# inferred sessions are never ended, so their entries would otherwise outlive them (the tier evicts the tails alone).
MAX_SESSIONS = 10_000


@dataclass(frozen=True, slots=True)
class TailOwner:
    """A tier owner holding another answer's tail of `session` (never equal to a session key)."""

    session: Hashable
    n: int


class SharedTails:
    """Per shared session, its companion tail owners, oldest first."""

    def __init__(self, cap: int, max_sessions: int = MAX_SESSIONS) -> None:
        self.cap = cap
        self.max_sessions = max_sessions
        self.kept: OrderedDict[Hashable, list[TailOwner]] = OrderedDict()
        self._ids = itertools.count(1)
        # The owners `hand_over` made, by the full block their tail follows: another user's answer a companion session
        # keeps, which that user's next turn (a session of its own) loads (`tail_after`)
        self._handed: dict[Hashable, list[TailOwner]] = {}
        self._parent: dict[TailOwner, Hashable] = {}

    def turn_finished(self, directory: TierDirectory, key: Hashable, repeated: bool, other: bool = True) -> None:
        """A turn of `key` finished, before its own tail is saved: one that `repeated` the shared last prompt with
        an `other` answer (its full blocks differ from the pin's answers', or there was no pin to compare) keeps the
        session's current tail beside (unless a companion holds it already); any other repeat keeps things as they
        are (the same answer: the same tail, mostly), and a turn that did not repeat it ends the keeping."""
        if not repeated:
            self.release(directory, key)
            return
        if not other:
            return
        owners = self.kept.get(key, [])
        current = directory.tail_of.get(key)
        if self.cap < 2 or current is None or any(directory.tail_of.get(o) == current for o in owners):
            return
        owner = TailOwner(key, next(self._ids))
        if not directory.share_tail(key, owner):
            return
        owners.append(owner)
        while len(owners) > self.cap - 1:
            self._drop(directory, owners.pop(0))
        self._keep(directory, key, owners)

    def hand_over(self, directory: TierDirectory, key: Hashable, to: Hashable, parents: set[Hashable]) -> None:
        """A turn continued one answer of `key`'s union pin, and the companion session `to` keeps the others
        (`kvsched.core.shared_answers`): the tails after their last full blocks (`parents`: `to`'s blocks the turn's
        chain does not hold) stay under owners of `to`, so a user back on its answer loads its partial block too;
        then the sharing ends (`release`). They go when the tier evicts them (worth nothing to its value order, the
        first to go) or by `max_sessions`, as the union's blocks, demoted there at `to`'s TTL, go by eviction."""
        owners: list[TailOwner] = []
        for o in (key, *self.kept.get(key, ())):
            tail = directory.tail_of.get(o)
            if tail is None or tail.parent not in parents or any(directory.tail_of.get(x) == tail for x in owners):
                continue
            owner = TailOwner(to, next(self._ids))
            if directory.share_tail(o, owner):
                owners.append(owner)
                self._handed.setdefault(tail.parent, []).append(owner)
                self._parent[owner] = tail.parent
        self.release(directory, key)
        if owners:
            self._keep(directory, to, owners)

    def keep_after(self, directory: TierDirectory, to: Hashable, parents: set[Hashable]) -> None:
        """Answers left the companion session `to` (their users came back): its tails after blocks not in `parents`
        (the full blocks it still pins) go with them; all of them when it pins none."""
        owners = self.kept.get(to)
        if owners is None:
            return
        gone = [o for o in owners if (t := directory.tail_of.get(o)) is None or t.parent not in parents]
        for owner in gone:
            owners.remove(owner)
            self._drop(directory, owner)
        if not owners:
            del self.kept[to]

    def _keep(self, directory: TierDirectory, key: Hashable, owners: list[TailOwner]) -> None:
        self.kept[key] = owners
        self.kept.move_to_end(key)
        while len(self.kept) > self.max_sessions:
            self.release(directory, next(iter(self.kept)))

    def release(self, directory: TierDirectory, key: Hashable) -> None:
        """The sharing ended (or the session did): the companions' tails leave the tier unless others hold them."""
        for owner in self.kept.pop(key, ()):
            self._drop(directory, owner)

    def _drop(self, directory: TierDirectory, owner: TailOwner) -> None:
        directory.drop_owner(owner)
        parent = self._parent.pop(owner, None)
        if parent is not None:
            handed = self._handed[parent]
            handed.remove(owner)
            if not handed:
                del self._handed[parent]

    def tail_after(self, directory: TierDirectory, key: Hashable, parent: Hashable) -> TailKey | None:
        """The tail (`TailKey`) the session or one of its companions holds after the full block `parent`, else one a
        companion session keeps there for another answer's user (`hand_over`): the one the engine, which matches a
        tail by its parent and tokens whoever owns it, loads for that user's next turn, a session of its own."""
        for owner in (key, *self.kept.get(key, ()), *self._handed.get(parent, ())):
            tail = directory.tail_of.get(owner)
            if tail is not None and tail.parent == parent:
                return tail
        return None
