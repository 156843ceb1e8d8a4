"""Pipeline stages hold the layers vLLM gives them, not the first stage's: the FP8 tier's byte figures and slots, and
KV bytes per token, count each stage's own (kvsched.core.rank_shares; the arithmetic: tests/core/test_rank_shares.py).
Found by review: every stage was counted with stage 0's layers (the scheduler's KV cache spec is rank 0's), 3.7% high
for 27 layers in two stages, and slots sized by stage 0's block let a stage with more layers take more than its share
of `--kvsched-fp8-tier-gb`. The harness' KV cache spec holds the tiny model's 2 layers: stage 0's, in engines whose
model is said to have 3 (split 2 + 1) or 5 (split 2 + 3) hidden layers."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat, tier_host  # noqa: E402
from tests.adapters.vllm.conftest import sched  # noqa: E402
from tests.adapters.vllm.test_tier_host import GIB  # noqa: E402


def shares(layers: int, stages: int, world: int):
    parallel = SimpleNamespace(world_size=world, pipeline_parallel_size=stages)
    return compat.rank_shares(SimpleNamespace(parallel_config=parallel,
                                              model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: layers)))


def test_the_stages_layers_are_vllms_own_partition(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    assert shares(27, 2, 4).stage_layers == (14, 13)  # the remainder on all but the last stage
    assert shares(30, 4, 4).stage_layers == (7, 8, 8, 7)  # on the middle stages first
    assert shares(32, 4, 8).stage_layers == (8, 8, 8, 8) and shares(32, 1, 8).stage_layers == ()
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "10,17")
    assert shares(27, 2, 4).stage_layers == (10, 17)


def pp_connector(harness_cfg, monkeypatch, layers: int, partition: str | None = None, host_ranks: int = 4,
                 gib: float = 0.01):
    """The tier connector's scheduler side (and its scheduler) of a TP=2 x PP=2 engine, `host_ranks` of its 4 ranks on
    a host of 64 GiB, whose stage 0 holds the harness' 2 layers."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config

    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    else:
        monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    monkeypatch.setattr(tier_host, "host_memory", lambda: (64 * GIB, 64 * GIB))
    monkeypatch.setattr(tier_host, "ranks_on_host", lambda parallel: host_ranks)
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(gib)))
    cfg = s.connector.engine_config
    for parallel in (cfg.parallel_config, s.vllm_config.parallel_config):  # the connector's is a copy
        monkeypatch.setattr(parallel, "world_size", 4)
        monkeypatch.setattr(parallel, "pipeline_parallel_size", 2)
    monkeypatch.setattr(type(cfg.model_config), "get_total_num_hidden_layers", lambda self: layers)
    s.connector.world_size = 4  # the scheduler's own tier, read at its start
    return KVSchedFP8TierConnector(cfg, KVConnectorRole.SCHEDULER, s.kv_cache_config), s


def test_the_tiers_bytes_count_each_stages_own_layers(harness_cfg, monkeypatch) -> None:
    """3 layers, 2 + 1: the engine holds 2 ranks x 3 layers of every slot, not 4 x 2."""
    c, _ = pp_connector(harness_cfg, monkeypatch, 3)
    assert c.demote("s", [(b"k0", 1), (b"k1", 2)]) == 2
    block = c.geometry.block_bytes  # stage 0's: 2 layers
    stats = c.tier_stats()
    assert stats["tier_capacity_bytes"] == 2 * c.num_slots * block * 3 // 2  # 4 * slots * block before
    assert stats["tier_bytes"] == 2 * 2 * block * 3 // 2 and stats["tier_ranks"] == 4
    assert stats["tier_rank_capacity_bytes"] == c.num_slots * block  # the largest stage: the first
    assert c.num_slots == int(0.01 * GIB) // 4 * 4 // 3 // block  # the size given over the engine's 3 blocks


def test_slots_fit_the_size_given_whatever_the_stages_layers(harness_cfg, monkeypatch) -> None:
    """5 layers, 2 + 3 (VLLM_PP_LAYER_PARTITION): a slot takes 2 x 5 layers of the engine's 4 ranks, 2.5 times stage
    0's block, not 4 times: every rank on this host, the slots are the size given over that (they were the size over
    4 blocks of stage 0's, 1.25 times the size given in all)."""
    c, _ = pp_connector(harness_cfg, monkeypatch, 5, "2,3")
    block, size = c.geometry.block_bytes, int(0.01 * GIB)
    assert c.num_slots == size // 4 * 4 // (5 * block)  # each rank's quarter, summed
    stats = c.tier_stats()
    assert stats["tier_capacity_bytes"] == 2 * c.num_slots * block * 5 // 2
    assert size - 5 * block < stats["tier_capacity_bytes"] <= size  # the size given, to a slot
    assert stats["tier_rank_capacity_bytes"] == c.num_slots * block * 3 // 2  # the second stage's ranks


