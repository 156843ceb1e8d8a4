"""RedisStore's guard with calls on two threads (the engine's scheduler thread and the tier's readers use one store):
a call answered after another thread's call found the store gone must not log it back (found by a fresh clone's
`make test`: test_tier_levels' killed store was 'reachable again after 0.0 s', then unreachable again, two outages).
The calls are stand-in functions through the real guard; no server is contacted."""

from __future__ import annotations

import threading

import pytest

redis = pytest.importorskip("redis")

from kvsched.adapters.store.redis_store import RedisStore  # noqa: E402


def test_a_call_answered_from_before_the_outage_does_not_end_it() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    on_the_wire, answer = threading.Event(), threading.Event()

    def slow_ok() -> bool:
        on_the_wire.set()
        answer.wait(10)
        return True

    def reset() -> bool:
        raise redis.ConnectionError("Connection reset by peer")

    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(store._call(slow_ok, False)))
    t.start()
    assert on_the_wire.wait(10)
    assert store._call(reset, False) is False and not store.up
    answer.set()
    t.join(10)
    assert got == [True]  # its answer is used ...
    assert not store.up and store.health.outages == 1  # ... but the store is still down: one outage, not ended
    assert store.counters["calls"] == 1 and store.counters["failed_calls"] == 1
