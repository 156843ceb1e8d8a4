"""The FP8 tier's size under tensor parallelism: every rank's worker holds its own copy of each of the scheduler's
slots, so a size given (`--kvsched-fp8-tier-gb N`) is the host's total for the engine, split between its ranks on the
host, as the default rule splits the host between its GPUs. Found by review (/tmp/rev_tier/tp_budget.py): N was
checked against the host's memory as a total but given to every rank whole: at TP=8, 400 GiB on a 512 GiB host was
accepted and grew to 3.2 TB."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import tier_host  # noqa: E402
from tests.adapters.vllm.conftest import sched  # noqa: E402

GIB = 2**30


@pytest.mark.parametrize(("world", "local", "gpus", "ranks"), [
    (8, 8, 8, 8),  # TP=8 on an 8-GPU host
    (2, 2, 8, 2),  # TP=2 on an 8-GPU host: the other GPUs are other engines'
    (16, 16, 8, 8),  # TP=16 over two 8-GPU hosts under Ray (vLLM's local world size stays 16)
    (16, 8, 8, 8),  # ... or with --nnodes 2
    (2, 2, 0, 2),  # TP=2 on a CPU host
])
def test_an_engines_ranks_on_this_host(monkeypatch, world, local, gpus, ranks) -> None:
    monkeypatch.setattr(tier_host, "gpus_on_host", lambda: gpus)
    assert tier_host.ranks_on_host(SimpleNamespace(world_size=world, local_world_size=local)) == ranks


def test_without_parallelism_nothing_is_probed(monkeypatch) -> None:
    def no_probe() -> int:
        raise AssertionError("probed the GPUs")

    monkeypatch.setattr(tier_host, "gpus_on_host", no_probe)
    assert tier_host.ranks_on_host(SimpleNamespace(world_size=1)) == 1


def connector(harness_cfg, monkeypatch, tier_gb: float, world_size: int):
    """The tier connector's scheduler side of an engine with `world_size` ranks on an 8-GPU host of 64 GiB."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config

    monkeypatch.setattr(tier_host, "host_memory", lambda: (64 * GIB, 64 * GIB))
    monkeypatch.setattr(tier_host, "gpus_on_host", lambda: 8, raising=False)
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(tier_gb)))
    cfg = s.connector.engine_config
    monkeypatch.setattr(cfg.parallel_config, "world_size", world_size)
    return KVSchedFP8TierConnector(cfg, KVConnectorRole.SCHEDULER, s.kv_cache_config)


def test_a_size_given_is_shared_by_the_engines_ranks_on_the_host(harness_cfg, monkeypatch, caplog) -> None:
    with caplog.at_level("INFO", logger="vllm.kvsched.fp8_tier"):
        c = connector(harness_cfg, monkeypatch, 0.01, 4)
    block = c.geometry.block_bytes
    assert c.num_slots == int(0.01 * GIB) // 4 // block  # each of the 4 ranks fills every slot with its own copy
    assert 4 * c.num_slots * block <= 0.01 * GIB
    line = [r.getMessage() for r in caplog.records if "kvsched FP8 tier:" in r.getMessage()][-1]  # this one's
    assert "0.01 GiB of host memory" in line and "each of this engine's 4 ranks on this host" in line


def test_one_rank_takes_the_whole_size_as_before(harness_cfg, monkeypatch) -> None:
    c = connector(harness_cfg, monkeypatch, 0.01, 1)
    assert c.num_slots == int(0.01 * GIB) // c.geometry.block_bytes


def test_a_size_beyond_the_hosts_memory_is_refused_whatever_the_ranks(harness_cfg, monkeypatch) -> None:
    from kvsched.core.tier_config import TierConfigError

    with pytest.raises(TierConfigError, match="exceeds this machine's host memory"):
        connector(harness_cfg, monkeypatch, 100, 8)  # 12.5 GiB a rank would have fit: 100 GiB on the host does not


def test_the_default_size_is_shared_by_the_engines_ranks_on_a_cpu_host(harness_cfg, monkeypatch) -> None:
    """Found by review: the default rule (1/4 of available memory / GPUs) counted no GPU on a CPU host, so each rank
    of a TP=4 engine took a quarter of the host: all of it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config

    small = GIB // 256  # the host share binds, not 2x the tiny pool
    monkeypatch.setattr(tier_host, "host_memory", lambda: (small, small))
    monkeypatch.setattr(tier_host, "gpus_on_host", lambda: 0, raising=False)
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config("auto")))
    cfg = s.connector.engine_config
    monkeypatch.setattr(cfg.parallel_config, "world_size", 4)
    c = KVSchedFP8TierConnector(cfg, KVConnectorRole.SCHEDULER, s.kv_cache_config)
    assert tier_host.ranks_on_host(cfg.parallel_config) == 4
    assert 0 < 4 * c.num_slots * c.geometry.block_bytes <= small // 4
