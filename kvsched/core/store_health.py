"""Whether an external store (kvsched's shared level) may be tried now: up, or down and waiting out a backoff.

A store that is down must cost requests nothing: every call is skipped until the next reconnect attempt is due
(exponential backoff, capped), and the adapter serves from its own levels or recomputes. The transitions are
reported once each (`failed` returns True only when the store goes down, `succeeded` only when it comes back), so the
engine logs an outage once, not once per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StoreHealth:
    """`base_s` first retry delay, doubled per failed attempt up to `max_s`."""

    clock: Callable[[], float] = time.monotonic
    base_s: float = 0.5
    max_s: float = 30.0
    up: bool = True
    outages: int = 0
    failures: int = 0
    next_try: float = 0.0
    _delay: float = field(default=0.0)

    def may_try(self) -> bool:
        """True if a call should be made now (the store is up, or a reconnect attempt is due)."""
        return self.up or self.clock() >= self.next_try

    def failed(self) -> bool:
        """A call failed. True if the store just went down (log it); the next attempt waits out the backoff."""
        self.failures += 1
        self._delay = self.base_s if self.up else min(self.max_s, max(self._delay, self.base_s) * 2)
        self.next_try = self.clock() + self._delay
        if self.up:
            self.up = False
            self.outages += 1
            return True
        return False

    def succeeded(self) -> bool:
        """A call worked. True if the store was down until now (log the reconnect)."""
        if self.up:
            return False
        self.up = True
        self._delay = 0.0
        return True

    @property
    def retry_in_s(self) -> float:
        return 0.0 if self.up else max(0.0, self.next_try - self.clock())
