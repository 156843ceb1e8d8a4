"""Pins of sessions with a request still running: a turn that finished beside another of its session (a chat client's
title request sent with the turn, an agent's fan-out under one session id) pins its prefix while the other runs on.
Found by review: such a pin was never a victim, for another session's shortage or for its TTL, until the session's
last request finished (on vLLM's scheduler another session's request waited 295 steps; stock vLLM: 0)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.pin_apply import Applied, PinApplier
from kvsched.core.retention import Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from tests.core.test_pin_apply import BS, ListPool

A, B, C, S, T = (SessionKey(SessionId(s)) for s in "abcst")
NO_HINTS = TurnHints()
PRESSURE = ReleaseReason.PRESSURE


def make(clock, exact_limit: int = 10**9, total_blocks: int = 1000, **overrides) -> RetentionPolicy:
    p = RetentionPolicy(replace(RetentionConfig(), **overrides), clock, total_blocks, bytes_per_token=1024.0)
    p.index.exact_limit = exact_limit
    return p


def finish(p, key, tokens=160):
    p.request_arrived(key, NO_HINTS)
    p.turn_started(key, cached_tokens=0)
    return p.turn_finished(key, NO_HINTS, tokens, tokens // 16)


def overlapped(p, key, tokens=320):
    """Two requests of `key` run; the longer finishes first and is pinned while the other runs on."""
    for _ in range(2):
        p.request_arrived(key, NO_HINTS)
    for _ in range(2):
        p.turn_started(key, cached_tokens=0)
    return p.turn_finished(key, NO_HINTS, tokens, tokens // 16)


@pytest.mark.parametrize("exact_limit", [0, 10**9])  # the heap and the exact scan
def test_a_pin_beyond_a_running_request_goes_after_the_idle_ones_and_before_the_queued_ones(clock, exact_limit):
    p = make(clock, exact_limit)
    finish(p, A)  # idle
    assert overlapped(p, S) == [Pin(S)]  # 20 blocks; a request of S still runs
    finish(p, B)
    p.request_arrived(B, NO_HINTS)  # B's next request is queued: it is about to hit B's pin
    finish(p, C)
    p.request_arrived(C, NO_HINTS)
    p.turn_started(C, cached_tokens=160)  # C's running turn hit all its pin: a release would free nothing
    assert p.sessions[S].active_requests == 1 and p.sessions[S].pin_beyond_running
    assert p.release_order() == [A, S, B]
    assert p.release_for_pressure(15) == [Release(A, PRESSURE), Release(S, PRESSURE, 5)]
    assert p.sessions[S].pinned_blocks == 15  # the tail first: the head, which a running request may hold, last
    assert p.release_for_pressure(15, idle_only=True) == []  # a prefetch makes room from idle sessions only
    assert p.release_for_pressure(100) == [Release(S, PRESSURE), Release(B, PRESSURE)]
    assert p.sessions[C].pinned_blocks == 10


@pytest.mark.parametrize("exact_limit", [0, 10**9])
def test_running_sessions_pins_go_lowest_value_first(clock, exact_limit):
    p = make(clock, exact_limit)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(6)]
    for i, key in enumerate(keys):
        overlapped(p, key, tokens=160 + 64 * i)
        clock.advance(float(i))
    now = clock()
    order = p.release_order()
    assert sorted(order, key=str) == sorted(keys, key=str)
    assert [p.score(p.sessions[k], now) for k in order] == sorted(p.score(p.sessions[k], now) for k in keys)


def test_a_turns_start_cuts_the_pin_to_its_hit_and_takes_the_session_out_of_the_order(clock):
    p = make(clock)
    overlapped(p, S)
    p.request_arrived(S, NO_HINTS)
    p.turn_started(S, cached_tokens=320)  # the session's next turn hit all of it: it holds the blocks
    assert not p.sessions[S].pin_beyond_running and p.release_order() == []
    assert p.turn_finished(S, NO_HINTS, 480, 30) == [Pin(S)]  # ends beside the side request: beyond it again
    assert p.sessions[S].pin_beyond_running and p.release_order() == [S]


def test_a_pin_beyond_a_running_request_expires_and_one_its_running_request_hit_waits(clock):
    p = make(clock, default_ttl_s=30.0)
    overlapped(p, S)
    finish(p, C)
    p.request_arrived(C, NO_HINTS)
    p.turn_started(C, cached_tokens=160)
    clock.advance(30.0)
    assert p.expire() == [Release(S, ReleaseReason.TTL)]
    assert p.sessions[C].pinned_blocks == 10  # its request holds the blocks: looked at again a TTL later


def test_another_sessions_shortage_frees_the_part_no_running_request_holds(clock):
    policy = make(clock, total_blocks=20)
    pins: PinApplier[int] = PinApplier(policy, ListPool(20), BS)
    pins.log = []
    pins.pool.allocate([1])  # the side request's block (its prompt's head, shared with the turn): held while it runs
    for _ in range(2):
        policy.request_arrived(S, NO_HINTS)
    for _ in range(2):
        pins.turn_started(S, 0)
    pins.turn_finished(S, NO_HINTS, [list(range(1, 13))], 12 * BS)  # the turn ends first: 12 blocks pinned
    policy.request_arrived(T, NO_HINTS)
    assert pins.pool.num_free() == 8
    assert pins.on_shortage(T, 10 * BS) is True  # lacks 3 (+1): a chunk of 4, the pin's tail
    assert pins.log[-1] == Applied("release", "s", "pressure", 4) and pins.pinned[S] == [list(range(1, 9))]
    assert pins.on_shortage(T, 20 * BS) is True  # the rest: the running request keeps its block
    assert S not in pins.pinned and pins.pool.ref == Counter({1: 1}) and pins.pool.num_free() == 19
    assert pins.on_shortage(T, 20 * BS) is False
