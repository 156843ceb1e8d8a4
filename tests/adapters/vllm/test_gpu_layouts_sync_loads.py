"""A step whose metadata carries tier loads is a step of sync loads: vLLM 0.32 starts a connector's loads after the
forward's launch unless `SchedulerOutput.has_sync_kv_loads` (kv_connector_model_runner_mixin, and Model Runner V2's
kv_connector.pre_forward), which it infers from the requests it admitted with external tokens. The connector now says
so itself (as vLLM's HiSparse connector does), so a restore never depends on that inference: on a GPU, a load started
after the forward's launch is fenced too late, and attention reads the block before it landed."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import fp8_tier_connector as fc  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierStepMeta  # noqa: E402
from kvsched.core.tier import Load  # noqa: E402


def scheduler_side(meta: TierStepMeta) -> fc.KVSchedFP8TierConnector:
    conn = object.__new__(fc.KVSchedFP8TierConnector)  # the scheduler's step bookkeeping only
    conn._step, conn.stats, conn.levels, conn.steps_built = meta, {"superseded_loads": 0.0}, None, 0
    conn.fetches, conn.directory = NS(expire=lambda: None), NS(unlock_all=lambda: None)
    conn._step_loads, conn._loading, conn._matched = {}, deque(maxlen=4), {}
    return conn


def test_a_step_with_tier_loads_is_marked_as_having_sync_loads() -> None:
    out = NS(has_sync_kv_loads=False)
    scheduler_side(TierStepMeta(loads=[Load(0, 7)])).build_connector_meta(out)
    assert out.has_sync_kv_loads is True


def test_a_step_without_loads_is_left_as_vllm_made_it() -> None:
    for prefetch_only in (TierStepMeta(), TierStepMeta(prefetches=[Load(1, 3)])):  # prefetches run before the step
        out = NS(has_sync_kv_loads=False)
        scheduler_side(prefetch_only).build_connector_meta(out)
        assert out.has_sync_kv_loads is False
    scheduler_side(TierStepMeta(loads=[Load(0, 7)])).build_connector_meta(None)  # tests and no-output callers
