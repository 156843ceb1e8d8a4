"""Which stable slot each engine replica holds: the ring position its sessions hash to (`kvsched.core.routing_ring`).

A slot follows its replica (Ray's unique id) for as long as the replica lives, whatever rank Ray reports for it
later: Ray renumbers ranks after a scale-down (`check_rank_consistency_and_reassign_minimally` moves a survivor from
rank 2 to rank 1), and ranks come up in any order on a scale-up (rank 3 can be RUNNING before rank 2). Following the
rank moved the survivor's sessions to whichever replica took its old number next: away from their KV (found by
review). A replica the router has not seen yet takes:
1. its reported rank's slot, when that is a slot the ring knows and no replica holds (the dead or vacated slot of its
   predecessor: a replacement takes its predecessor's ring arcs, and the sessions that failed over only if it
   reports their KV);
2. else the lowest such vacant slot (a replacement that started under a rank past the end while its predecessor still
   held the old one; a new replica whose rank a renumbered survivor keeps under its old slot);
3. else its rank's slot, new to the ring (a scale-up: whichever of the new ranks comes up first);
4. else the lowest slot nobody holds (a replica that reports no rank, or a rank taken).
A replica whose engine is gone holds no slot (the router leaves it out), so its replacement can take it at once.

Pure: replica keys in, slots out.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import TypeVar

from kvsched.core.routing_ring import SlotName, slot_name

K = TypeVar("K", bound=Hashable)
_INDEX = re.compile(r"slot-(\d+)\Z")


def slot_index(slot: SlotName) -> int:
    m = _INDEX.match(slot)
    return int(m.group(1)) if m else 1 << 30


def assign_slots(replicas: Sequence[tuple[K, int | None]], previous: Mapping[K, SlotName],
                 known: Collection[SlotName]) -> dict[K, SlotName]:
    """`replicas`: (key, reported rank or None) of every live replica in Ray's set; `previous`: the slots the router
    gave them before; `known`: every slot on the ring, live or dead. Returns a distinct slot for each replica."""
    out: dict[K, SlotName] = {}
    held: set[SlotName] = set()
    for key, _ in replicas:  # a replica keeps its slot while it lives
        slot = previous.get(key)
        if slot is not None and slot not in held:
            out[key] = slot
            held.add(slot)
    new = sorted(((k, n) for k, n in replicas if k not in out), key=lambda kn: (kn[1] is None, kn[1] or 0))
    for key, rank in new:
        vacant = sorted((s for s in known if s not in held), key=slot_index)
        want = slot_name(rank) if rank is not None else None
        if want is not None and want in vacant:
            slot = want
        elif vacant:
            slot = vacant[0]
        elif want is not None and want not in held:
            slot = want
        else:
            slot = next(slot_name(i) for i in range(len(held) + 1) if slot_name(i) not in held)
        out[key] = slot
        held.add(slot)
    return out
