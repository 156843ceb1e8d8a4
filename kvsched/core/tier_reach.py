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
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

Key = Hashable
Owner = Hashable


class Reach:
    """The pool query and the order in which victims give up blocks."""

    __slots__ = ("pool_holds",)

    def __init__(self) -> None:
        self.pool_holds: Callable[[Key], bool] | None = None

    def passes(self, victims: Sequence[Owner], keys_of: dict[Owner, list[Key]]) -> Iterator[tuple[Owner, bool]]:
        """(victim, held_only) in eviction order: first each of `victims` (ranked, lowest first) whose deepest block
        the pool holds, giving up only blocks the pool holds (`redundant`), then every victim, anything."""
        holds = self.pool_holds
        if holds is not None:
            for victim in victims:
                keys = keys_of.get(victim)
                if keys and holds(keys[-1]):
                    yield victim, True
        for victim in victims:
            yield victim, False

    def redundant(self, keys: list[Key]) -> bool:
        """True if the pool holds `keys`' deepest block (a list's block to give up in the first pass)."""
        return self.pool_holds is not None and bool(keys) and self.pool_holds(keys[-1])
