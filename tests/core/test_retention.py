"""Exact decisions of the retention policy, driven by a hand-moved clock."""

from dataclasses import replace

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.scoring import retention_value
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

A, B, C = (SessionKey(SessionId(s)) for s in "abc")
NO_HINTS = TurnHints()


def make(clock, total_blocks=100, **overrides):
    return RetentionPolicy(replace(RetentionConfig(), **overrides), clock, total_blocks, bytes_per_token=1024.0)


def finish(policy, key, tokens, blocks=None, hints=NO_HINTS):
    policy.request_arrived(key, hints)
    policy.turn_started(key, cached_tokens=0)
    return policy.turn_finished(key, hints, tokens, tokens // 16 if blocks is None else blocks)


def test_finished_turn_is_pinned_kept_through_the_next_turn_and_extended(clock):
    p = make(clock)
    assert finish(p, A, 320) == [Pin(A)]
    assert p.pinned_blocks_total == 20
    clock.advance(2.0)
    p.request_arrived(A, NO_HINTS)
    assert p.turn_started(A, cached_tokens=320) == []  # whole pin hit: the request shares its blocks
    assert p.counters["retained_hits"] == 1 and p.counters["retained_hit_tokens"] == 320
    assert p.sessions[A].active_requests == 1 and p.release_order() == []  # in use: never a victim
    assert p.turn_finished(A, NO_HINTS, 480, 30) == [Pin(A)]  # the pin grows to the new prefix
    assert p.pinned_blocks_total == 30
    assert p.sessions[A].expected_gap_s == pytest.approx(2.0)  # first observed gap replaces the prior


def test_the_part_of_a_pin_the_next_turn_does_not_hit_is_released_at_once(clock):
    p = make(clock)
    finish(p, A, 320)
    p.request_arrived(A, NO_HINTS)
    assert p.turn_started(A, cached_tokens=80) == [Release(A, ReleaseReason.TURN, blocks=15)]
    assert p.sessions[A].pinned_blocks == 5
    finish(p, B, 320)
    p.request_arrived(B, NO_HINTS)
    assert p.turn_started(B, cached_tokens=0) == [Release(B, ReleaseReason.TURN)]


def test_ttl_expiry_is_exact_and_hints_are_capped(clock):
    p = make(clock, default_ttl_s=30.0, max_ttl_s=60.0)
    finish(p, A, 160, hints=TurnHints(ttl_s=5.0))
    finish(p, B, 160, hints=TurnHints(ttl_s=3600.0))  # capped to 60
    finish(p, C, 160)  # default 30
    clock.advance(4.999)
    assert p.expire() == []
    clock.advance(0.001)
    assert p.expire() == [Release(A, ReleaseReason.TTL)]
    clock.advance(25.0)
    assert p.expire() == [Release(C, ReleaseReason.TTL)]
    clock.advance(30.0)
    assert p.expire() == [Release(B, ReleaseReason.TTL)]
    assert p.pinned_blocks_total == 0


def test_zero_ttl_hint_means_do_not_retain(clock):
    p = make(clock)
    assert finish(p, A, 160, hints=TurnHints(ttl_s=0.0)) == []


def test_end_releases_and_forgets_the_session(clock):
    p = make(clock)
    finish(p, A, 160)
    assert p.end(A) == [Release(A, ReleaseReason.END)]
    assert A not in p.sessions
    assert p.end(A) == []  # unknown session: nothing to do


def test_end_flag_on_the_last_turn_releases_instead_of_pinning(clock):
    p = make(clock)
    finish(p, A, 160)
    p.request_arrived(A, NO_HINTS)
    p.turn_started(A, 160)
    assert p.turn_finished(A, TurnHints(end=True), 320, 20) == [Release(A, ReleaseReason.END)]
    assert A not in p.sessions and p.pinned_blocks_total == 0


def test_budget_overflow_releases_the_lowest_value_pin(clock):
    p = make(clock, total_blocks=100, pin_budget_fraction=0.5)
    assert finish(p, A, 480) == [Pin(A)]  # 30 blocks
    clock.advance(3.0)  # A is 3 s into its expected 5 s gap: it will be back sooner than B
    assert finish(p, B, 480) == [Pin(B)]
    assert p.release_over_budget(50) == []
    # 60 distinct pinned blocks against a budget of 50: B gives up its last 10 blocks and keeps its head
    assert p.release_over_budget(60) == [Release(B, ReleaseReason.BUDGET, blocks=10)]
    assert p.sessions[A].pinned_blocks == 30 and p.sessions[B].pinned_blocks == 20
    assert p.sessions[B].pinned_tokens == 320 and p.pinned_blocks_total == 50


def test_a_budget_release_goes_down_to_the_low_water_mark_so_the_next_pins_need_no_pass_of_their_own(clock):
    p = make(clock, total_blocks=2560, pin_budget_fraction=0.5)  # budget 1280, low water 1270
    assert (p.budget_blocks, p.budget_low_water_blocks) == (1280, 1270)
    finish(p, A, 600 * 16)
    clock.advance(3.0)
    finish(p, B, 681 * 16)  # 1281 pinned: one over
    assert p.release_over_budget(1280) == []
    assert p.release_over_budget(1281) == [Release(B, ReleaseReason.BUDGET, blocks=11)]
    assert p.pinned_blocks_total == 1270
    # applied at once by the adapter, the releases count the distinct blocks they freed: a pin whose blocks are all
    # shared (freeing none) does not end the pass, the next one goes too
    clock.advance(3.0)
    finish(p, C, 11 * 16)  # 1281 again
    freed = iter([0, 11])
    out = p.release_over_budget(1281, applied=lambda r: next(freed))
    assert out[0] == Release(C, ReleaseReason.BUDGET)  # the lowest value (smallest pin): all of it, freeing nothing
    assert len(out) == 2 and out[1].key != C and out[1].blocks == 11  # so the next pin's tail goes too


def test_prefix_larger_than_the_budget_is_not_pinned(clock):
    p = make(clock, total_blocks=100, pin_budget_fraction=0.1)
    assert finish(p, A, 16 * 11) == []


def test_pressure_order_prefers_big_soon_needed_orchestrators(clock):
    p = make(clock, total_blocks=10_000)
    worker, orch, big = (SessionKey(SessionId(s)) for s in ("worker", "orch", "big"))
    finish(p, worker, 2000, hints=TurnHints(role="worker"))
    finish(p, orch, 2000, hints=TurnHints(role="orchestrator"))
    finish(p, big, 30_000, blocks=1875, hints=TurnHints(role="worker"))
    # the big session comes back every second; the small worker has been idle for a minute
    p.sessions[big].expected_gap_s = 1.0
    p.sessions[worker].last_finished = clock() - 60.0
    assert p.release_order() == [worker, orch, big]
    assert p.release_for_pressure(125) == [Release(worker, ReleaseReason.PRESSURE)]
    assert p.release_for_pressure(100, exclude=[orch]) == [Release(big, ReleaseReason.PRESSURE, 100)]
    assert p.sessions[big].pinned_blocks == 1775
    # one pass releases across victims: all of orch (125), then the tail of big
    assert p.release_for_pressure(200) == [Release(orch, ReleaseReason.PRESSURE), Release(big, ReleaseReason.PRESSURE, 75)]


def test_sessions_with_a_request_in_flight_are_never_victims(clock):
    p = make(clock)
    finish(p, A, 160)
    finish(p, B, 160)
    p.request_arrived(B, NO_HINTS)
    p.sessions[B].active_requests = 1  # e.g. a second request of B running while B's pin is held
    assert p.release_order() == [A]
    assert p.release_for_pressure(100) == [Release(A, ReleaseReason.PRESSURE)]
    assert p.release_for_pressure(100) == []


def test_sessions_whose_next_request_is_queued_are_released_last_latest_arrival_first(clock):
    p = make(clock, total_blocks=1000)
    worker = TurnHints(role="worker")
    for key in (A, B, C):
        finish(p, key, 320, hints=worker)
    p.sessions[C].last_finished = clock() - 120.0  # C has been idle for two minutes: the lowest value of the three
    assert p.release_order()[0] == C
    clock.advance(1.0)
    p.request_arrived(C, worker)  # ...but its next turn has arrived and waits to be scheduled
    clock.advance(0.1)
    p.request_arrived(A, worker)
    assert p.release_order() == [B, A, C]  # idle first; then the queue from its back (A arrived after C)
    assert p.release_for_pressure(30) == [Release(B, ReleaseReason.PRESSURE), Release(A, ReleaseReason.PRESSURE, 10)]
    assert p.counters["released_blocks_pressure_waiting"] == 10  # only A's part was queued KV
    p.request_abandoned(A)  # A's request was aborted before it ran: A is an ordinary idle session again
    assert p.sessions[A].waiting == 0 and p.sessions[A].waiting_since is None
    assert p.release_order() == [A, C]
    p.turn_started(C, cached_tokens=320)  # scheduled: in use, not queued, never a victim
    assert p.sessions[C].waiting == 0 and p.release_order() == [A]


def test_a_queued_session_keeps_its_record_through_end_and_table_trimming(clock):
    p = make(clock, max_sessions=1)
    finish(p, A, 0)  # nothing to pin: an idle, unpinned record, the first the table would drop
    p.request_arrived(A, NO_HINTS)
    finish(p, B, 160)  # the table is over its bound; A's request waits, so A's record stays
    assert A in p.sessions and p.sessions[A].waiting == 1
    p.request_arrived(B, TurnHints(end=True))
    p.end(B)  # ended while its last request is queued: the record stays until that request is done
    assert B in p.sessions and not p.sessions[B].pinned


def test_cache_salt_separates_sessions(clock):
    p = make(clock)
    salted = SessionKey(SessionId("a"), cache_salt="tenant-2")
    finish(p, A, 160)
    finish(p, salted, 320)
    assert p.sessions[A].pinned_blocks == 10 and p.sessions[salted].pinned_blocks == 20
    assert p.end(A) == [Release(A, ReleaseReason.END)]
    assert p.sessions[salted].pinned


def test_expected_gap_is_an_ewma_of_observed_gaps(clock):
    p = make(clock, gap_ewma_alpha=0.5)
    finish(p, A, 160)
    for gap in (2.0, 4.0):
        clock.advance(gap)
        p.request_arrived(A, NO_HINTS)
        p.turn_started(A, 160)
        p.turn_finished(A, NO_HINTS, 160, 10)
    assert p.sessions[A].expected_gap_s == pytest.approx(0.5 * 4.0 + 0.5 * 2.0)


def test_session_table_is_bounded(clock):
    p = make(clock, max_sessions=3)
    keys = [SessionKey(SessionId(f"s{i}")) for i in range(5)]
    for k in keys:
        finish(p, k, 0, blocks=0)  # nothing to pin: records only
    finish(p, A, 160)
    assert len(p.sessions) == 3 and A in p.sessions


def test_config_from_env():
    cfg = RetentionConfig.from_env({"KVSCHED_DEFAULT_TTL_S": "12", "KVSCHED_ROLE_WEIGHTS": "orchestrator:4,critic:2"})
    assert cfg.default_ttl_s == 12.0
    assert cfg.role_weight("orchestrator") == 4.0 and cfg.role_weight("critic") == 2.0 and cfg.role_weight(None) == 1.0
    with pytest.raises(ValueError):
        RetentionConfig(pin_budget_fraction=1.5)
    with pytest.raises(ValueError, match="KVSCHED_MAX_TTL_S='ten'"):
        RetentionConfig.from_env({"KVSCHED_MAX_TTL_S": "ten"})
    assert cfg.as_dict()["role_weights"]["critic"] == 2.0 and cfg.as_dict()["default_ttl_s"] == 12.0


def test_released_blocks_are_counted_per_reason_whole_and_partial(clock):
    p = make(clock, total_blocks=100, pin_budget_fraction=0.5)
    finish(p, A, 480)  # 30 blocks
    clock.advance(3.0)
    finish(p, B, 480)
    p.release_over_budget(60)  # B loses a 10-block tail
    p.release_for_pressure(25, exclude=[A])  # then the rest of B (20 blocks) and nothing of A
    p.end(A)  # A's whole 30-block pin
    c = p.counters
    assert (c["released_blocks_budget"], c["released_budget_partial"], c["released_budget"]) == (10, 1, 0)
    assert (c["released_blocks_pressure"], c["released_pressure"]) == (20, 1)
    assert (c["released_blocks_end"], c["released_end"]) == (30, 1)
    assert p.pinned_blocks_total == 0


def test_the_release_orders_key_is_the_candidates_value(clock):
    """`score` computes `candidate`'s value without building it: the two must agree in every state."""
    p = make(clock, total_blocks=1000)
    for i, (key, role) in enumerate([(A, "worker"), (B, "orchestrator"), (C, None)]):
        finish(p, key, 160 * (i + 1), hints=TurnHints(role=role))
        clock.advance(1.5 * (i + 1))
    finish(p, A, 640)  # a second turn: a gap observed and a hit count
    for dt in (0.0, 2.0, 30.0, 600.0):  # fresh, waiting, overdue, long overdue
        clock.advance(dt)
        for key in (A, B, C):
            rec = p.sessions[key]
            assert p.score(rec, clock()) == pytest.approx(retention_value(p.candidate(rec, clock())), rel=1e-12)


def test_a_score_is_reused_only_at_the_same_time_version_and_gap_epoch(clock):
    """Whether `score` computed the value again is read off the record: a marker no value takes is left in its kept
    score, so a reuse returns the marker (it used to replace `p._value` with a counting wrapper, which a mypyc-compiled
    policy refuses: its methods are read-only)."""
    p = make(clock, max_sessions=1000)
    finish(p, A, 320, hints=TurnHints(role="worker"))
    clock.advance(5.0)
    rec, now = p.sessions[A], clock()
    first = p.score(rec, now)
    marker = -12345.0

    def scored(at: float) -> float:
        rec.scored_value = marker
        return p.score(rec, at)

    assert first != marker and scored(now) == marker  # nothing it depends on moved: reused
    later = scored(now + 1.0)
    assert later not in (marker, first)  # another time: computed again (an idle session's value moves)
    for gap in (200.0, 300.0, 400.0, 500.0):  # other workers' gaps change what the role's idle sessions expect
        other = SessionKey(SessionId(f"w{gap}"))
        finish(p, other, 160, hints=TurnHints(role="worker"))
        clock.advance(gap)
        p.request_arrived(other, TurnHints(role="worker"))
        p.turn_started(other, cached_tokens=0)
    fresh = scored(now + 1.0)
    assert fresh == p._value(rec, now + 1.0, rec.pinned_tokens, p.bytes_per_token) != later and fresh != marker
    p.request_arrived(A, NO_HINTS)  # the session's own event: a new version
    assert scored(now + 1.0) != marker


def test_a_turn_that_finished_at_time_zero_is_idle_from_then(clock):
    """Found by review: `last_finished or now` read a finish at t == 0.0 (a simulator's first instant) as no finish,
    and the session stayed "just finished" in the release order for good."""
    clock.now = 0.0
    p = RetentionPolicy(RetentionConfig(default_ttl_s=600.0), clock, 10_000, 1024.0)
    k = SessionKey(SessionId("a"))
    p.request_arrived(k, TurnHints())
    p.turn_started(k, 0)
    p.turn_finished(k, TurnHints(), 320, 20)
    clock.advance(100.0)
    rec = p.sessions[k]
    assert p.candidate(rec, clock()).idle_s == 100.0 == p.views()[0].idle_s


def test_a_default_ttl_above_the_cap_is_refused_but_the_cap_alone_still_caps_it():
    """Found by review: KVSCHED_DEFAULT_TTL_S=700 served 600 s pins (the cap) without a word."""
    with pytest.raises(ValueError, match="KVSCHED_DEFAULT_TTL_S=700 is above KVSCHED_MAX_TTL_S=600"):
        RetentionConfig.from_env({"KVSCHED_DEFAULT_TTL_S": "700"})
    assert RetentionConfig.from_env({"KVSCHED_DEFAULT_TTL_S": "700", "KVSCHED_MAX_TTL_S": "900"}).ttl_for(None) == 700
    assert RetentionConfig.from_env({"KVSCHED_MAX_TTL_S": "0"}).ttl_for(None) == 0  # record a deployment: no pins


def test_a_hit_on_a_pin_the_tier_restored_whole_is_a_prefetch_hit_not_a_retained_one(clock):
    """Found at stop 55 (the engine's bench replay counted 132 turns on a retained pin, 60 crediting no token): a turn
    whose pin the tier prefetched back whole after its pin expired retained nothing between turns."""
    p = make(clock, default_ttl_s=30.0)
    finish(p, A, 320)
    clock.advance(31.0)
    assert p.expire() == [Release(A, ReleaseReason.TTL)]
    assert p.prefetched(A, 320, 20) == [Pin(A)]  # restored ahead of its next turn
    p.request_arrived(A, NO_HINTS)
    p.turn_started(A, cached_tokens=320)
    assert p.counters["prefetch_hit_tokens"] == 320
    assert p.counters["retained_hits"] == p.counters["retained_hit_tokens"] == 0
    finish(p, B, 320)  # a pin half kept, half restored: a retained hit of the kept half
    assert p.release_blocks(10, ReleaseReason.PRESSURE) == [Release(B, ReleaseReason.PRESSURE, blocks=10)]
    assert p.prefetched(B, 320, 20) == [Pin(B)]
    p.request_arrived(B, NO_HINTS)
    p.turn_started(B, cached_tokens=320)
    assert p.counters["retained_hits"] == 1 and p.counters["retained_hit_tokens"] == 160
    assert p.counters["prefetch_hit_tokens"] == 480
