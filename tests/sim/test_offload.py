"""The baseline for the host tier: stock vLLM LRU with its CPU offloading connector (`lru+offload`) on the same host
slots. Off at 0 slots, a host with room for everything serves what an unbounded pool would, a small host keeps the
most recently stored blocks."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from kvsched.sim.generator import QUICK, generate
from kvsched.sim.offload import OffloadLRUPolicy
from kvsched.sim.pool import BlockPool
from kvsched.sim.replay import ReplayConfig, replay

SMALL = replace(QUICK, workflows=3, rounds=2, worker_turns=3, session_tokens=(3000, 6000), brief_tokens=(500, 900))
BLOCK_BYTES = 16 * 1024


def test_no_host_slots_is_plain_lru():
    trace = generate(SMALL)
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True,
                       bytes_per_token=BLOCK_BYTES / SMALL.block_size)  # the pool's pages: BLOCK_BYTES each
    lru = replay(trace, "lru", cfg)
    off = replay(trace, "lru+offload", replace(cfg, tier_bytes=BLOCK_BYTES - 1, tier_block_bytes=BLOCK_BYTES))
    assert (off.hit_tokens, off.restored_tokens, off.evictions) == (lru.hit_tokens, 0, lru.evictions)


def test_a_host_with_room_for_everything_saves_what_an_unbounded_pool_would():
    trace = generate(SMALL)
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True,
                       bytes_per_token=BLOCK_BYTES / SMALL.block_size)  # the pool's pages: BLOCK_BYTES each
    unbounded = replay(trace, "lru", replace(cfg, capacity_blocks=trace.working_set_blocks() + 1024)).tokens_saved
    lru = replay(trace, "lru", cfg).tokens_saved
    big = replay(trace, "lru+offload", replace(cfg, tier_bytes=trace.working_set_blocks() * BLOCK_BYTES,
                                               tier_block_bytes=BLOCK_BYTES))
    assert lru < unbounded and big.restored_tokens > 0
    assert big.tokens_saved == unbounded  # every block a finished request held is on the host when it is asked for
    assert big.policy_stats["host_evicted_blocks"] == 0


def test_the_host_keeps_the_most_recently_stored_or_loaded_blocks():
    trace = generate(SMALL)
    p = OffloadLRUPolicy(trace, BlockPool(trace.n_ids, 8), slots=3)
    p.on_finished(0, np.array([1, 2, 3]))
    assert p.match_external(0, np.array([1, 2, 9]), 0, 3) == 2  # the unbroken run after the device hit
    p.on_finished(0, np.array([4]))  # 3 was least recently used (1 and 2 were just loaded): it goes
    assert list(p.host) == [1, 2, 4] and p.match_external(0, np.array([0, 3]), 1, 1) == 0
    assert p.match_external(0, np.array([1, 2, 4]), 0, 2) == 2  # the limit (the prompt's last token) holds
    p.on_finished(0, np.array([5, 6]))
    assert list(p.host) == [2, 5, 6] and p.stats()["host_evicted_blocks"] == 3


def test_host_slots_and_restores_are_sized_in_the_pools_own_pages():
    """Found by review: the host was counted in FP8 tier blocks, twice the bf16 pages the same bytes hold; stock
    offloading stores the pool's own pages, so a slot and a restore's copy are `bytes_per_token x block_size`."""
    from kvsched.sim.trace import Trace, TraceRequest

    reqs = [TraceRequest(0, "a", 9, 0, ["x1", "x2"]), TraceRequest(10, "b", 9, 0, ["y1", "y2"]),
            TraceRequest(20, "a", 9, 0, ["x1", "x2"])]  # b evicts a's blocks from a 3-block pool; a's return loads 2
    cfg = ReplayConfig(capacity_blocks=3, prefill_tps=1000.0, bytes_per_token=1000.0, tier_bytes=16_000,
                       tier_block_bytes=2000, restore_bytes_per_s=1000.0, check=True)  # a bf16 pool: 4,000-byte pages
    res = replay(Trace.from_requests(4, reqs), "lru+offload", cfg)
    assert res.policy_stats["host_slots"] == 4 and res.restored_tokens == 8
    assert res.ttft_s[-1] == 1 / 1000 + 2 * 4000 / 1000  # one token computed, two 4,000-byte pages copied


@pytest.mark.parametrize("tier", [(), ("--fp8-tier-blocks", "0"), ("--fp8-tier-gib", "1e-9")])
def test_simulate_refuses_an_offload_side_without_host_memory(tmp_path, capsys, tier):
    """Found by review: `--policies lru+offload` with no tier size ran on 0 host slots, a second LRU column."""
    from kvsched.cli import main

    args = ["simulate", "--generate", "--quick", "--workflows", "2", "--no-progress", "--policies", "lru,lru+offload"]
    assert main([*args, *tier]) == 2
    assert "lru+offload" in (err := capsys.readouterr().err) and "--fp8-tier-gib" in err
    out = tmp_path / "r.json"
    assert main([*args, "--fp8-tier-blocks", "100", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lru+offload"]["host_slots"] == 100  # an FP8 pool: a tier block is a page
