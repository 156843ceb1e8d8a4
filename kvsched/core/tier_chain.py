"""Keeps each session's list of FP8 tier blocks (kvsched.core.tier) in its pin's order, whatever order they came in.

The directory evicts a session's blocks from the tail of its list, so that what stays is a prefix a restore can reach
(a restore runs along the chain from the pool's hit). A pin is released tail first, a batch at a time, and each batch
comes before the batches released earlier from the same pin: pressure takes its last 2 blocks, its TTL later the other
4. Listed in the order of the demotions (k5, k6, k1..k4), a full tier evicted k4 and kept k5, k6, which no restore can
reach (found by a helper's probe). So each listed key carries its position in the pin that released it (the block's
index: its place in the chain; in a pin of several answers, the union's order, `kvsched.core.shared_answers`, whose
tail-first releases leave each answer a prefix), per owner (one key may sit at different places in two sessions'
pins), and a batch that lands before keys already listed is merged into place. Positions are plain ints in one dict
per session: no object per block for the garbage collector.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

Key = Hashable
Owner = Hashable


def list_in_order(at: dict[Key, int], mine: list[Key], n0: int, keys: Sequence[Key], start: int | None) -> None:
    """`mine[n0:]` were just listed for a session, in order, out of `keys`, whose first sits at `start` in its pin
    (None: unknown, taken as just past the session's last listed key, the order of the demotions). Records their
    positions in `at` (the session's) and keeps `mine` sorted by position; among equal positions (another branch's
    block at the same place) the one listed first stays first. O(1) when the batch goes last (the usual case); else a
    stable sort of two sorted runs, O(len(mine))."""
    new = len(mine) - n0
    if new <= 0:
        return
    if start is None:
        start = at.get(mine[n0 - 1], -1) + 1 if n0 else 0
    if new == len(keys):  # every key of the batch was listed: they are `mine[n0:]`
        at.update(zip(keys, range(start, start + new), strict=True))
    else:
        index = {key: i for i, key in enumerate(keys)}
        for key in mine[n0:]:
            at[key] = start + index[key]
    if n0 and at.get(mine[n0 - 1], 0) > at[mine[n0]]:
        mine.sort(key=lambda key: at.get(key, 0))


def unlist(keys_of: dict[Owner, list[Key]], position_of: dict[Owner, dict[Key, int]], owner: Owner, key: Key) -> None:
    """`key` leaves `owner`'s list, wherever it is (a dropped key: a corrupt slot, a failed fetch)."""
    keys = keys_of.get(owner)
    if keys is not None and key in keys:
        keys.remove(key)
        position_of.get(owner, {}).pop(key, None)
        if not keys:
            del keys_of[owner]
            position_of.pop(owner, None)
