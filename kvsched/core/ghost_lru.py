"""The pin payback tracker's ghost: the sampled block keys a plain LRU pool of the same size would hold (keys only, no
KV), with the blocks running requests hold kept apart (not evictable). This is the reference; `kvsched.ops.ghost`
gives the compiled one (`kvsched._C.GhostLru`, same interface and decisions) when the extension is built.

Sampling (SHARDS, see `kvsched.core.pin_payback`): a key is tracked when its mixed hash, (hash(k) x MIX) mod 2^64, is
below 2^64 / rate; bytes keys (vLLM's block hashes: digests, uniform in every byte) by their first byte instead, when
the rate divides 256 (a byte table, applied in C to the whole prompt: a few us for ~190 keys)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from itertools import compress

MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential ids (the simulator's) over the key space
MASK = (1 << 64) - 1
MEMO_LIMIT = 4096  # key lists remembered between `observe` and `cached` (running requests; a list never passed to
# `cached`, e.g. a copy, is forgotten oldest first past it; a forgotten one is only sampled again)


class LruGhost:
    """`observe` and `cached` take a request's keys in prefix order and `cap`, the pool's sampled blocks less what
    running requests hold beyond their prompts: the ghost keeps at most max(cap - held keys, 1) evictable keys."""

    __slots__ = ("threshold", "byte_table", "id_table", "lru", "run", "_memo")

    def __init__(self, rate: int) -> None:
        if rate < 1:
            raise ValueError("the ghost's sampling rate must be >= 1")
        self.threshold = (1 << 64) // rate  # a mixed key below it is sampled
        limit = 256 // rate if 256 % rate == 0 else 0
        self.byte_table = bytes(int(b < limit) for b in range(256)) if limit else None
        self.id_table: bytes | None = None  # dense int keys (the simulator's ids): key k is sampled iff id_table[k]
        self.lru: OrderedDict[Hashable, None] = OrderedDict()  # evictable keys, least recently used first
        self.run: dict[Hashable, int] = {}  # keys running requests hold -> how many hold each
        # id of a running request's key list -> (its last key then, its length then, its flags): `cached` gets the
        # same list, grown by the output's blocks, and maps only those (the memo holds the key: no other object has
        # its id meanwhile; vLLM's keys are chained, so an equal key at n - 1 means an equal prefix).
        self._memo: dict[int, tuple[Hashable, int, bytes]] = {}

    def __len__(self) -> int:
        return len(self.lru)

    def held(self) -> int:
        return len(self.run)

    def keys(self) -> list[Hashable]:
        return list(self.lru)

    def running(self) -> dict[Hashable, int]:
        return dict(self.run)

    def observe(self, keys: Sequence[Hashable], cached_blocks: int, hittable: int, cap: int
                ) -> tuple[int, int, int, bool]:
        """A request started with prompt `keys`, the first `cached_blocks` hits in the real pool, of which a hit may
        cover the first `hittable` (all when < 0); it holds them until `cached`. Returns (the real pool's sampled
        hits, the sampled keys a hit may cover, the ghost's sampled prefix hit, whether the ghost is full)."""
        ghost, running = self.lru, self.run
        sampled: Iterator[Hashable] | list[Hashable]
        if isinstance(keys, list) and (flags := self._flags(keys)) is not None:
            real = flags.count(1, 0, max(cached_blocks, 0))
            most = flags.count(1, 0, hittable) if hittable >= 0 else flags.count(1)
            sampled = compress(keys, flags)
            if type(keys[-1]) is bytes:  # vLLM's hashes: `cached` gets this list, grown (the simulator: another list)
                memo = self._memo
                if len(memo) >= MEMO_LIMIT:  # requests observed, never cached (the adapter lost them): the oldest goes
                    del memo[next(iter(memo))]
                memo[id(keys)] = (keys[-1], len(keys), flags)
        else:
            pairs = list(self._sampled(keys))
            real = sum(1 for pos, _ in pairs if pos < cached_blocks)
            most = len(pairs) if hittable < 0 else sum(1 for pos, _ in pairs if pos < hittable)
            sampled = [k for _, k in pairs]
        lru = 0
        prefix = True
        for k in sampled:
            n = running.get(k, 0)
            if n or k in ghost:
                if prefix:
                    lru += 1
                ghost.pop(k, None)
            else:
                prefix = False
            running[k] = n + 1
        room = max(cap - len(running), 1)
        while len(ghost) > room:
            ghost.popitem(last=False)
        return real, most, lru, len(ghost) >= room

    def cached(self, keys: Sequence[Hashable], cap: int) -> None:
        """A request finished: its keys (output blocks included) become evictable, most recent, tail first (vLLM frees
        a request's blocks tail first, so its head is evicted last)."""
        ghost, running = self.lru, self.run
        if isinstance(keys, list) and (flags := self._flags(keys, self._memo.pop(id(keys), None))) is not None:
            sampled = list(compress(keys, flags))
        else:
            sampled = [k for _, k in self._sampled(keys)]
        for k in reversed(sampled):
            n = running.get(k, 0)
            if n > 1:
                running[k] = n - 1
                continue
            running.pop(k, None)
            if k in ghost:
                ghost.move_to_end(k)
            else:
                ghost[k] = None
        room = max(cap - len(running), 1)
        while len(ghost) > room:
            ghost.popitem(last=False)

    def _flags(self, keys: list[Hashable], memo: tuple[Hashable, int, bytes] | None = None) -> bytes | None:
        """One byte per key, 1 where the key is sampled, when `keys` are bytes of one length (vLLM's block hashes):
        their first bytes are sliced out of one join and mapped through a table, all in C. `memo`: (last key, length,
        flags) of an earlier state of the same list, whose flags are reused when the list still holds that key there.
        Dense int keys (the simulator's ids) are looked up in `id_table` when it is set (`kvsched.sim.policies.
        id_table`). None for other keys."""
        table = self.byte_table
        if not keys:
            return None
        if type(keys[0]) is int and self.id_table is not None:
            try:
                if min(keys) >= 0:  # type: ignore[operator, type-var]  # a negative index would wrap around, not fail
                    return bytes(map(self.id_table.__getitem__, keys))  # type: ignore[arg-type]
            except (IndexError, TypeError):  # an id past the table, or not an int: the generic path
                pass
            return None
        if table is None or type(keys[0]) is not bytes:
            return None
        head = b""
        if memo is not None and 0 < memo[1] <= len(keys) and keys[memo[1] - 1] == memo[0]:
            head, keys = memo[2], keys[memo[1]:]
            if not keys:
                return head
        first = keys[0]
        if type(first) is not bytes:  # found by review: the list grew by a key without len() (TypeError), e.g. an int
            return None
        width = len(first)
        if not width or set(map(type, keys)) != {bytes}:  # a key not exactly bytes (a subclass, a bytearray, another
            return None  # type): the generic path, as the compiled ghost samples only exact bytes by their first byte
        # found by review: a check of the total length let widths 2, 1, 3 through, and the slice below then sampled
        # bytes that are not each key's first
        if set(map(len, keys)) != {width}:  # type: ignore[arg-type]
            return None
        return head + b"".join(keys)[::width].translate(table)  # type: ignore[arg-type]

    def _sampled(self, keys: Sequence[Hashable]) -> Iterator[tuple[int, Hashable]]:
        """(position, key) of the sampled keys among `keys`, in order: key by key, by the rule `_flags` applies to
        whole lists (a bytes key by its first byte, when the rate divides 256), as the compiled ghost does."""
        if isinstance(keys, list) and (flags := self._flags(keys)) is not None:
            return compress(enumerate(keys), flags)
        t, table = self.threshold, self.byte_table

        def sampled(k: Hashable) -> bool:
            if table is not None and type(k) is bytes and k:
                return bool(table[k[0]])
            return (hash(k) * MIX) & MASK < t

        return ((pos, k) for pos, k in enumerate(keys) if sampled(k))
