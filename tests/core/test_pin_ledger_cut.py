"""The pin ledger around its cut (cap 0, no pins): held pins bounded by a fallen cap, no flicker at the cut, and the
probes that let pins come back when they pay again."""

from __future__ import annotations

from kvsched.core.config import RetentionConfig
from kvsched.core.pin_ledger import MIN_COOLDOWN, PROBE_REQUESTS, LedgerConfig, PinLedger
from kvsched.core.retention import ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from tests.conftest import FakeClock
from tests.core.test_pin_ledger import one_pinned_session


def ledger(start: float = 30.0, deadband: float = 2.0) -> PinLedger:
    return PinLedger(LedgerConfig(start, 0.5, 1 / 32, 600.0, deadband, gain_down=2.0))


def cut(led: PinLedger) -> int:
    """Losses until the cap is 0; returns the requests observed then."""
    while led.cap > 0:
        led.observe(0, 3)
        assert led.requests < 1000
    return led.requests


def test_the_cap_is_due_as_held_pins_bound_when_it_halves_or_reaches_zero() -> None:
    led = ledger()
    assert led.clamp_due() is None  # at its start
    caps, due = [], []
    while led.cap > 0:
        led.observe(0, 1)
        caps.append(led.cap)
        due.append(led.clamp_due())
    bounds = [d for d in due if d is not None]
    assert bounds[-1] == 0.0 and len(bounds) >= 3
    assert all(b <= 0.5 * a for a, b in zip([30.0, *bounds], bounds, strict=False))  # each at most half the last
    assert led.clamp_due() is None  # nothing new since


def test_a_risen_cap_is_noted_and_later_falls_count_from_it() -> None:
    led = ledger(deadband=0.0)
    for _ in range(20):
        led.observe(1, 0)
    risen = led.cap
    assert risen > 60.0 and led.clamp_due() is None  # a held pin's TTL never grows
    before = risen
    while (bound := led.clamp_due()) is None:
        before = led.cap
        led.observe(0, 1)
        assert led.requests < 1000
    assert bound <= 0.5 * risen < before  # due at the first cap below half the risen one


def test_a_fallen_cap_releases_pins_made_before_it() -> None:
    """Pins made while the cap was 30 s stayed held to their TTL after the cut: on a_burst_liar_big at 1.5x, 4/5 of
    the pins' loss came after the cut, from them."""
    pol, clock, a = one_pinned_session(30.0, 30.0)
    assert pol.sessions[a].ttl_s == 30.0
    clock.now = 1.0
    assert pol.expire() == []
    keys = [100, 101, 102]
    released = []
    while pol.payback.ttl(30.0) > 0:  # the ghost LRU hits these, the pool never: pins lose
        pol.payback.cached(keys)
        released += pol.prompt_seen(keys, 0)
    assert pol.counters["payback_clamped_pins"] >= 1  # once per fall: at halvings of the cap, then at 0
    # released by the turn's start itself (the engine and the simulator apply it at the same point), not at 30 s
    assert [(d.key, d.reason) for d in released] == [(a, ReleaseReason.TTL)]
    assert pol.expire() == []


def test_the_expiry_queue_bounds_only_longer_pinned_ttls() -> None:
    clock = FakeClock(0.0)
    pol = RetentionPolicy(RetentionConfig(default_ttl_s=30.0), clock=clock, total_blocks=64, bytes_per_token=1.0)
    keys = [SessionKey(SessionId(s)) for s in "abc"]
    for k, ttl in zip(keys, (30.0, 2.0, 30.0), strict=True):
        pol.turn_started(k, 0)
        pol.turn_finished(k, TurnHints(ttl_s=ttl), tokens=16, blocks=1)
    pol.end(keys[2])  # not pinned any more
    queue = pol.expiry
    assert queue.clamp(pol.sessions, 5.0) == 1
    assert pol.sessions[keys[0]].ttl_s == 5.0 and pol.sessions[keys[1]].ttl_s == 2.0
    assert queue.due(pol.sessions, 4.9) == [pol.sessions[keys[1]]]
    assert queue.due(pol.sessions, 5.0) == [pol.sessions[keys[0]]]


def test_once_cut_pins_stay_off_until_the_balance_is_back_within_noise() -> None:
    led = ledger()
    cut(led)
    led.observe(3, 0)  # back above the cut's line (z < -3.73 there), still below the dead band
    assert -3.73 < led.evidence < -2.0
    assert led.cap == 0.0  # no flicker: a second of pins now is more losing pins
    while led.evidence < -2.0:
        led.observe(3, 0)
        assert led.requests < 1000
    assert led.cap == 30.0


def test_after_a_cut_pins_are_probed_and_the_pauses_double_while_they_lose() -> None:
    led = ledger()
    at = cut(led)
    starts = []
    for _ in range(MIN_COOLDOWN * 8):
        before = led.probes
        led.observe(0, 3 if led.cap > 0 else 0)  # pins lose whenever they are on; with none the pool is LRU's
        if led.probes > before:
            starts.append(led.requests)
            assert led.cap == 30.0  # a probe pins at the start TTL
    assert starts[0] == at + MIN_COOLDOWN
    assert starts[1] == starts[0] + PROBE_REQUESTS + 2 * MIN_COOLDOWN
    assert starts[2] == starts[1] + PROBE_REQUESTS + 4 * MIN_COOLDOWN
    assert led.probes == len(starts) == 3


def test_a_probe_that_pays_brings_pins_back() -> None:
    led = ledger()
    at = cut(led)
    for _ in range(MIN_COOLDOWN):
        led.observe(0, 0)
    assert led.probes == 1 and led.requests == at + MIN_COOLDOWN
    for _ in range(PROBE_REQUESTS + 50):
        led.observe(4, 0)  # pins pay now
    assert led.cap > 30.0 and led.evidence > 2.0
