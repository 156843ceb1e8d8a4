"""TTL expiry with one expiry-heap entry per session (not one per finished turn)."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints

from ..conftest import FakeClock

A, B = SessionKey(SessionId("a")), SessionKey(SessionId("b"))


def make(clock, **overrides):
    return RetentionPolicy(replace(RetentionConfig(), **overrides), clock, 1000, bytes_per_token=1024.0)


def finish(policy, key, hints=TurnHints()):
    policy.request_arrived(key, hints)
    policy.turn_started(key, cached_tokens=0)
    return policy.turn_finished(key, hints, 160, 10)


def test_many_turns_keep_one_heap_entry_and_expire_a_ttl_after_the_last(clock):
    p = make(clock, default_ttl_s=30.0)
    for _ in range(100):
        finish(p, A)
        clock.advance(1.0)
        assert p.expire() == []
    assert len(p.expiry.heap) == 1  # the first turn's entry: re-queued when it comes due, not pushed per turn
    clock.advance(28.999)  # the last turn finished 29.999 s ago
    assert p.expire() == []
    assert len(p.expiry.heap) == 1
    clock.advance(0.001)
    assert p.expire() == [Release(A, ReleaseReason.TTL)]
    assert p.expiry.heap == []


def test_a_shorter_ttl_hint_on_a_later_turn_expires_at_the_earlier_time(clock):
    p = make(clock, default_ttl_s=30.0)
    finish(p, A)
    clock.advance(1.0)
    finish(p, A, TurnHints(ttl_s=5.0))
    finish(p, B)
    clock.advance(4.999)
    assert p.expire() == []
    clock.advance(0.001)
    assert p.expire() == [Release(A, ReleaseReason.TTL)]
    clock.advance(30.0)  # A's first entry (t=30) finds nothing pinned; B goes at t=30 (clock 1000 + 30)
    assert p.expire() == [Release(B, ReleaseReason.TTL)]
    assert p.expiry.heap == []


def test_a_pin_released_early_and_pinned_again_expires_exactly(clock):
    p = make(clock, default_ttl_s=10.0)
    finish(p, A)
    p.request_arrived(A, TurnHints())
    assert p.turn_started(A, cached_tokens=0) == [Release(A, ReleaseReason.TURN)]
    clock.advance(8.0)
    p.turn_finished(A, TurnHints(), 160, 10)  # pinned again, expires at +18
    clock.advance(2.0)
    assert p.expire() == []  # the first turn's entry came due: requeued for the new expiry
    clock.advance(7.999)
    assert p.expire() == []
    clock.advance(0.001)
    assert p.expire() == [Release(A, ReleaseReason.TTL)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([None, 0.5, 2.0, 5.0, 20.0]),
                          st.sampled_from([0.0, 0.3, 1.0, 4.0, 10.0])), max_size=60))
def test_expire_releases_exactly_the_pins_past_their_expiry(events):
    """Against the definition: each expire() releases every pinned session with last finish + TTL <= now."""
    clock = FakeClock()
    p = make(clock, default_ttl_s=3.0)
    for n, (sid, ttl, advance) in enumerate(events, start=1):
        key = SessionKey(SessionId(sid))
        finish(p, key, TurnHints(ttl_s=ttl))
        clock.advance(advance)
        due = {k for k, r in p.sessions.items() if r.pinned and r.expires_at <= clock.now}
        released = p.expire()
        assert all(d.reason is ReleaseReason.TTL and d.blocks is None for d in released)
        assert {d.key for d in released} == due
        assert len(p.expiry.heap) <= n  # never more entries than finished turns (the old one-per-turn heap)
    clock.advance(100.0)
    p.expire()
    assert p.pinned_blocks_total == 0


def test_a_session_with_a_request_queued_keeps_its_expired_pin_until_the_turn_starts(clock):
    """Its request is back (e.g. the tier restored its prefix into a pin while it queued): a TTL release now would
    hand the restored blocks to the free queue just before the turn needs them. A request that is abandoned instead
    does not keep the pin forever: it is looked at again a TTL later."""
    p = make(clock, default_ttl_s=5.0)
    finish(p, A)
    finish(p, B)
    clock.advance(6.0)
    p.request_arrived(A, TurnHints())  # A's next turn is queued, B's is not
    assert p.expire() == [Release(B, ReleaseReason.TTL)]
    assert p.sessions[A].pinned_blocks == 10
    assert p.turn_started(A, cached_tokens=160) == []  # the request holds the whole pin: nothing released
    p.turn_finished(A, TurnHints(), 160, 10)
    p.request_arrived(A, TurnHints())
    clock.advance(6.0)
    assert p.expire() == []
    p.request_abandoned(A)  # aborted before it was scheduled
    clock.advance(4.999)
    assert p.expire() == []
    clock.advance(0.001)  # a TTL after the look that kept it
    assert p.expire() == [Release(A, ReleaseReason.TTL)] and p.pinned_blocks_total == 0


def test_a_pin_repinned_past_a_stale_earlier_entry_still_expires() -> None:
    """Found by review: a shorter TTL (a hint, or the ledger's clamp) queued an entry that fired; the session was pinned
    again with a later expiry, and one pass popping the stale entry then the current one (an idle engine calls expiry
    rarely) left the session with no entry at all: its pin never expired."""
    clock = FakeClock(0.0)
    pol = RetentionPolicy(RetentionConfig(default_ttl_s=300.0), clock=clock, total_blocks=64, bytes_per_token=1.0)
    a = SessionKey(SessionId("a"))

    def turn(t: float, ttl: float) -> None:
        clock.now = t
        rec = pol.sessions.get(a)
        pol.turn_started(a, 16 if rec and rec.pinned_blocks else 0)
        pol.turn_finished(a, TurnHints(ttl_s=ttl), tokens=16, blocks=1)

    turn(0.0, 600.0)  # queued at 600
    turn(10.0, 30.0)  # a shorter hint: queued at 40
    clock.now = 41.0
    assert [d.reason for d in pol.expire()] == [ReleaseReason.TTL]
    turn(500.0, 300.0)  # queued at 800; the entry at 600 is stale
    turn(790.0, 300.0)  # expires at 1090
    clock.now = 850.0
    assert pol.expire() == []  # pops 600 and 800: neither due, the pin must stay queued
    clock.now = 1100.0
    assert [d.reason for d in pol.expire()] == [ReleaseReason.TTL]
    assert pol.sessions[a].pinned_blocks == 0


def test_a_running_sessions_pin_is_not_released_when_its_ttl_runs_out() -> None:
    """Its request holds the blocks (a release frees nothing) and the turn's end pins them again; before, a fallen
    ledger cap released (and with the FP8 tier, copied to the tier) every running session's pin at once."""
    clock = FakeClock(0.0)
    pol = RetentionPolicy(RetentionConfig(default_ttl_s=600.0), clock=clock, total_blocks=64, bytes_per_token=1.0)
    a, b = SessionKey(SessionId("a")), SessionKey(SessionId("b"))
    for k in (a, b):
        pol.turn_started(k, 0)
        pol.turn_finished(k, TurnHints(), tokens=16, blocks=1)
    clock.now = 400.0
    pol.request_arrived(a, TurnHints())
    assert pol.turn_started(a, 16) == []  # a runs on its pin
    assert pol.expiry.clamp(pol.sessions, 300.0) == 2  # the ledger's cap halved
    clock.now = 400.5
    assert [d.key for d in pol.expire()] == [b]  # b is idle: released; a is running: kept
    assert pol.sessions[a].pinned_blocks == 1
    clock.now = 401.0
    pol.turn_finished(a, TurnHints(), tokens=32, blocks=2)
    assert pol.sessions[a].pinned_blocks == 2 and pol.expire() == []
