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

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kvsched.core.ghost_lru import LruGhost
from kvsched.core.pin_ledger import LedgerConfig, PinLedger

MIN_GHOST_BLOCKS = 64  # below this a sampled ghost is too small to mirror the pool: sample less


class Ghost(Protocol):
    """`kvsched.core.ghost_lru.LruGhost`'s interface, which the compiled ghost (`kvsched.ops.ghost`) has too."""

    def observe(self, keys: list[Hashable], cached_blocks: int, hittable: int, cap: int
                ) -> tuple[int, int, int, bool]: ...

    def cached(self, keys: list[Hashable], cap: int) -> None: ...

    def __len__(self) -> int: ...

    def held(self) -> int: ...


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

    __slots__ = ("config", "rate", "total", "capacity", "reserved", "ghost", "decay", "real", "lru", "pinning",
                 "since_switch", "switches", "real_hits", "lru_hits", "ledger", "armed", "warm")

    def __init__(self, config: PaybackConfig, total_blocks: int) -> None:
        self.config = config
        rate = min(config.sampling, max(total_blocks // MIN_GHOST_BLOCKS, 1)) if config.sampling else 0
        self.rate = rate
        self.total = total_blocks
        self.capacity = max(total_blocks // rate, 1) if rate else 0
        self.reserved = 0  # blocks running requests hold beyond their prompt's (decode, partial): not cacheable now
        self.ghost: Ghost = LruGhost(rate or 1)  # the reference; `use_ghost` swaps in the compiled one
        self.decay = 1.0 - 1.0 / config.window
        self.real = 0.0  # decayed sampled hits of the real pool
        self.lru = 0.0  # decayed sampled hits of the ghost LRU
        self.pinning = True
        self.since_switch = 0  # requests observed since pins were last suspended or resumed
        self.switches = 0
        self.real_hits = self.lru_hits = 0  # sampled hits since the start, undecayed (stats, tests)
        self.ledger = PinLedger(config.ledger()) if rate and config.start else None
        self.armed = config.from_start  # fed now (else from `arm`)
        self.warm = config.from_start  # the ghost holds what an LRU pool fed all along would: its hits are judged

    def use_ghost(self, ghost: Ghost) -> None:
        """Track with `ghost` (built for this tracker's `rate`: `kvsched.ops.ghost.new_ghost`) from now on; only
        before the tracker was fed, so that no request is counted by one ghost and given back to another."""
        if len(self.ghost) or self.ghost.held():
            raise RuntimeError("the payback tracker's ghost can only be replaced before it is fed")
        self.ghost = ghost

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

    def _cap(self) -> int:
        """The ghost's sampled pool: the pool less what running requests hold beyond their prompts."""
        return self.capacity - self.reserved // self.rate

    def cached(self, keys: Iterable[Hashable]) -> None:
        """A request finished: its full blocks `keys` (prefix order, output included) become evictable, most recent,
        tail first (vLLM frees a request's blocks tail first, so its head is evicted last)."""
        if self.rate and self.armed:
            self.ghost.cached(keys if isinstance(keys, list) else list(keys), self._cap())

    def observe(self, keys: Iterable[Hashable], cached_blocks: int, hittable: int | None = None) -> bool | None:
        """A request started with prompt blocks `keys` (prefix order) of which the first `cached_blocks` were hits in
        the real pool; it holds them until `cached` is called with them. `hittable`: how many of them a hit may cover
        (vLLM computes a prompt's last token whatever is cached: a block-aligned prompt's last block is never a hit),
        all if None. Updates both sides (and the pin ledger, when on); returns the new `pinning` when it changed."""
        if not self.rate or not self.armed:
            return None
        real, most, lru, full = self.ghost.observe(keys if isinstance(keys, list) else list(keys), cached_blocks,
                                                   -1 if hittable is None else max(hittable, 0), self._cap())
        if not self.warm:
            if not full:
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
