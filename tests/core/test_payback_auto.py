"""KVSCHED_PAYBACK_SAMPLING=auto (the default): the fallback to LRU comes on wherever pins were measured to cost more
than LRU (no FP8 tier, at every TTL: 1.205x LRU's prefill at the default 30 s on an adversarial trace)."""

from __future__ import annotations

import pytest

from kvsched.core.config import AUTO_PAYBACK_SAMPLING, RetentionConfig


def test_auto_is_the_default_and_reads_from_the_environment() -> None:
    assert RetentionConfig().payback_sampling is None
    assert RetentionConfig.from_env({}).payback_sampling is None
    assert RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": " Auto "}).payback_sampling is None
    assert RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": "0"}).payback_sampling == 0
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_SAMPLING"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": "sometimes"})
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_SAMPLING"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_SAMPLING": "-8"})


@pytest.mark.parametrize(("ttl", "tier", "expected"), [
    (600.0, False, AUTO_PAYBACK_SAMPLING),  # long pins, nothing to demote them to: the measured risk
    (30.0, False, AUTO_PAYBACK_SAMPLING),  # the default TTL: pins that never pay cost up to 1.205x LRU there too
    (1.0, False, AUTO_PAYBACK_SAMPLING),
    (600.0, True, 0),  # the tier holds what pins give up
])
def test_auto_resolves_by_the_pool_and_the_ttl(ttl: float, tier: bool, expected: int) -> None:
    cfg = RetentionConfig(default_ttl_s=ttl).for_pool(tier=tier)
    assert cfg.payback_sampling == expected
    assert cfg.payback().sampling == expected


@pytest.mark.parametrize("sampling", [0, 3])
def test_an_explicit_sampling_is_kept_whatever_the_pool(sampling: int) -> None:
    for tier in (False, True):
        assert RetentionConfig(default_ttl_s=600.0, payback_sampling=sampling).for_pool(tier).payback_sampling == sampling


def test_an_unresolved_auto_is_off() -> None:
    assert RetentionConfig(default_ttl_s=600.0).payback().sampling == 0


def test_the_tracker_waits_for_the_first_eviction_unless_told_otherwise() -> None:
    assert RetentionConfig().payback().from_start is False
    assert RetentionConfig.from_env({"KVSCHED_PAYBACK_FROM_START": "yes"}).payback().from_start is True
    assert RetentionConfig.from_env({"KVSCHED_PAYBACK_FROM_START": " OFF "}).payback_from_start is False
    with pytest.raises(ValueError, match="KVSCHED_PAYBACK_FROM_START"):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_FROM_START": "2"})


def test_a_bad_gain_down_is_named_not_the_gain_it_extends() -> None:
    """Found by review: payback_gain is a substring of payback_gain_down, and the error named the wrong variable."""
    with pytest.raises(ValueError, match="^KVSCHED_PAYBACK_GAIN_DOWN: "):
        RetentionConfig.from_env({"KVSCHED_PAYBACK_GAIN": "0.5", "KVSCHED_PAYBACK_GAIN_DOWN": "0"})
