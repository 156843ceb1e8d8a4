"""The pin payback tracker: its ghost LRU, its comparison, and the policy's fallback to LRU it drives."""

from __future__ import annotations

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.pin_payback import MIN_GHOST_BLOCKS, PaybackConfig, PinPayback
from kvsched.core.retention import Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints


def exact(total: int = 8, window: int = 4, cooldown: int = 3, margin: float = 0.0) -> PinPayback:
    return PinPayback(PaybackConfig(sampling=1, window=window, cooldown=cooldown, margin=margin), total)


def test_ghost_is_an_lru_of_what_running_requests_leave_and_counts_prefix_hits_only() -> None:
    p = exact(total=4)
    p.observe([1, 2, 3], 0)
    assert p.ghost.running() == {1: 1, 2: 1, 3: 1} and not p.ghost and p.lru == 0  # held by the request: not evictable
    p.observe([1, 2], 0)  # shared with the running request: hits
    assert p.lru == pytest.approx(2.0)
    p.cached([1, 2, 3])
    assert p.ghost.keys() == [3] and p.ghost.running() == {1: 1, 2: 1}  # tail first: the head is the most recent
    p.cached([1, 2])
    assert p.ghost.keys() == [3, 2, 1] and not p.ghost.running()
    p.observe([4, 5], 0)  # two blocks held: room for 2 cached, the least recently used (3) goes
    assert p.ghost.keys() == [2, 1]
    before = p.lru * p.decay
    p.observe([3, 1], 0)  # 3 misses, so 1 is no prefix hit (vLLM's hits are a prefix)
    assert p.lru == pytest.approx(before)


def test_blocks_reserved_beyond_prompts_shrink_the_ghost() -> None:
    p = exact(total=4)
    p.cached([1, 2, 3, 4])
    p.reserve(3)
    p.cached([])
    assert p.ghost.keys() == [1]
    p.reserve(-3)
    p.cached([5])
    assert p.ghost.keys() == [1, 5]


def test_real_hits_are_the_sampled_blocks_before_the_cached_count() -> None:
    p = exact()
    p.observe([10, 11, 12, 13], 3)
    assert p.real == pytest.approx(3.0)


def test_pins_are_suspended_when_they_hit_less_than_lru_then_probed_again() -> None:
    p = exact(window=4, cooldown=3)
    p.cached([1, 2])
    changes = [p.observe([1, 2], 0) for _ in range(4)]  # the ghost hits 1 and 2, the real pool nothing
    assert changes == [None, None, None, False] and not p.pinning
    assert [p.observe([1, 2], 0) for _ in range(3)] == [None, None, True] and p.pinning


def test_pins_that_hit_at_least_as_much_as_lru_stay() -> None:
    p = exact(window=4)
    assert all(p.observe([1, 2], 2) is None for _ in range(50))
    assert p.pinning and p.switches == 0


def test_margin_asks_pins_to_beat_lru() -> None:
    p = exact(window=2, margin=-0.6)  # pins must hit 1.6x what LRU hits
    p.cached([1, 2])
    p.observe([1, 2], 2)
    assert p.observe([1, 2], 2) is False


def test_sampling_tracks_about_one_key_in_n_and_scales_the_ghost() -> None:
    p = PinPayback(PaybackConfig(sampling=8), total_blocks=8 * MIN_GHOST_BLOCKS * 4)
    assert p.capacity == MIN_GHOST_BLOCKS * 4
    p.cached(range(80_000))  # sequential ids (the simulator's) are spread by the mix
    assert len(p.ghost) == p.capacity
    q = PinPayback(PaybackConfig(sampling=8), total_blocks=10**9)
    q.cached(range(80_000))
    assert 9_000 < len(q.ghost) < 11_000


def test_small_pools_sample_less_and_zero_turns_it_off() -> None:
    assert PinPayback(PaybackConfig(sampling=8), total_blocks=100).rate == 1
    off = PinPayback(PaybackConfig(sampling=0), total_blocks=100)
    assert not off.enabled and off.observe([1, 2], 0) is None and off.pinning


def test_settings_come_from_env_and_are_checked() -> None:
    cfg = RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": "0", "KVSCHED_PAYBACK_WINDOW": "50",
                                    "KVSCHED_PAYBACK_COOLDOWN": "7", "KVSCHED_PAYBACK_MARGIN": "0.1"})
    assert cfg.payback() == PaybackConfig(sampling=0, window=50, cooldown=7, margin=0.1, start=30.0, from_start=False)
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_WINDOW"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_WINDOW": "0"})
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_SAMPLING"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": "1.5"})
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_MARGIN"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_MARGIN": "1"})


def test_policy_releases_every_pin_and_pins_nothing_while_suspended() -> None:
    cfg = RetentionConfig(payback_sampling=1, payback_window=2, payback_cooldown=2, payback_start_ttl_s=0.0,
                          payback_from_start=True)
    pol = RetentionPolicy(cfg, clock=lambda: 0.0, total_blocks=100, bytes_per_token=1.0)
    a, b = SessionKey(SessionId("a")), SessionKey(SessionId("b"))
    for k in (a, b):
        pol.turn_started(k, 0)
        assert pol.turn_finished(k, TurnHints(), tokens=32, blocks=2) == [Pin(k)]
    pol.payback.cached([1, 2])
    assert pol.prompt_seen([1, 2], 0) == []  # not yet a window
    out = pol.prompt_seen([1, 2], 0)  # the ghost hit 1 and 2, the pool nothing
    assert sorted(out, key=lambda d: str(d.key.session_id)) == [Release(a, ReleaseReason.PAYBACK),
                                                                 Release(b, ReleaseReason.PAYBACK)]
    assert pol.pinned_blocks_total == 0 and pol.pinned_sessions == 0
    pol.turn_started(a, 0)
    assert pol.turn_finished(a, TurnHints(), tokens=32, blocks=2) == []  # suspended: stock LRU
    pol.prompt_seen([3], 0)
    pol.prompt_seen([3], 0)  # the cool-down is over: probe
    pol.turn_started(a, 0)
    assert pol.turn_finished(a, TurnHints(), tokens=32, blocks=2) == [Pin(a)]
