"""The FP8 tier directory's slots that a lower level's fetch (disk, shared store) fills in the background.

Such a slot is held from the fetch's start until every worker has reported it over: no restore reads it and no other
key gets it, whatever happens to its key meanwhile (kvsched.core.tier keeps the keys; this keeps the slots). While it
is filled, its session's blocks are not evicted (its request waits for them), unless the fetch is overdue. Kept apart
from the directory so that the rules about a slot being written behind the engine's back live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class FillingSlots:
    """Slots being filled; `in` tells whether one is."""

    slots: set[int] = field(default_factory=set)
    overdue: set[int] = field(default_factory=set)  # of `slots`: fetches long past their deadline (`give_up`)

    def __contains__(self, slot: object) -> bool:
        return slot in self.slots

    def hold(self, slots: Iterable[int]) -> None:
        self.slots.update(slots)

    def landed(self, slot: int) -> None:
        self.slots.discard(slot)
        self.overdue.discard(slot)

    def give_up(self, slots: Iterable[int]) -> None:
        """The fetches filling `slots` are long past their deadline (a worker's read hung?): they no longer protect
        their sessions (found by review: one such fetch kept its whole session in the tier for good), but the slots
        stay held until they land, since the stuck read may still write them."""
        self.overdue.update(s for s in slots if s in self.slots)

    def protects(self, slots: Iterable[int | None]) -> bool:
        """True if one of `slots` (None: a key the tier does not hold) is being filled by a fetch not overdue: its
        session's request waits for it, and evicting it would free no slot before it lands."""
        return bool(self.slots) and any(s in self.slots and s not in self.overdue for s in slots)

    def in_run(self, slots: Iterable[int | None]) -> bool:
        """True if the run `slots` has a slot being filled; the run ends at the first None (a key the tier does not
        hold: nothing after it can be restored)."""
        for slot in slots:
            if slot is None:
                return False
            if slot in self.slots:
                return True
        return False
