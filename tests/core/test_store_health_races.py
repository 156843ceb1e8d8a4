"""StoreHealth's epochs under the races review70 was asked about (kvsched/core/store_health.py): a call begun before an
outage and answered after the store came back, two outages back to back, outcomes racing in one epoch, and the
counters. And one race it found: the reconnect attempts made at once while the store is down (every call is one, once
the backoff is out, until the first fails) each doubled the backoff, so a store that hung through one attempt window
under load was retried only after 30 s (the cap), not after twice the last delay."""

from __future__ import annotations

from kvsched.core.store_health import StoreHealth


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_call_begun_before_an_outage_and_answered_after_the_store_came_back_changes_nothing() -> None:
    clock = Clock()
    h = StoreHealth(clock)
    old = h.epoch  # on the wire through all that follows
    assert h.failed(h.epoch) and not h.up  # another call: down
    clock.t = 0.5
    assert h.may_try() and h.succeeded(h.epoch) and h.up  # a reconnect attempt: up
    assert h.failed(old) is False and h.up  # the old call's failure: counted only
    assert h.succeeded(old) is False and h.up and h.outages == 1 and h.failures == 2


def test_two_outages_back_to_back_are_two_each_with_a_fresh_backoff() -> None:
    clock = Clock()
    h = StoreHealth(clock)
    assert h.failed(h.epoch) and h.retry_in_s == 0.5
    clock.t = 0.5
    assert h.failed(h.epoch) is False and h.retry_in_s == 1.0  # an attempt that failed: twice the delay
    clock.t = 1.5
    assert h.succeeded(h.epoch) and h.up
    during_second = h.epoch
    assert h.failed(h.epoch) and not h.up and h.outages == 2 and h.retry_in_s == 0.5  # the first delay again
    assert h.succeeded(during_second) is False and not h.up  # begun while up: it says nothing now
    clock.t = 2.0
    assert h.succeeded(h.epoch) and h.up and h.outages == 2 and h.epoch == 4


def test_outcomes_racing_in_one_epoch() -> None:
    clock = Clock()
    h = StoreHealth(clock)
    e = h.epoch  # up: a success then a failure (down), or a failure (down) then the success (stale): down either way
    assert h.succeeded(e) is False and h.failed(e) is True and not h.up
    h2 = StoreHealth(Clock())
    assert h2.failed(e) is True and h2.succeeded(e) is False and not h2.up
    clock.t = 0.5  # down: two reconnect attempts at once, one fails first, then one works: up
    d = h.epoch
    assert h.failed(d) is False and h.succeeded(d) is True and h.up and h.outages == 1


def test_attempts_made_at_once_double_the_backoff_once() -> None:
    clock = Clock()
    h = StoreHealth(clock)
    assert h.failed(h.epoch) and h.retry_in_s == 0.5
    clock.t = 0.5
    window = h.epoch  # the backoff is out: three calls go to the hung store before the first of them times out
    clock.t = 1.0
    for _ in range(3):
        h.failed(window)
    assert h.retry_in_s == 1.0, h.retry_in_s  # was 4.0 (0.5 doubled thrice)
    assert h.failures == 4 and h.outages == 1
    clock.t = 2.0  # the next window's attempt fails alone: doubled again
    assert h.may_try() and h.failed(h.epoch) is False and h.retry_in_s == 2.0
