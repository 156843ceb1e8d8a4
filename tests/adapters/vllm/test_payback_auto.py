"""The engine resolves KVSCHED_PAYBACK_SAMPLING=auto from its own pool (vLLM's real scheduler; no FP8 tier here), and
feeds the tracker only once vLLM's prefix cache is full (its next allocation evicts a cached block)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle  # noqa: E402
from kvsched.core.ghost_lru import LruGhost  # noqa: E402
from kvsched.ops import backends  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402

VARS = ("KVSCHED_DEFAULT_TTL_S", "KVSCHED_PAYBACK_SAMPLING", "KVSCHED_PAYBACK_FROM_START", "KVSCHED_GHOST")


def _env(monkeypatch, env: dict[str, str]) -> None:
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)


@pytest.mark.parametrize(("env", "on"), [
    ({}, True),  # the default 30 s TTL: pins that never pay cost up to 1.205x LRU there too
    ({"KVSCHED_DEFAULT_TTL_S": "600"}, True),
    ({"KVSCHED_DEFAULT_TTL_S": "600", "KVSCHED_PAYBACK_SAMPLING": "0"}, False),
])
def test_without_the_tier_the_fallback_is_on_at_every_ttl(harness_cfg, monkeypatch, env, on) -> None:
    _env(monkeypatch, env)
    s = sched(harness_cfg)
    assert s.kvsched.tier is None
    assert s.kvsched.policy.payback.enabled is on
    assert s.kvsched._payback is False  # nothing fed before the pool evicts
    assert s.kvsched._payback_waiting is on


def _one_shots(s, f: RequestFactory, first: int, n: int) -> None:
    for i in range(n):  # distinct 2-block prompts: each leaves 2 cached blocks behind
        s.add_request(f.make(list(range(first + 64 * i, first + 64 * i + 32)), 1, session_id=f"s{first}-{i}"))
        run_until_idle(s)


@pytest.mark.parametrize("ghost", ["auto", "python"])
def test_the_tracker_is_fed_from_the_first_full_prefix_cache_and_judged_once_its_ghost_fills(harness_cfg, monkeypatch,
                                                                                             ghost):
    _env(monkeypatch, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_DEFAULT_TTL_S": "0",  # no pins: the pool is LRU
                       "KVSCHED_GHOST": ghost})
    s, f = sched(harness_cfg), RequestFactory(BLOCK)
    payback = s.kvsched.policy.payback
    compiled = ghost == "auto" and backends.has_cxx()  # `make test` builds the extension: the engine's own ghost
    assert isinstance(payback.ghost, LruGhost) is not compiled
    _one_shots(s, f, 1000, 10)  # 20 of 63 blocks cached: nothing evicted yet
    assert not compat.prefix_cache_full(s) and not payback.armed and not len(payback.ghost) and not payback.ghost.held()
    _one_shots(s, f, 5000, 40)  # past 63 blocks: the free queue now starts with a cached block
    assert payback.armed and s.kvsched._payback and not s.kvsched._payback_waiting
    assert len(payback.ghost)  # fed since
    _one_shots(s, f, 9000, 60)
    assert payback.warm
    # no pins: the pool is an LRU pool, so once judged the ghost agrees with it request for request
    assert payback.ledger is not None and payback.ledger.balance == 0
    s.add_request(f.make(list(range(9000 + 64 * 59, 9000 + 64 * 59 + 32)), 1, session_id="again"))
    run_until_idle(s)
    assert payback.real_hits == payback.lru_hits > 0


def test_from_start_feeds_it_from_the_first_request(harness_cfg, monkeypatch) -> None:
    _env(monkeypatch, {"KVSCHED_PAYBACK_FROM_START": "1"})
    s, f = sched(harness_cfg), RequestFactory(BLOCK)
    assert s.kvsched._payback and s.kvsched.policy.payback.armed
    _one_shots(s, f, 1000, 2)
    assert len(s.kvsched.policy.payback.ghost)


def test_the_fallback_state_is_exported_while_it_is_on(harness_cfg, monkeypatch) -> None:
    from kvsched.adapters.vllm.metrics import render_metrics

    _env(monkeypatch, {"KVSCHED_PAYBACK_SAMPLING": "1"})
    s, f = sched(harness_cfg), RequestFactory(BLOCK)
    stats = s.kvsched.stats()
    assert (stats["payback_fed"], stats["payback_ttl_cap_seconds"], stats["payback_balance_blocks"]) == (0.0, 30.0, 0)
    _one_shots(s, f, 5000, 40)  # the prefix cache fills and evicts: fed from here
    assert s.kvsched.stats()["payback_fed"] == 1.0
    body = render_metrics(s.kvsched.stats()).decode()
    assert "kvsched_payback_fed 1.0" in body and "kvsched_payback_ttl_cap_seconds 30.0" in body
    _env(monkeypatch, {"KVSCHED_PAYBACK_SAMPLING": "0"})  # off (as with the FP8 tier): no such series at all
    off = sched(harness_cfg).kvsched.stats()
    assert not any(k.startswith("payback_") for k in off) and "kvsched_payback_" not in render_metrics(off).decode()


def test_the_cap_gauge_of_the_windowed_switch_is_in_seconds(harness_cfg, monkeypatch) -> None:
    """Found by review: with the windowed switch (no ledger) the gauge read 1.0 "seconds" while pins were on."""
    _env(monkeypatch, {"KVSCHED_PAYBACK_SAMPLING": "1"})
    monkeypatch.setenv("KVSCHED_PAYBACK_START_TTL_S", "0")
    s = sched(harness_cfg)
    assert s.kvsched.policy.payback.ledger is None
    assert s.kvsched.stats()["payback_ttl_cap_seconds"] == s.kvsched.policy.config.max_ttl_s
    s.kvsched.policy.payback.pinning = False  # suspended: no pins
    assert s.kvsched.stats()["payback_ttl_cap_seconds"] == 0.0


def test_pins_held_when_the_cap_falls_to_zero_are_released_at_the_next_step(harness_cfg, monkeypatch) -> None:
    """The ledger's cap bounds pins already held, not only new ones: pins made while pins paid kept costing after
    the cut (tools/adversarial a_burst_liar_big at 1.5x: 4/5 of the loss came after it)."""
    from kvsched.adapters.vllm.metrics import render_metrics

    _env(monkeypatch, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_PAYBACK_FROM_START": "1"})
    s, f = sched(harness_cfg), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(100, 164)), 1, session_id="held"))
    run_until_idle(s)
    held = next(k for k in s.kvsched.pinned if k.session_id == "held")
    assert s.kvsched.block_refs and s.kvsched.policy.sessions[held].ttl_s == 30.0
    ledger = s.kvsched.policy.payback.ledger
    assert ledger is not None
    while ledger.cap > 0:  # pins lose (as the ghost would have shown): the cut
        ledger.observe(0, 5)
    s.add_request(f.make(list(range(5000, 5032)), 1, session_id="next"))  # its start applies the fallen cap
    run_until_idle(s)
    assert held not in s.kvsched.pinned and not s.kvsched.block_refs  # released, and the new turn pinned nothing
    stats = s.kvsched.stats()
    assert stats["payback_clamped_pins"] >= 1 and stats["payback_ttl_cap_seconds"] == 0.0
    assert "kvsched_payback_clamped_pins_total" in render_metrics(stats).decode()