def test_ranks_on_other_hosts_keep_each_rank_within_its_share(harness_cfg, monkeypatch) -> None:
    """Two ranks of the 4 on this host (a stage per node): the size given is this host's for its 2 ranks, which may be
    either stage's; slots are sized so that the ranks of the stage with the most layers stay within their half."""
    c, _ = pp_connector(harness_cfg, monkeypatch, 5, "2,3", host_ranks=2)
    block, share = c.geometry.block_bytes, int(0.01 * GIB) // 2
    assert c.num_slots == share * 2 // 3 // block
    assert c.tier_stats()["tier_rank_capacity_bytes"] == c.num_slots * block * 3 // 2 <= share


@pytest.mark.parametrize("host_ranks", [4, 2])
def test_a_size_below_one_slot_names_the_size_that_holds_one(harness_cfg, monkeypatch, caplog, host_ranks) -> None:
    """Found by review: the warning asked for stage 0's block on each of the host's ranks, which holds no slot of 2 + 3
    layers: the engine's slot takes 5 of those blocks, not 4 (every rank on the host), the second stage's ranks 1.5
    each (2 of the 4 ranks on the host). The size it names (rounded up to 1e-6 GiB) holds a slot, 2e-6 GiB less none."""
    import re

    with caplog.at_level("WARNING", logger="vllm.kvsched.fp8_tier"):
        c, _ = pp_connector(harness_cfg, monkeypatch, 5, "2,3", host_ranks, gib=1e-6)
    said = [m for r in caplog.records if "hold no block" in (m := r.getMessage())]
    assert c.num_slots == 0 and said
    least = float(re.search(r"give at least ([0-9.]+) GiB", said[-1])[1])
    assert pp_connector(harness_cfg, monkeypatch, 5, "2,3", host_ranks, gib=least)[0].num_slots == 1
    assert pp_connector(harness_cfg, monkeypatch, 5, "2,3", host_ranks, gib=least - 2e-6)[0].num_slots == 0


def test_kv_bytes_per_token_count_each_stages_own_layers(harness_cfg, monkeypatch) -> None:
    _, s = pp_connector(harness_cfg, monkeypatch, 3)
    per_rank = compat.kv_bytes_per_token(s)
    stats = s.kvsched.stats()
    assert stats["kv_bytes_per_token"] == 2 * per_rank * 3 / 2 and stats["kv_rank_bytes_per_token"] == per_rank


def test_the_disk_levels_block_is_each_ranks_file_of_its_own_layers(tmp_path) -> None:
    """Each rank writes a file of its own layers' bytes for a block: 2 + 3 layers on 2 ranks each take 2 files of
    stage 0's 6,000 bytes and 2 of 9,000 (framed, in the file system's units), not 4 of 6,000."""
    from kvsched.adapters.vllm.tier_blob import framed_len
    from kvsched.adapters.vllm.tier_disk import DiskFiles
    from kvsched.adapters.vllm.tier_levels import TierLevels
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
    from kvsched.core.rank_shares import RankShares

    lv = TierLevels(LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=0.01), "ab" * 16, {"model": "t"}, 6000, 4,
                    RankShares(4, (2, 3)))
    assert lv.disk is not None
    files = DiskFiles(str(tmp_path / "other"), "ab" * 16, {"model": "t"}, 0, 4)
    per_file = [files.on_disk(framed_len(32, b)) for b in (6000, 9000)]
    assert lv.disk.block_bytes == 2 * per_file[0] + 2 * per_file[1] > 4 * per_file[0]


@pytest.mark.parametrize(("layers", "partition"), [(5, "2,3"), (3, None)])
def test_the_start_up_line_gives_each_stages_ranks_their_own_bytes(harness_cfg, monkeypatch, caplog, layers,
                                                                   partition) -> None:
    """Found by review: the line said every rank held the per-rank size given, whatever its stage's layers; under 2 + 3
    layers a stage-1 rank holds 1.5 times a stage-0 rank's slots' bytes, under 2 + 1 half."""
    with caplog.at_level("INFO", logger="vllm.kvsched.fp8_tier"):
        c, _ = pp_connector(harness_cfg, monkeypatch, layers, partition)
    line = [m for r in caplog.records if (m := r.getMessage()).startswith("kvsched FP8 tier: ")][-1]  # the engine's
    held = [c.num_slots * c.geometry.block_bytes * n // 2 for n in (2, layers - 2)]
    assert held[1] != held[0]
    assert (f"{c.num_slots} slots of {c.geometry.block_bytes} bytes on a stage-0 rank; a rank holds "
            f"{held[0] / 2**30:.3g} GiB in stage 0 (2 ranks), {held[1] / 2**30:.3g} GiB in stage 1 (2 ranks)") in line
