"""`kvsched_kv_bytes_per_token` (and the session routes' `kv_bytes_per_token`) is the engine's, every rank's share
summed, as the FP8 tier's byte gauges are (734f06b): the scheduler's KV cache spec is one rank's (its heads of its
layers). Found by review: it was one rank's, half the engine's under `--tensor-parallel-size 2`. One rank's share is
`kv_rank_bytes_per_token` (what eviction scores weigh). A real TP=2 `vllm serve`:
tests/integration/test_fp8_tier.py::test_the_tiers_bytes_are_both_ranks."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm.metrics import render_metrics  # noqa: E402
from kvsched.serving import parse_prometheus  # noqa: E402
from tests.adapters.vllm.conftest import sched  # noqa: E402


@pytest.mark.parametrize("world", [1, 2, 4])  # no parallelism; TP=2; TP=4 (or TP=2 x PP=2 of even stages)
def test_kv_bytes_per_token_are_every_ranks_share_summed(harness_cfg, world) -> None:
    s = sched(harness_cfg)
    per_rank = compat.kv_bytes_per_token(s)
    s.parallel_config.world_size = world
    stats = s.kvsched.stats()
    assert stats["kv_bytes_per_token"] == world * per_rank > 0
    assert stats["kv_rank_bytes_per_token"] == per_rank
    m = parse_prometheus(render_metrics(stats).decode())
    assert m["kvsched_kv_bytes_per_token"] == world * per_rank and m["kvsched_kv_rank_bytes_per_token"] == per_rank
    assert s.kvsched.policy.bytes_per_token == per_rank  # scores weigh one rank's bytes, as the tier's values do
