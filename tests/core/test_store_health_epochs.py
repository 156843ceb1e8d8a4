"""A call's outcome moves the store's up/down state only in the epoch it began in (kvsched/core/store_health.py):
calls run on several threads (the scheduler's, the tier's readers), so one that was on the wire when another failed
can come back afterwards. Found by a fresh clone's `make test`: a store killed mid-run was logged back up at once by
such a call, then down again (two outages for one)."""

from __future__ import annotations

from kvsched.core.store_health import StoreHealth


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_success_of_a_call_begun_before_the_outage_does_not_end_it() -> None:
    h = StoreHealth(Clock())
    before = h.epoch  # a call begins (up), another call begins and fails: down
    assert h.failed(h.epoch) is True and not h.up
    assert h.succeeded(before) is False and not h.up and h.outages == 1  # stale: the store is still down
    assert h.succeeded(h.epoch) is True and h.up  # a call begun in the outage (a reconnect attempt) ends it


def test_a_failure_of_a_call_begun_before_the_reconnect_does_not_start_a_new_outage() -> None:
    h = StoreHealth(Clock())
    assert h.failed(h.epoch)
    hung = h.epoch  # a call begun during the outage hangs; a reconnect attempt works meanwhile
    assert h.succeeded(h.epoch) and h.up
    assert h.failed(hung) is False and h.up and h.outages == 1
    assert h.failures == 2  # counted all the same


def test_without_an_epoch_every_outcome_counts_as_before() -> None:
    h = StoreHealth(Clock())
    assert h.failed() is True and h.succeeded() is True and h.failed() is True and h.outages == 2
