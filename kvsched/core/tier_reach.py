"""Which sessions' FP8 tier blocks (kvsched.core.tier) a full tier gives up first, knowing what the KV pool holds.

A tier block saves a recompute only if the pool no longer has it when its session returns. A block the pool still
holds referenced (a pin, a running request) saves nothing now, and keeping it gains nothing later: when its pin is
released (pressure, budget, TTL), the release demotes it again (`kvsched.core.pin_apply`), a fresh copy. Such copies
are common: a session that restored its prefix from the tier pins it again, and its tier copy stays listed.

So, given `pool_holds` (does the pool hold a key referenced: the simulator's pool, vLLM's block pool; a lookup, no
scan), the directory's eviction first takes, from the sessions it samples, the blocks the pool holds, deepest first,
then the sessions' blocks in its usual order (lowest rank first, deepest first). A session's pin holds a prefix of its
chain and its tier list is in chain order (`tier_chain`), so the pool holds the list's deepest block only when it
holds the whole list (bar another session's pin): one lookup per sampled session tells which lists are redundant.
Without `pool_holds` the order is as before.

The answers are remembered within a pass of pin releases (`batch`): a full tier evicts once per release, each time
sampling the same sessions, so the pool was asked the same ~64 keys some 30 times per pass (`kvsched bench sched --tier`
with a 0.25 GiB tier at 10,000 sessions: 65 lookups per eviction, 0.6 ms a step; BENCHMARKS.md). Within such a pass the
pool's references change only by the releases themselves, and each release gives back only the blocks it demotes, after
the demotion: the directory forgets their keys' answers then (`released`), so an answer is never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

Key = Hashable
Owner = Hashable
T = TypeVar("T")


class Reach:
    """The pool query, its answers remembered within a pass of releases, and the order victims give up blocks in."""

    __slots__ = ("pool_holds", "_memo")

    def __init__(self) -> None:
        self.pool_holds: Callable[[Key], bool] | None = None
        self._memo: dict[Key, bool] | None = None  # key -> pool_holds(key), only within `batch`

    def batch(self, releases: Callable[[], T]) -> T:
        """`releases()` (a pass of pin releases: `PinApplier`'s budget, TTL and pressure passes) with the pool's answers
        remembered. The caller vouches that within it the pool's references change only by releases, each giving back
        blocks only after demoting them into the directory (whose `demote` then forgets them): no allocation, no
        request's start or end, no pin taken."""
        if self.pool_holds is None or self._memo is not None:  # no query, or already in a pass
            return releases()
        self._memo = {}
        try:
            return releases()
        finally:
            self._memo = None

    def released(self, keys: Iterable[Key]) -> None:
        """The pool gives back the blocks of `keys` next (a demotion's): forget what it said about them."""
        memo = self._memo
        if memo:
            pop = memo.pop
            for key in keys:
                pop(key, None)

    def holds(self, key: Key) -> bool:
        """pool_holds(key), remembered within a pass (`batch`); False without a query."""
        query = self.pool_holds
        if query is None:
            return False
        memo = self._memo
        if memo is None:
            return query(key)
        held = memo.get(key)
        if held is None:
            held = memo[key] = query(key)
        return held

    def passes(self, victims: Sequence[Owner], keys_of: dict[Owner, list[Key]]) -> Iterator[tuple[Owner, bool]]:
        """(victim, held_only) in eviction order: first each of `victims` (ranked, lowest first) whose deepest block
        the pool holds, giving up only blocks the pool holds (`redundant`), then every victim, anything."""
        if self.pool_holds is not None:
            holds = self.holds
            for victim in victims:
                keys = keys_of.get(victim)
                if keys and holds(keys[-1]):
                    yield victim, True
        for victim in victims:
            yield victim, False

    def redundant(self, keys: list[Key]) -> bool:
        """True if the pool holds `keys`' deepest block (a list's block to give up in the first pass)."""
        return self.pool_holds is not None and bool(keys) and self.holds(keys[-1])
