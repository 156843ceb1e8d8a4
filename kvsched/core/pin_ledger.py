"""Do the pins pay over the whole run? The pins' cumulative hit balance against a ghost LRU pool, and the TTL cap it sets.

Per observed request the payback tracker (`kvsched.core.pin_payback`) knows the real pool's sampled prefix hits r and
those a ghost LRU pool of the same size had, g. The rule to hold is "never more prefill than stock LRU" over the run,
so the ledger keeps the run's balance C = sum(r - g) (sampled blocks; > 0: the pins have earned hits) and its
evidence z = C / sqrt(V + 1), V = sum((r - g)^2) (a balance of a few noisy requests is not evidence either way).

The control is continuous, not an on/off switch (a switch's own divergence is as large as the pins' whole effect on
some traces, BENCHMARKS.md "Online fallback to LRU"): every new pin's TTL is capped at

    cap = start x exp(gain x (z - deadband)) when z > deadband, start x exp(gain_down x (z + deadband)) when
          z < -deadband, start in between; at most `ceiling`, and 0 (no pins: stock LRU) below floor x start

so pins start at `start` seconds whatever the configured TTL (a longer TTL is a bet the ledger must see paying first:
on Mooncake's traces 600 s pins cost up to 11.6% more prefill than LRU while 30 s pins were within 0.05% of it), grow
towards the configured TTL while they earn, and shrink to none, fast, while they lose. Fast, because what pins cost
is not monotone in their TTL: on adversarial traces (tools/adversarial) pins of a few seconds cost more than both 30 s
pins and none (bursts that outlive a short pin but not its cost; a huge session a 2 s pin still crowds out), so a
slow shrink (the gain up, 0.5) spent the run there: up to 1.086x LRU's prefill, against 1.036x with 2 and the cut-off.
Comparing windows instead suspended pins that lose hits in the short run and pay them back later (the generated
fleet); the cumulative balance keeps what they paid back. The cap is a function of (C, V) alone: no state to wind up.
The dead band keeps pins as configured while the balance is within noise: there the pins' whole effect is smaller
than what acting on noise costs (a cap cut on an early dip loses the pins' later gain).

With the FP8 tier the adapter restarts the cap from another start (`restart`; by default the ceiling: pins as
configured until the balance says they lose): a released or expired pin's blocks go to the tier and come back from it,
the pool with its tier computes 0.65-0.95x LRU's prefill on Mooncake's traces, and a 30 s start only moved those
results by noise either way (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """start: TTL cap in seconds while the balance is even (no evidence either way).
    gain: how far one unit of evidence z moves the log of the cap up (pins earning).
    gain_down: the same, down (pins losing).
    floor: the smallest cap as a fraction of `start`: below it the cap is 0 (no pins).
    ceiling: the largest cap in seconds (the policy's max TTL: a hint never exceeds it anyway).
    deadband: |z| the cap ignores (evidence within it is taken for noise)."""

    start: float = 30.0
    gain: float = 0.5
    floor: float = 1.0 / 32
    ceiling: float = 600.0
    deadband: float = 2.0
    gain_down: float = 2.0

    def __post_init__(self) -> None:
        ok = (math.isfinite(self.start) and self.start > 0 and math.isfinite(self.gain) and self.gain > 0
              and math.isfinite(self.gain_down) and self.gain_down > 0
              and 0.0 <= self.floor <= 1.0 and math.isfinite(self.ceiling) and self.ceiling >= 0
              and math.isfinite(self.deadband) and self.deadband >= 0)
        if not ok:
            raise ValueError(f"invalid pin ledger settings {self}")


class PinLedger:
    """The run's hit balance against the ghost LRU and the TTL cap it sets."""

    __slots__ = ("config", "balance", "variance", "requests", "start", "_cap", "_lo", "_hi")

    def __init__(self, config: LedgerConfig) -> None:
        self.config = config
        self.balance = 0  # C: sampled hits, real pool - ghost LRU, since the start
        self.variance = 0  # V: the sum of the squared per-request differences
        self.requests = 0
        self.start = config.start  # the cap while the balance is even
        self._lo = config.floor * config.start
        self._hi = max(config.ceiling, self._lo)
        self._cap = min(max(config.start, self._lo), self._hi)

    def restart(self, start: float) -> None:
        """Take `start` seconds as the cap while the balance is even from now on (the floor stays the configured
        start's fraction)."""
        self.start = start
        self._update()

    def observe(self, real: int, lru: int) -> None:
        """A request started with `real` sampled hits in the pool and `lru` in the ghost LRU."""
        self.requests += 1
        d = real - lru
        if d:
            self.balance += d
            self.variance += d * d
            self._update()

    def _update(self) -> None:
        z = self.evidence
        c = self.config
        if z < -c.deadband:  # losing: shrink fast, and below the floor no pins at all
            cap = self.start * math.exp(max(c.gain_down * (z + c.deadband), -700.0))
            self._cap = min(cap, self._hi) if cap >= self._lo else 0.0
            return
        z = z - c.deadband if z > c.deadband else 0.0
        self._cap = min(max(self.start * math.exp(min(c.gain * z, 700.0)), self._lo), self._hi)

    @property
    def evidence(self) -> float:
        """z: the balance in units of its own noise (> 0: the pins have earned hits over LRU's)."""
        return self.balance / math.sqrt(self.variance + 1)

    @property
    def cap(self) -> float:
        """The TTL, seconds, no new pin may exceed now."""
        return self._cap

    def ttl(self, ttl_s: float) -> float:
        """A new pin's TTL: the hinted or configured `ttl_s`, capped."""
        return min(ttl_s, self._cap)
