"""The FP8 tier directory's slots that a lower level's fetch (disk, shared store) fills in the background.

Such a slot is held from the fetch's start until every worker has reported it over: no restore reads it and no other
key gets it, whatever happens to its key meanwhile (kvsched.core.tier keeps the keys; this keeps the slots). Kept apart
from the directory so that the rules about a slot being written behind the engine's back live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class FillingSlots:
    """Slots being filled; `in` tells whether one is."""

    slots: set[int] = field(default_factory=set)

    def __contains__(self, slot: object) -> bool:
        return slot in self.slots

    def hold(self, slots: Iterable[int]) -> None:
        self.slots.update(slots)

    def landed(self, slot: int) -> None:
        self.slots.discard(slot)

    def any_filling(self, slots: Iterable[int | None]) -> bool:
        """True if one of `slots` (None: a key the tier does not hold) is being filled."""
        return bool(self.slots) and any(s in self.slots for s in slots)

    def in_run(self, slots: Iterable[int | None]) -> bool:
        """True if the run `slots` has a slot being filled; the run ends at the first None (a key the tier does not
        hold: nothing after it can be restored)."""
        for slot in slots:
            if slot is None:
                return False
            if slot in self.slots:
                return True
        return False
