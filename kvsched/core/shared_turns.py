"""What a turn joined to an inferred session another conversation may share (`Lineage.shared_join`) may change of it.

Two headerless users whose identical first prompt joined one inferred session share it until a turn that extends it
finishes. Meanwhile a joined turn's hints are one user's and the session is both's: its end ends nothing (ignored and
counted; the TTL expires the pin), its TTL hint only lengthens the pin, and its role hint only sets a role where none
is set (found by review: another user's `X-Agent-Role` overwrote the session's, raising or lowering the value of the
pin the first user's next turn hits; role weights are `RetentionConfig.role_weights`).

A turn that repeats the shared prompt (`Lineage.shared_repeat`) leaves the session shared, so its answer joins the pin
beside the other user's rather than replacing it (`joined_pin`; found by review: the other user's answer blocks lost
their pin, first at the repeat's start, which released what it did not hit, then at its finish). The pin stays within
the pin budget and its TTL; the turn that extends one answer ends the sharing, and its chain replaces the pin.

A client's retry (the same prompt again after its first request was aborted or failed) is no repeat: the session is
not shared by it (`Lineage.finished(normal=False)`), so that user's hints stay its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from typing import TypeVar

from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import TurnHints

__all__ = ["joined_pin", "shared_arrival", "shared_finish_hints"]

B = TypeVar("B")  # a block handle (`kvsched.core.pin_apply.PinPool`)


def shared_arrival(rec: SessionRecord, role: str | None, shared: bool, repeats: bool,
                   counters: MutableMapping[str, int]) -> None:
    """A request with role hint `role` arrived: the session's role is the hint, unless the request is `shared` and the
    session already has another role (kept; counted in `inferred_shared_roles_ignored`, once per request); it joins
    the pin (`SessionRecord.joins_pin`) if it is `shared` and `repeats` the last prompt."""
    rec.joins_pin = shared and repeats
    if not role:
        return
    if shared and rec.role is not None and rec.role != role:
        counters["inferred_shared_roles_ignored"] += 1
        return
    rec.role = role


def shared_finish_hints(rec: SessionRecord, hints: TurnHints, ttl_s: float,
                        counters: MutableMapping[str, int]) -> TurnHints:
    """A shared turn's hints at its finish (`ttl_s`: its TTL hint as configured): no end (counted), a TTL no shorter
    than the session's, and no role other than the session's once it has one (counted at arrival: `shared_arrival`)."""
    counters["inferred_shared_ends_ignored"] += hints.end
    role = hints.role if rec.role in (None, hints.role) else None
    return dataclasses.replace(hints, end=False, ttl_s=max(ttl_s, rec.ttl_s), role=role)


def joined_pin(old: Sequence[list[B]] | None, groups: list[list[B]], tokens: int, old_tokens: int, block_size: int,
               budget: int, keys: Callable[[list[B]], list[tuple[Hashable, int]]]) -> tuple[list[list[B]], int]:
    """The pin a turn that repeated a shared session's last prompt leaves: per KV-cache group, the session's pin `old`
    (`old_tokens` tokens) and then this turn's blocks (`groups`, covering `tokens`) whose content (`keys`: the pool's
    content keys, `PinPool.cached_keys`) it does not hold yet, so the other user's answer stays pinned beside this
    one and an identical answer adds nothing. Its tokens: `old_tokens` plus a block's for each block added (the most
    in any group). This turn's own (`groups`, `tokens`) when there is no pin to join, a block of the turn has no
    content key, or the union would pass `budget` blocks (the pin budget bounds it; the TTL expires it whole)."""
    if not old or len(old) != len(groups):
        return groups, tokens
    out: list[list[B]] = []
    added = 0
    for held, new in zip(old, groups, strict=True):
        known = {k for k, _ in keys(held)}
        pairs = keys(new)
        if len(pairs) != len(new):
            return groups, tokens
        extra = [b for b, (k, _) in zip(new, pairs, strict=True) if k not in known]
        out.append([*held, *extra])
        added = max(added, len(extra))
    if sum(map(len, out)) > budget:
        return groups, tokens
    return out, old_tokens + added * block_size
