"""The engine resolves KVSCHED_PAYBACK_SAMPLING=auto from its own pool (vLLM's real scheduler; no FP8 tier here)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.conftest import sched  # noqa: E402


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),  # the default 30 s TTL
    ({"KVSCHED_DEFAULT_TTL_S": "600"}, True),
    ({"KVSCHED_DEFAULT_TTL_S": "600", "KVSCHED_PAYBACK_SAMPLING": "0"}, False),
])
def test_long_pins_without_the_tier_turn_the_fallback_on(harness_cfg, monkeypatch, env, on) -> None:
    for var in ("KVSCHED_DEFAULT_TTL_S", "KVSCHED_PAYBACK_SAMPLING"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    s = sched(harness_cfg)
    assert s.kvsched.tier is None
    assert s.kvsched.policy.payback.enabled is on
    assert s.kvsched._payback is on  # the hooks feed the ghost exactly when it is on
