"""What a turn joined to an inferred session another conversation may share (`Lineage.shared_join`) may change of it.

Two headerless users whose identical first prompt joined one inferred session share it until a turn that extends it
finishes. Meanwhile a joined turn's hints are one user's and the session is both's: its end ends nothing (ignored and
counted; the TTL expires the pin), its TTL hint only lengthens the pin, and its role hint only sets a role where none
is set (found by review: another user's `X-Agent-Role` overwrote the session's, raising or lowering the value of the
pin the first user's next turn hits; role weights are `RetentionConfig.role_weights`).

A turn that repeats the shared prompt (`Lineage.shared_repeat`) leaves the session shared, so its answer joins the pin
beside the other user's rather than replacing it (`JoinedPins.join`; found by review: the other user's answer blocks
lost their pin, first at the repeat's start, which released what it did not hit, then at its finish). The pin stays
within the pin budget and its TTL; the turn that extends one answer ends the sharing, and its chain replaces the pin.

A union pin keeps at most `RetentionConfig.shared_pin_answers` answers (`KVSCHED_SHARED_PIN_ANSWERS`, 4): a popular
first prompt with sampled answers otherwise added every distinct answer until someone continued one, bounded only by
the pin budget; past the cap the oldest added answer leaves first (`JoinedPins`). While the pin holds several
answers, a turn that continues one of them releases nothing at its start (it hit one answer, which the pin's tail
need not be: found by review, it cut the pin's tail, the answer it had just hit, and left the other answers pinned,
counted as held by its request and so releasable by nothing until it finished); its finish makes its chain the
session's pin, and the answers it did not continue stay pinned for their users under a companion session until the
union's TTL runs out (`kvsched.core.shared_answers`).

A client's retry (the same prompt again after its first request was aborted or failed) is no repeat: the session is
not shared by it (`Lineage.finished(normal=False)`), so that user's hints stay its own. Another user's identical
prompt sent after that aborted request reads as the first user's retry, and cannot be told apart: the engine sees the
same tokens under the same salt and tenant, and the aborted request left no answer that only its user could repeat
(the computed anchor a stranger cannot send); nor does timing separate them (a retry and another user's ask both come
seconds later). So that turn's role and TTL hints are the session's (one with an end hint joins only a session
whose answer it repeats, so it ends a session of its own). What it can take is bounded: the session holds no answer
anyone received (an aborted answer's blocks no client can continue) and the prompt's KV, which that turn hits anyway,
and the first user's own retry after it repeats an answered prompt, so it shares the session. What keeps them apart
is what the engine can see: a session field, another API key (the middleware's `kvsched_tenant`: lineage indexes
per tenant) or another `cache_salt` (compared, and in vLLM's block hashes); tests/adapters/vllm/
test_session_pins_shared_turns.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from typing import TypeVar

from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import TurnHints

__all__ = ["DEFAULT_PIN_ANSWERS", "JoinedPins", "shared_arrival", "shared_finish_hints"]

B = TypeVar("B")  # a block handle (`kvsched.core.pin_apply.PinPool`)
Keys = Callable[[list[B]], list[tuple[Hashable, int]]]  # the pool's content keys (`PinPool.cached_keys`)
DEFAULT_PIN_ANSWERS = 4  # answers one shared pin keeps at most (`RetentionConfig.shared_pin_answers`)


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


class JoinedPins:
    """The answers a shared session's union pin holds: per session whose pin holds two or more, each answer's chain
    (per KV-cache group, the content keys of its blocks, the shared prompt's included), the oldest first, at most
    `cap`. The pin applier keeps one and drops a session's entry whenever its pin stops being a union."""

    def __init__(self, cap: int = DEFAULT_PIN_ANSWERS) -> None:
        if cap < 1:
            raise ValueError(f"a shared pin keeps at least one answer, got {cap}")
        self.cap = cap
        self.answers: dict[Hashable, list[list[frozenset[Hashable]]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.answers

    def forget(self, key: Hashable) -> None:
        """The session's pin is no union any more (replaced by one turn's chain, released whole, restored)."""
        self.answers.pop(key, None)

    def join(self, key: Hashable, old: Sequence[list[B]] | None, groups: list[list[B]], tokens: int,
             old_tokens: int, block_size: int, budget: int, keys: Keys[B]) -> tuple[list[list[B]], int, bool]:
        """The pin a turn that repeated a shared session's last prompt leaves, and whether its answer is one the pin
        did not hold (or there was no pin to compare with). Per KV-cache group: the session's pin `old` (`old_tokens`
        tokens), then this turn's blocks (`groups`, covering `tokens`) whose content (`keys`: the pool's content keys,
        `PinPool.cached_keys`) it does not hold yet, so the other user's answer stays pinned beside this one and an
        identical answer adds nothing; its tokens: `old_tokens` plus a block's for each block added (the most in any
        group). At most `cap` answers: past it, the blocks only the oldest answer's chain holds leave the pin (a block
        another kept answer also holds stays). The turn's own pin (and the session forgotten here) when there is no
        pin to join, a block has no content key, the union would pass `budget` blocks or the cap keeps one answer."""
        if not old or len(old) != len(groups):
            self.forget(key)
            return groups, tokens, True
        held_keys = [keys(g) for g in old]
        new_keys = [keys(g) for g in groups]
        if any(len(k) != len(g) for k, g in zip(new_keys, groups, strict=True)) or \
                any(len(k) != len(g) for k, g in zip(held_keys, old, strict=True)):
            self.forget(key)  # a block not in the prefix cache: no content to compare
            return groups, tokens, True
        chains = self.answers.get(key) or [[frozenset(k for k, _ in g) for g in held_keys]]  # the first answer
        chain = [frozenset(k for k, _ in g) for g in new_keys]
        added = chain not in chains
        if added:
            chains = [*chains, chain]
        chains = chains[max(len(chains) - self.cap, 0):]
        out: list[list[B]] = []
        for i, (held, pairs_old, new, pairs_new) in enumerate(zip(old, held_keys, groups, new_keys, strict=True)):
            keep = frozenset().union(*(c[i] for c in chains))
            kept = [b for b, (k, _) in zip(held, pairs_old, strict=True) if k in keep]
            known = {k for k, _ in pairs_old if k in keep}
            out.append([*kept, *(b for b, (k, _) in zip(new, pairs_new, strict=True) if k not in known)])
        if sum(map(len, out)) > budget or len(chains) < 2:  # (the cap keeps one answer: this turn's chain is the pin)
            self.forget(key)
            return groups, tokens, added
        self.answers[key] = chains
        longest = max(range(len(old)), key=lambda i: len(old[i]))  # the tokens follow the longest group's blocks
        return out, max(old_tokens + (len(out[longest]) - len(old[longest])) * block_size, tokens), added

