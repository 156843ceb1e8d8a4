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
slow shrink (the gain up, 0.5) spent the run there: up to 1.086x LRU's prefill, against 1.036x with 2 and the cut-off;
with the probes below a cut is no longer final, and 4 took the worst case to 1.025x (6: 1.026x).
Comparing windows instead suspended pins that lose hits in the short run and pay them back later (the generated
fleet); the cumulative balance keeps what they paid back. The dead band keeps pins as configured while the balance
is within noise: there the pins' whole effect is smaller than what acting on noise costs.

Three rules around the cut (cap 0), measured on the adversarial grid (BENCHMARKS.md):
- a fallen cap bounds the pins already held too (`clamp_due`): pins made while pins paid kept costing after the cut;
- once cut, pins stay off until the balance is back within the dead band (not just above the cut), so the cap does
  not flicker between 0 and a second, each flicker a few more losing pins;
- with no pins the pool is LRU's and the balance stops moving, so a cut on an early loss would never learn that pins
  pay later: after a cool-down (MIN_COOLDOWN observed requests, doubling after each cut) pins are probed at `start`
  for PROBE_REQUESTS requests, whose hits count in the balance like any others.

With the FP8 tier the adapter restarts the cap from another start (`restart`; by default the ceiling: pins as
configured until the balance says they lose): a released or expired pin's blocks go to the tier and come back from it,
the pool with its tier computes 0.65-0.95x LRU's prefill on Mooncake's traces, and a 30 s start only moved those
results by noise either way (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_COOLDOWN = 200  # observed requests before pins are first tried again after a cut
PROBE_REQUESTS = 100  # observed requests a probe keeps pins on


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
    gain_down: float = 4.0

    def __post_init__(self) -> None:
        ok = (math.isfinite(self.start) and self.start > 0 and math.isfinite(self.gain) and self.gain > 0
              and math.isfinite(self.gain_down) and self.gain_down > 0
              and 0.0 <= self.floor <= 1.0 and math.isfinite(self.ceiling) and self.ceiling >= 0
              and math.isfinite(self.deadband) and self.deadband >= 0)
        if not ok:
            raise ValueError(f"invalid pin ledger settings {self}")


class PinLedger:
    """The run's hit balance against the ghost LRU and the TTL cap it sets."""

    __slots__ = ("config", "balance", "variance", "requests", "start", "_cap", "_lo", "_hi", "_clamped",
                 "probes", "_failures", "_probe_until", "_resume_at")

    def __init__(self, config: LedgerConfig) -> None:
        self.config = config
        self.balance = 0  # C: sampled hits, real pool - ghost LRU, since the start
        self.variance = 0  # V: the sum of the squared per-request differences
        self.requests = 0
        self.start = config.start  # the cap while the balance is even
        self._lo = config.floor * config.start
        self._hi = max(config.ceiling, self._lo)
        self._cap = min(max(config.start, self._lo), self._hi)
        self._clamped = self._cap  # the cap held pins were last bounded by (`clamp_due`)
        self.probes = 0  # trials of pins after a cut (`_probe`)
        self._failures = 0  # cuts since pins last earned (z above the dead band): each doubles the next cool-down
        self._probe_until = 0  # requests until which a probe holds the cap at `start`
        self._resume_at = -1  # requests at which pins are tried again, while the cap is 0

    def restart(self, start: float) -> None:
        """Take `start` seconds as the cap while the balance is even from now on (the floor stays the configured
        start's fraction)."""
        self.start = start
        self._update()

    def observe(self, real: int, lru: int) -> None:
        """A request started with `real` sampled hits in the pool and `lru` in the ghost LRU."""
        self.requests += 1
        if self._resume_at >= 0 and self.requests >= self._resume_at:
            self._probe()
        elif self._probe_until and self.requests >= self._probe_until:
            self._probe_until = 0
            self._update()
        d = real - lru
        if d:
            self.balance += d
            self.variance += d * d
            self._update()

    def _probe(self) -> None:
        """Pins again for PROBE_REQUESTS requests after a cut, whatever the balance, which they add to: with no pins
        the pool is LRU's and the balance stops moving, so a cut on an early loss would never learn that pins pay
        later (g_liar_orchestrator at 1.1x: 0.71x LRU's prefill while pins made before the cut ran on, 1.005x when
        they were released with it). A probe costs at most its requests' worth of pins; the cool-downs between
        probes double while pins keep losing, so the probes' cost grows as log(requests)."""
        self.probes += 1
        self._resume_at = -1
        self._probe_until = self.requests + PROBE_REQUESTS
        self._cap = min(max(self.start, self._lo), self._hi)

    def _update(self) -> None:
        if self._probe_until:
            return
        z = self.evidence
        c = self.config
        if z < -c.deadband:  # losing: shrink fast, and below the floor no pins at all
            if self._resume_at >= 0:  # cut: pins come back with a probe, or once the balance is back within noise
                return
            cap = self.start * math.exp(max(c.gain_down * (z + c.deadband), -700.0))
            if cap < self._lo and self._cap > 0:  # the cut: pins are tried again after a cool-down
                self._resume_at = self.requests + MIN_COOLDOWN * (1 << min(self._failures, 30))
                self._failures += 1
            self._cap = min(cap, self._hi) if cap >= self._lo else 0.0
            return
        self._resume_at = -1
        if z > c.deadband:
            self._failures = 0
        z = z - c.deadband if z > c.deadband else 0.0
        self._cap = min(max(self.start * math.exp(min(c.gain * z, 700.0)), self._lo), self._hi)

    def clamp_due(self) -> float | None:
        """The cap, when it has fallen to half the cap held pins were last bounded by, or to 0: pins already held
        take it as their TTL's bound too. A pin made while pins paid keeps costing hits once they no longer do (on
        a_burst_liar_big at 1.5x, 4/5 of the balance was lost after the cut, to pins made before it). None otherwise
        (and a risen cap is only noted: a held pin's TTL never grows)."""
        cap = self._cap
        if cap >= self._clamped:
            self._clamped = cap
            return None
        if cap > 0.5 * self._clamped:
            return None
        self._clamped = cap
        return cap

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
