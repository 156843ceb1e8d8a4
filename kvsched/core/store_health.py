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
    epoch: int = 0  # one more at every change of `up`: a call's outcome moves the state only in the epoch it began in
    _delay: float = field(default=0.0)

    def may_try(self) -> bool:
        """True if a call should be made now (the store is up, or a reconnect attempt is due)."""
        return self.up or self.clock() >= self.next_try

    def failed(self, began: int | None = None) -> bool:
        """A call failed. True if the store just went down (log it); the next attempt waits out the backoff, twice
        the last one's for each window of attempts that all failed. `began`: the `epoch` the call began in; a call
        that began before the last change (it hung through an outage and the reconnect) is counted but changes
        nothing."""
        self.failures += 1
        if began is not None and began != self.epoch:
            return False
        if not self.up and self.clock() < self.next_try:
            # down, and another attempt of this one's window failed first and set the next: one doubling a window
            # (found by review70: every call is an attempt once the backoff is out, so under load the attempts made
            # at once against a hung store each doubled it, to the 30 s cap within one window)
            return False
        self._delay = self.base_s if self.up else min(self.max_s, max(self._delay, self.base_s) * 2)
        self.next_try = self.clock() + self._delay
        if self.up:
            self.up = False
            self.outages += 1
            self.epoch += 1
            return True
        return False

    def succeeded(self, began: int | None = None) -> bool:
        """A call worked. True if the store was down until now (log the reconnect). `began` as for `failed`: a call
        answered from before the outage (another thread's call failed while it was on the wire: found by a fresh
        clone's `make test`, a store killed mid-run read as back at once and down again, two outages) says nothing
        about the store now."""
        if self.up or (began is not None and began != self.epoch):
            return False
        self.up = True
        self._delay = 0.0
        self.epoch += 1
        return True

    @property
    def retry_in_s(self) -> float:
        return 0.0 if self.up else max(0.0, self.next_try - self.clock())


@dataclass
class ReadCost:
    """Where the store's reads at a request's arrival run: on the scheduler thread while they are fast (the fetch is
    planned at the arrival, as vLLM's own connectors look up: nothing waits a step), off it once they are slow or this
    step's inline reads have used `step_budget_s` (a slow or hung store must not stall every running request). Every
    read's time, on either thread, moves the average, so a store that is fast again is read inline again."""

    inline_s: float = 0.002  # a moving average above this: off the scheduler thread
    step_budget_s: float = 0.002  # the scheduler thread's time for the store's reads per step
    alpha: float = 0.25
    mean_s: float = 0.0
    spent_s: float = 0.0  # this step's, on the scheduler thread

    def inline(self) -> bool:
        return self.mean_s <= self.inline_s and self.spent_s < self.step_budget_s

    def note(self, seconds: float, inline: bool) -> None:
        self.mean_s += self.alpha * (max(seconds, 0.0) - self.mean_s)
        if inline:
            self.spent_s += seconds

    def new_step(self) -> None:
        self.spent_s = 0.0
