"""The FP8 tier's byte figures (`/metrics`' kvsched_tier_* gauges, the session routes' stats) are the engine's under
tensor/pipeline parallelism: each of its ranks holds its part (its heads of its layers) of every slot, so the tier's
host memory is the scheduler's slots times every rank's share. Found by review: they were one rank's, so an operator
of a TP=N engine read 1/N of its tier, and of the size `--kvsched-fp8-tier-gb` gave (the host's total for the engine).
A real TP=2 `vllm serve`: tests/integration/test_fp8_tier.py::test_the_tiers_bytes_are_both_ranks."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import tier_stats  # noqa: E402
from kvsched.adapters.vllm.metrics import render_metrics  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta  # noqa: E402
from kvsched.serving import parse_prometheus  # noqa: E402
from tests.adapters.vllm.test_tier_host import GIB, connector  # noqa: E402


def demote_two(c) -> None:
    assert c.demote("s", [(b"k0", 1), (b"k1", 2)]) == 2


@pytest.mark.parametrize("world", [2, 4])  # TP=2; TP=2 x PP=2 (vLLM's world size counts both)
def test_the_tiers_bytes_are_every_ranks_share_summed(harness_cfg, monkeypatch, world) -> None:
    c = connector(harness_cfg, monkeypatch, 0.01, world)
    demote_two(c)
    block, slots = c.geometry.block_bytes, c.num_slots
    stats = c.tier_stats()
    assert stats["tier_capacity_bytes"] == world * slots * block  # what the engine's ranks take together
    assert 0.01 * GIB - world * block < stats["tier_capacity_bytes"] <= 0.01 * GIB  # the size given, to a slot a rank
    assert stats["tier_bytes"] == world * 2 * block and stats["tier_blocks"] == 2
    assert stats["tier_ranks"] == world
    assert stats["tier_rank_capacity_bytes"] == slots * block and stats["tier_rank_bytes"] == 2 * block
    m = parse_prometheus(render_metrics(stats).decode())
    assert m["kvsched_tier_capacity_bytes"] == stats["tier_capacity_bytes"] and m["kvsched_tier_ranks"] == world
    assert m["kvsched_tier_bytes"] == world * 2 * block and m["kvsched_tier_rank_capacity_bytes"] == slots * block


def test_one_rank_reports_as_before(harness_cfg, monkeypatch) -> None:
    c = connector(harness_cfg, monkeypatch, 0.01, 1)
    demote_two(c)
    stats = c.tier_stats()
    block = c.geometry.block_bytes
    assert stats["tier_capacity_bytes"] == stats["tier_rank_capacity_bytes"] == c.num_slots * block
    assert stats["tier_bytes"] == 2 * block and stats["tier_ranks"] == 1


def test_a_rank_that_cannot_run_the_tier_turns_the_engines_capacity_to_zero(harness_cfg, monkeypatch) -> None:
    """One rank's worker turning its tier off (register_kv_caches) turns it off for the engine: its blocks could not
    be restored whole. The capacity reads 0 on every rank's account, not the other ranks' shares."""
    c = connector(harness_cfg, monkeypatch, 0.01, 2)
    tier_stats.absorb_worker_meta(c, TierWorkerMeta(disabled="rank 1: not the spec's shape"))
    stats = c.tier_stats()
    assert stats["tier_enabled"] == 0 and stats["tier_capacity_bytes"] == stats["tier_rank_capacity_bytes"] == 0
    assert stats["tier_disabled_reason"] == "rank 1: not the spec's shape" and stats["tier_ranks"] == 2
