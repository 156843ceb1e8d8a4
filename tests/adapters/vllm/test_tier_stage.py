"""The FP8 tier's copy staging (tier_link.StagePlan / StagePool): a store or restore moves its blocks in groups through
a fixed set of host buffers (one allocation, pinned on a GPU and counted in the tier's host budget) with at most a
group's device buffers (bounded at registration, after vLLM's memory profile). The same code runs here on the CPU with
the buffers allocated unpinned (`allocate=True`), and copies that complete later (tests' LaterLink)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvsched.adapters.vllm import tier_link
from kvsched.adapters.vllm.tier_config import ENV_STAGE_MB, stage_bytes_of
from kvsched.adapters.vllm.tier_layout import QUANTIZE, view_bytes
from kvsched.adapters.vllm.tier_link import STAGE_BUFFERS, StagePool, stage_plan
from kvsched.core.tier_config import TierConfigError
from tests.adapters.vllm.test_fp8_tier_store import LaterLink, caches, tier, views_of

MIB = 1 << 20


def test_the_plan_is_four_power_of_two_buffers_never_above_the_setting():
    assert stage_plan(128 * MIB).buffer_bytes == 32 * MIB
    assert stage_plan(100 * MIB).buffer_bytes == 16 * MIB  # rounded down: what is pinned is what is counted
    plan = stage_plan(128 * MIB)
    assert plan.host_bytes == STAGE_BUFFERS * plan.buffer_bytes == 128 * MIB


def _pool(kv, blocks_per_group: int, link=None):
    slot = view_bytes(views_of(kv), QUANTIZE)
    pool = StagePool(stage_plan(1 << 30), pin=False, allocate=True, device_bytes=blocks_per_group * slot)
    store = tier(kv, link=link, stage=pool)
    assert store.group_blocks == blocks_per_group
    return store, pool


def test_a_store_and_a_restore_larger_than_a_group_go_through_the_buffers_and_round_trip():
    kv = caches(layers=3)
    original = {k: v.clone() for k, v in kv.items()}
    store, pool = _pool(kv, 2)
    store.store([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0])  # 4 groups through 2 store buffers
    assert pool.allocated_bytes == pool.plan.host_bytes  # one allocation, whatever the size of the store
    for v in kv.values():
        v.zero_()
    assert store.load([0, 2, 4, 6, 1], [6, 4, 2, 0, 5]) == []  # 3 groups through 2 restore buffers
    for name, v in kv.items():
        for b in (6, 4, 2, 0, 5):
            x, y = original[name][b].float(), v[b].float()
            assert float((x - y).norm() / x.norm()) < 0.07, (name, b)
        assert torch.count_nonzero(v[1]) == 0 and torch.count_nonzero(v[3]) == 0
    assert pool.allocated_bytes == pool.plan.host_bytes


def test_a_store_waits_for_a_buffers_earlier_copy_only_when_both_are_in_flight():
    """Two store buffers: the third group of a store reuses the first's buffer, so it waits for that copy (and seals
    it); the second's copy goes on."""
    kv = caches(layers=2)
    link = LaterLink()
    store, _ = _pool(kv, 1, link)
    store.store([1, 2], [0, 1])  # two groups: both buffers in flight, nothing waited for
    assert [e.waited for e in link.events] == [False] * 4 and len(store.pending) == 2
    store.store([3], [2])
    read0, copy0, read1, copy1 = link.events[:4]
    assert copy0.waited and not copy1.waited  # the first group's copy, then its buffer again
    assert store.crc[0] >= 0 and store.crc[1] == -1 and [p.slots for p in store.pending] == [[1], [2]]
    assert {p.buffer for p in store.pending} == {0, 1}


def test_a_restore_waits_for_a_restore_buffers_earlier_copy_only_when_both_are_in_flight():
    kv = caches(layers=2)
    link = LaterLink()
    store, _ = _pool(kv, 1, link)
    store.store([1, 2, 3], [0, 1, 2])
    for e in link.events:
        e.done = True
    before = len(link.events)
    assert store.load([0, 1], [7, 8]) == []  # two groups, two buffers
    first, second = link.events[before:]
    assert not first.waited and not second.waited
    assert store.load([2], [9]) == []
    assert first.waited and not second.waited  # the oldest restore buffer, waited for before it is written again


