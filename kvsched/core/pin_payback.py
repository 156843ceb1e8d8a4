"""Do the pins pay? An online comparison of the pool's prefix hits with those a plain LRU pool of the same size would
have had, so the policy can give pins up (the engine then behaves as stock LRU) when they do not pay.

The LRU side is a ghost: block keys only, no KV. It is made cheap by spatial sampling (SHARDS: C. Waldspurger et al.,
"Efficient MRC Construction with SHARDS", FAST'15): only blocks whose mixed key falls in 1/`sampling` of the key space
are tracked, in an LRU of `capacity / sampling` entries, which estimates the full pool's hits on those blocks. The real
pool's hits are counted on the same sampled blocks (a block at position < the request's cached blocks was a hit), so
both sides are estimates over one sample and need no scaling. A hit is a prefix: the ghost counts a sampled block as a
hit only while every earlier sampled block of the prompt hit too.

Both counts decay per observed request (an exponential window of `window` requests). When the pins have been on for a
whole window and the real pool hit fewer than (1 - margin) x the ghost's hits, pins are suspended for `cooldown`
requests, then probed again for a window. With `start` > 0 that switch is off and `kvsched.core.pin_ledger` judges
the pins instead, on their balance over the whole run, which caps new pins' TTL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from itertools import compress

from kvsched.core.pin_ledger import LedgerConfig, PinLedger

MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential ids (the simulator's) over the key space
MASK = (1 << 64) - 1
MIN_GHOST_BLOCKS = 64  # below this a sampled ghost is too small to mirror the pool: sample less
MEMO_LIMIT = 4096  # key lists remembered between `observe` and `cached` (running requests; a list never passed to
# `cached`, e.g. a copy, is forgotten oldest first past it; a forgotten one is only sampled again)


@dataclass(frozen=True, slots=True)
class PaybackConfig:
    """sampling: track 1 block key in `sampling` (0: the tracker is off, pins always on).
    window: requests in the decaying window the hits are compared over (also the length of a probe).
    cooldown: requests pins stay suspended before they are probed again.
    margin: pins are suspended when real hits < (1 - margin) x the ghost LRU's hits.
    start, gain, gain_down, floor, ceiling, deadband: `start` > 0: no switch; the pin ledger (`kvsched.core.pin_ledger.LedgerConfig`)
        caps new pins' TTL instead, at `start` seconds while the balance is even.
    tier_start: the ledger's start once an FP8 tier is attached (0: the ceiling).
    from_start: fed from the first request; False: from `arm`, which the engine and the simulator call when the pool
        first evicts a cached block (until then pins cannot cost a hit, and the ghost would only cost time)."""

    sampling: int = 8
    window: int = 1000
    cooldown: int = 2000
    margin: float = 0.0
    start: float = 0.0
    gain: float = 0.5
    gain_down: float = 4.0
    floor: float = 1.0 / 32
    ceiling: float = 600.0
    deadband: float = 2.0
    tier_start: float = 0.0
    from_start: bool = True

    def __post_init__(self) -> None:
        if (self.sampling < 0 or self.window < 1 or self.cooldown < 0 or not -1.0 < self.margin < 1.0
                or not self.start >= 0 or not self.tier_start >= 0):
            raise ValueError(f"invalid payback settings {self}")
        if self.start:
            self.ledger()  # raises if invalid

    def ledger(self) -> LedgerConfig:
        return LedgerConfig(self.start, self.gain, self.floor, self.ceiling, self.deadband, gain_down=self.gain_down)


class PinPayback:
    """The ghost LRU and the decaying hit counts; `pinning` says whether pins are on now."""

    __slots__ = ("config", "rate", "threshold", "byte_table", "id_table", "total", "capacity", "reserved", "ghost",
                 "running", "decay", "real", "lru", "pinning", "since_switch", "switches", "real_hits", "lru_hits",
                 "ledger", "_memo", "armed", "warm")

    def __init__(self, config: PaybackConfig, total_blocks: int) -> None:
        self.config = config
        rate = min(config.sampling, max(total_blocks // MIN_GHOST_BLOCKS, 1)) if config.sampling else 0
        self.rate = rate
        self.threshold = (1 << 64) // rate if rate else 0  # a mixed key below it is sampled
        # Keys that are bytes (vLLM's block hashes: digests, uniform in every byte) are sampled by their first byte,
        # filtered in C (`_flags`): mixing each key's hash in Python was ~1.5 points of the ghost's ~7% of a scheduler
        # step, and a per-key filter in C still cost ~10 us per turn on ~190-block prompts, whatever the rate.
        limit = 256 // rate if rate and 256 % rate == 0 else 0
        self.byte_table = bytes(int(b < limit) for b in range(256)) if limit else None
        self.id_table: bytes | None = None  # dense int keys (the simulator's ids): key k is sampled iff id_table[k]
        self.total = total_blocks
        self.capacity = max(total_blocks // rate, 1) if rate else 0
        self.reserved = 0  # blocks running requests hold beyond their prompt's (decode, partial): not cacheable now
        self.ghost: OrderedDict[Hashable, None] = OrderedDict()  # evictable blocks, least recently used first
        self.running: dict[Hashable, int] = {}  # sampled blocks running requests hold (not evictable): references
        self.decay = 1.0 - 1.0 / config.window
        self.real = 0.0  # decayed sampled hits of the real pool
        self.lru = 0.0  # decayed sampled hits of the ghost LRU
        self.pinning = True
        self.since_switch = 0  # requests observed since pins were last suspended or resumed
        self.switches = 0
        self.real_hits = self.lru_hits = 0  # sampled hits since the start, undecayed (stats, tests)
        self.ledger = PinLedger(config.ledger()) if rate and config.start else None
        # id of a running request's key list -> (its last key then, its length then, its flags): `cached` gets the
        # same list, grown by the output's blocks, and maps only those (the memo holds the key: no other object has
        # its id meanwhile; vLLM's keys are chained, so an equal key at n - 1 means an equal prefix).
        self._memo: dict[int, tuple[Hashable, int, bytes]] = {}
        self.armed = config.from_start  # fed now (else from `arm`)
        self.warm = config.from_start  # the ghost holds what an LRU pool fed all along would: its hits are judged

    def arm(self) -> None:
        """The pool began to evict cached blocks: from now on the tracker is fed. Its ghost starts empty and is judged
        once it is full: an LRU pool holds the last distinct blocks it was given, so a full ghost holds what one fed
        from the start would (the requests in between count for nothing, on either side)."""
        if not self.armed:
            self.armed = True
            self.warm = False

    def tier_attached(self) -> None:
        """The pool has an FP8 tier: the ledger restarts from `tier_start` (the ceiling by default)."""
        if self.ledger is not None:
            self.ledger.restart(self.config.tier_start or self.config.ceiling)

    def ttl(self, ttl_s: float) -> float:
        """A new pin's TTL: `ttl_s` (hinted or configured), capped by the pin ledger when it is on."""
        return ttl_s if self.ledger is None else self.ledger.ttl(ttl_s)

    def clamp_due(self) -> float | None:
        """A TTL bound for held pins, when the pin ledger's cap has just fallen far enough (`PinLedger.clamp_due`)."""
        return None if self.ledger is None else self.ledger.clamp_due()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def reserve(self, blocks: int) -> None:
        """Running requests took (`blocks` > 0) or gave back (< 0) blocks outside their prompts' full blocks (decode,
        partial blocks): a plain LRU pool of the same size has that many fewer blocks for its cache meanwhile."""
        if self.rate and self.armed:
            self.reserved = max(self.reserved + blocks, 0)

    def _room(self) -> int:
        """Evictable blocks the ghost may keep: the pool less what running requests hold (sampled scale)."""
        return max(self.capacity - len(self.running) - self.reserved // self.rate, 1)

    def cached(self, keys: Iterable[Hashable]) -> None:
        """A request finished: its full blocks `keys` (prefix order, output included) become evictable, most recent,
        tail first (vLLM frees a request's blocks tail first, so its head is evicted last)."""
        if not self.rate or not self.armed:
            return
        ghost, running = self.ghost, self.running
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
        room = self._room()
        while len(ghost) > room:
            ghost.popitem(last=False)

    def observe(self, keys: Iterable[Hashable], cached_blocks: int, hittable: int | None = None) -> bool | None:
        """A request started with prompt blocks `keys` (prefix order) of which the first `cached_blocks` were hits in
        the real pool; it holds them until `cached` is called with them. `hittable`: how many of them a hit may cover
        (vLLM computes a prompt's last token whatever is cached: a block-aligned prompt's last block is never a hit),
        all if None. Updates both sides (and the pin ledger, when on); returns the new `pinning` when it changed."""
        if not self.rate or not self.armed:
            return None
        ghost, running = self.ghost, self.running
        sampled: Iterable[Hashable]
        if isinstance(keys, list) and (flags := self._flags(keys)) is not None:
            real = flags.count(1, 0, max(cached_blocks, 0))
            most = flags.count(1, 0, max(hittable, 0)) if hittable is not None else len(flags)
            sampled = compress(keys, flags)
            if type(keys[-1]) is bytes:  # vLLM's hashes: `cached` gets this list, grown (the simulator: another list)
                memo = self._memo
                if len(memo) >= MEMO_LIMIT:  # requests observed, never cached (the adapter lost them): the oldest goes
                    del memo[next(iter(memo))]
                memo[id(keys)] = (keys[-1], len(keys), flags)
        else:
            pairs = list(self._sampled(keys))
            real = sum(1 for pos, _ in pairs if pos < cached_blocks)
            most = len(pairs) if hittable is None else sum(1 for pos, _ in pairs if pos < hittable)
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
        room = self._room()
        while len(ghost) > room:
            ghost.popitem(last=False)
        if not self.warm:
            if len(ghost) < room:
                return None
            self.warm = True
        lru = min(lru, most)  # the ghost's prefix hit, as vLLM would have taken it
        self.real_hits += real
        self.lru_hits += lru
        d = self.decay
        self.real = self.real * d + real
        self.lru = self.lru * d + lru
        self.since_switch += 1
        if self.ledger is not None:
            self.ledger.observe(real, lru)
            return None
        return self._judge()

    def _flags(self, keys: list[Hashable], memo: tuple[Hashable, int, bytes] | None = None) -> bytes | None:
        """One byte per key, 1 where the key is sampled, when `keys` are bytes of one length (vLLM's block hashes):
        their first bytes are sliced out of one join and mapped through a table, all in C (a few us for ~190 keys,
        against ~10 us for a per-key filter). `memo`: (last key, length, flags) of an earlier state of the same list,
        whose flags are reused when the list still holds that key there. Dense int keys (the simulator's ids) are looked
        up in `id_table` when it is set (`kvsched.sim.policies.id_table`; the generic path's per-key filter cost more
        than the ghost's own work there). None for other keys."""
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
        width = len(keys[0])  # type: ignore[arg-type]
        try:
            joined = b"".join(keys)  # type: ignore[arg-type]
        except TypeError:  # a key that is not bytes-like: the generic path
            return None
        if not width or len(joined) != width * len(keys):
            return None
        return head + joined[::width].translate(table)

    def _sampled(self, keys: Iterable[Hashable]) -> Iterator[tuple[int, Hashable]]:
        """(position, key) of the sampled keys among `keys`, in order."""
        if isinstance(keys, list) and (flags := self._flags(keys)) is not None:
            return compress(enumerate(keys), flags)
        t = self.threshold
        return ((pos, k) for pos, k in enumerate(keys) if (hash(k) * MIX) & MASK < t)

    def _judge(self) -> bool | None:
        c = self.config
        if self.pinning:
            if self.since_switch >= c.window and self.real < (1.0 - c.margin) * self.lru:
                return self._switch(False)
        elif self.since_switch >= c.cooldown:
            return self._switch(True)
        return None

    def _switch(self, pinning: bool) -> bool:
        self.pinning = pinning
        self.since_switch = 0
        self.switches += 1
        return pinning
