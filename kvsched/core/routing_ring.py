"""A consistent-hash ring over stable replica slot names.

Keyed on slot names ("slot-0", "slot-1", …) rather than a replica's unique id, so a replica that replaces a dead one
under the same slot owns exactly the same ring arcs (new sessions homed there; `routing.py` says which failed-over
sessions go back). Virtual nodes smooth the arc sizes (Karger et al., 1997); the hash is BLAKE2b truncated to 64
bits, from the standard library, identical in every process.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from typing import NewType

SlotName = NewType("SlotName", str)


def hash64(key: str) -> int:
    """A process-independent 64-bit hash of `key` (Python's `hash()` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def slot_name(index: int) -> SlotName:
    """The stable name of slot `index` (a Ray Serve replica's rank)."""
    return SlotName(f"slot-{index}")


class HashRing:
    """Slots placed at `virtual_nodes` points each; a key belongs to the first point clockwise of its hash."""

    def __init__(self, slots: Iterable[SlotName] = (), virtual_nodes: int = 100) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        # Built with one sort (ties by slot name, as `add` breaks them): adding slots one by one inserts into a list
        # per point, quadratic in the ring (found by review: 100,000 replicas did not build in minutes).
        self._slots: set[SlotName] = set(slots)
        ring = sorted((hash64(f"{s}#{i}"), s) for s in self._slots for i in range(virtual_nodes))
        self._points: list[int] = [p for p, _ in ring]
        self._owners: list[SlotName] = [s for _, s in ring]

    @property
    def slots(self) -> frozenset[SlotName]:
        return frozenset(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, slot: object) -> bool:
        return slot in self._slots

    def add(self, slot: SlotName) -> None:
        if slot in self._slots:
            return
        self._slots.add(slot)
        for i in range(self.virtual_nodes):
            point = hash64(f"{slot}#{i}")
            at = bisect.bisect_left(self._points, point)
            # Ties (astronomically rare) are broken by slot name so every process builds the same ring.
            while at < len(self._points) and self._points[at] == point and self._owners[at] < slot:
                at += 1
            self._points.insert(at, point)
            self._owners.insert(at, slot)

    def remove(self, slot: SlotName) -> None:
        if slot not in self._slots:
            return
        self._slots.discard(slot)
        keep = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != slot]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    def walk(self, key: str) -> Iterator[SlotName]:
        """Every slot once, in clockwise order from `key`'s hash: the owner first, then its successors."""
        n = len(self._points)
        if n == 0:
            return
        start = bisect.bisect_right(self._points, hash64(key)) % n
        seen: set[SlotName] = set()
        for k in range(n):
            owner = self._owners[(start + k) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._slots):
                    return

    def owner(self, key: str) -> SlotName | None:
        return next(self.walk(key), None)
