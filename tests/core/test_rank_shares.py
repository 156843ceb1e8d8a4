"""An engine's byte figures from its first rank's under tensor and uneven pipeline parallelism
(kvsched.core.rank_shares).
The partitions are vLLM 0.32's own (get_pp_indices; tests/adapters/vllm/test_rank_shares_pp.py reads them from it)."""

from __future__ import annotations

import pytest

from kvsched.core.rank_shares import RankShares


def test_no_pipeline_parallelism_is_every_rank_alike() -> None:
    shares = RankShares(4)
    assert shares.engine(1000) == 4000 and shares.largest_rank(1000) == 1000
    assert shares.first_rank_budget(10_000, 4) == shares.first_rank_budget(10_000, 2) == 10_000
    assert shares.engine(0.5) == 2.0


def test_two_uneven_stages_count_each_stages_own_layers() -> None:
    """27 layers in two stages: vLLM gives the first 14, the second 13. TP=2 in each: 4 ranks. The first rank's
    14,000 bytes (1,000 a layer): the engine holds 2 x 27,000, not 4 x 14,000 (3.7% high)."""
    shares = RankShares(4, (14, 13))
    assert shares.engine(14_000) == 54_000 and shares.engine(14_000.0) == 54_000.0
    assert shares.largest_rank(14_000) == 14_000  # stage 0 holds the most
    # every rank on the host: 4 x 1,000,000 bytes hold 74 slots of the engine's 54,000 bytes (71 of 56,000 before)
    assert shares.first_rank_budget(1_000_000, 4) // 14_000 == 4_000_000 // 54_000 == 74
    assert shares.first_rank_budget(1_000_000, 2) == 1_000_000  # a stage per host: the first holds the most


def test_a_later_stage_holding_more_layers_bounds_the_slots() -> None:
    """30 layers in four stages: 7, 8, 8, 7. The first rank's 7,000 bytes a block: the engine holds 30,000 (counted
    as 28,000 before), the largest ranks 8,000. On one host, 4 x 80,000 bytes hold 10 slots (11 before: 330,000
    bytes); a stage per host, a rank's 80,000 bytes hold 10 on the middle stages (11 before: 88,000)."""
    shares = RankShares(4, (7, 8, 8, 7))
    assert shares.engine(7000) == 30_000 and shares.largest_rank(7000) == 8000
    assert shares.first_rank_budget(80_000, 4) // 7000 == 320_000 // 30_000 == 10
    assert shares.first_rank_budget(80_000, 1) == 70_000 and 70_000 // 7000 * shares.largest_rank(7000) <= 80_000
    assert 80_000 // 7000 == 11  # stage 0's bytes alone


@pytest.mark.parametrize(("world", "layers"), [(0, ()), (2, (0, 3)), (2, (3, -1)), (3, (2, 2))])
def test_impossible_layouts_are_refused(world, layers) -> None:
    with pytest.raises(ValueError, match="ranks"):
        RankShares(world, layers)


def test_a_later_stage_without_layers_holds_no_kv() -> None:
    """A stage of 0 layers (VLLM_PP_LAYER_PARTITION=3,0) holds no KV: counted as 0 bytes, never a division by zero.
    vLLM 0.32 splits the layers so but cannot size such a stage's KV cache, so kvsched refuses the partition before the
    engine starts (`partition_refusal`, below); this keeps the arithmetic safe for a vLLM that serves it."""
    shares = RankShares(2, (3, 0))
    assert shares.rank_bytes(300) == ((1, 300), (1, 0))
    assert shares.engine(300) == 300 and shares.largest_rank(300) == 300
    assert shares.first_rank_budget(1000, 2) == 2000 and shares.first_rank_budget(1000, 1) == 1000


def test_each_stages_ranks_and_their_bytes() -> None:
    assert RankShares(4, (7, 8, 8, 7)).rank_bytes(7000) == ((1, 7000), (1, 8000), (1, 8000), (1, 7000))
    assert RankShares(4, (14, 13)).rank_bytes(14_000) == ((2, 14_000), (2, 13_000))
    assert RankShares(2).rank_bytes(5) == ((2, 5),)


@pytest.mark.parametrize(("shares", "host_ranks"), [(RankShares(1), 1), (RankShares(4), 4), (RankShares(4), 2),
                                                    (RankShares(4, (2, 3)), 4), (RankShares(4, (2, 3)), 2),
                                                    (RankShares(4, (14, 13)), 4), (RankShares(4, (7, 8, 8, 7)), 4),
                                                    (RankShares(4, (7, 8, 8, 7)), 1)])
def test_the_least_host_budget_holds_one_slot_and_a_byte_less_per_rank_none(shares, host_ranks) -> None:
    """What the tier's warning asks for when the size given holds no slot (it asked for the first rank's block on each
    rank: 4 x 6,000 bytes for 2 + 3 layers on 4 ranks of a host, which hold none of the engine's 30,000)."""
    for block in (6000, 6001, 7):
        least = shares.host_budget_for(block, host_ranks)
        assert least % host_ranks == 0
        assert shares.first_rank_budget(least // host_ranks, host_ranks) >= block
        assert shares.first_rank_budget(least // host_ranks - 1, host_ranks) < block
    assert RankShares(4, (2, 3)).host_budget_for(6000, 4) == 30_000


@pytest.mark.parametrize(("raw", "stages", "said"), [
    ("27,0", 2, "gives pipeline stage 1 0 layers"), ("0,27", 2, "gives pipeline stage 0 0 layers"),
    ("14,-1,14", 3, "stage 1 -1 layers"), ("14;13", 2, "Invalid partition string: 14;13"),
    ("14,13", 3, "len(partitions)=2 does not match pp_size=3"), ("", 1, "Invalid partition string")])
def test_a_partition_vllm_cannot_serve_is_refused_in_its_words(raw, stages, said) -> None:
    """vLLM 0.32 splits layers as VLLM_PP_LAYER_PARTITION says (get_pp_indices), a stage of 0 layers included, but its
    engine core then fails sizing that stage's KV cache (get_kv_cache_configs: ZeroDivisionError on the CPU backend's
    layout, AssertionError on block-outer ones, for 2,0 and 0,2 alike): refused before the engine starts."""
    from kvsched.core.rank_shares import partition_refusal

    refusal = partition_refusal(raw, stages)
    assert refusal is not None and refusal.startswith(f"VLLM_PP_LAYER_PARTITION={raw!r}") and said in refusal


def test_a_partition_vllm_serves_is_not_refused() -> None:
    from kvsched.core.rank_shares import partition_refusal

    assert partition_refusal(None, 4) is None  # unset: vLLM's own split, never a stage of 0 for layers >= stages
    assert partition_refusal("14,13", 2) is None and partition_refusal(" 1, 1 ", 2) is None  # int() strips, as vLLM's
    assert partition_refusal("27", 1) is None