def test_the_device_stage_is_the_setting_or_a_share_of_the_free_memory(monkeypatch):
    plan = stage_plan(128 * MIB)
    assert tier_link.device_stage_bytes(torch.device("cpu"), plan, None) == (plan.buffer_bytes, "a host buffer")
    assert tier_link.device_stage_bytes(torch.device("cpu"), plan, 4 * MIB)[0] == 4 * MIB
    monkeypatch.setattr(tier_link.torch.cuda, "mem_get_info", lambda device=None: (320 * MIB, 80 << 30))
    got, how = tier_link.device_stage_bytes(torch.device("cuda"), plan, None)
    assert got == 10 * MIB and "0.31 GiB free" in how  # min(32 MiB, 320 MiB / 32): a full GPU gets a small stage
    monkeypatch.setattr(tier_link.torch.cuda, "mem_get_info", lambda device=None: (40 << 30, 80 << 30))
    assert tier_link.device_stage_bytes(torch.device("cuda"), plan, None)[0] == plan.buffer_bytes


def test_the_setting_is_read_from_the_transfer_config_then_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv(ENV_STAGE_MB, raising=False)
    assert stage_bytes_of({}, 7) == (7, False)
    monkeypatch.setenv(ENV_STAGE_MB, "64")
    assert stage_bytes_of({}, 7) == (64 * MIB, True)
    assert stage_bytes_of({"stage_mb": 0.5}, 7) == (MIB // 2, True)
    for bad in ("x", "0", "-1", "nan", "inf", True, 1e9):
        with pytest.raises(TierConfigError, match="stage_mb"):
            stage_bytes_of({"stage_mb": bad}, 7)
    monkeypatch.setenv(ENV_STAGE_MB, "lots")
    with pytest.raises(TierConfigError, match=ENV_STAGE_MB):
        stage_bytes_of({}, 7)
    pytest.importorskip("vllm")
    from kvsched.adapters.vllm.settings_check import engine_setting_errors

    assert any(ENV_STAGE_MB in e for e in engine_setting_errors())


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_a_gpu_engines_staging_comes_out_of_the_tiers_host_budget(harness_cfg, monkeypatch, platform, caplog):
    """What a rank pins is the budget: on a GPU the slots get the budget less the staging buffers; on the CPU nothing
    is pinned and the copies' buffers live within a step, so the slots get it all."""
    pytest.importorskip("vllm")
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm import tier_blob, tier_host
    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config
    from tests.adapters.vllm.conftest import sched

    monkeypatch.setenv(ENV_STAGE_MB, "8")
    monkeypatch.setattr(tier_host, "host_memory", lambda: (64 << 30, 64 << 30))
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.25)))
    monkeypatch.setattr(tier_blob, "platform_type", lambda: platform)
    caplog.set_level("INFO", logger="vllm.kvsched.fp8_tier")
    c = KVSchedFP8TierConnector(s.connector.engine_config, KVConnectorRole.SCHEDULER, s.kv_cache_config)
    block = c.geometry.block_bytes
    staging = 8 * MIB if platform == "cuda" else 0
    assert tier_host.staging_bytes(8 * MIB, c.geometry, platform) == staging
    assert c.num_slots == ((256 * MIB) - staging) // block
    assert ("8 MiB of copy staging" in caplog.text) == (platform == "cuda")


def test_a_cpu_worker_stages_through_the_kernels_outputs_in_groups_the_setting_bounds(harness_cfg, monkeypatch,
                                                                                     caplog):
    """register_kv_caches plans the staging once and says so in one line; on the CPU nothing is pinned or allocated
    ahead, and KVSCHED_TIER_STAGE_MB still bounds a group (here one block's bytes: a buffer is a quarter of that, so
    every block is its own group, its layers in pieces, and the buffers are not grown to a slot)."""
    pytest.importorskip("vllm")
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config
    from tests.adapters.vllm.conftest import sched

    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.25)))
    g = s.connector.geometry
    monkeypatch.setenv(ENV_STAGE_MB, str(g.block_bytes / MIB))
    caplog.set_level("INFO", logger="vllm.kvsched.fp8_tier")
    w = KVSchedFP8TierConnector(s.connector.engine_config, KVConnectorRole.WORKER, s.kv_cache_config)
    gen = torch.Generator().manual_seed(0)
    kv = {name: torch.randn((s.connector.num_blocks, g.heads, g.rows, g.content), generator=gen).to(g.dtype)
          for name in g.layers}
    w.register_kv_caches(kv)
    store = w.store
    assert store is not None and store.group_blocks == 1 and store.stage.allocate is False
    assert store.plan.spans == ((0, 1), (1, 2)) and store.stage.plan.host_bytes <= g.block_bytes
    assert "1 blocks at a time in 2 pieces of its layers through the kernels' outputs" in caplog.text
    original = {n: t[:3].clone() for n, t in kv.items()}
    store.store([0, 1, 2], [0, 1, 2])
    assert store.load([0, 1, 2], [10, 11, 12]) == [] and store.stage.allocated_bytes == 0
    for name, t in kv.items():
        for i in range(3):
            x, y = original[name][i].float(), t[10 + i].float()
            assert float((x - y).norm() / x.norm()) < 0.07
