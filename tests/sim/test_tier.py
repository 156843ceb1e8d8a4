"""kvsched's FP8 tier in the simulator: off at 0 bytes, and with room for everything the pool drops it serves every
reusable prefix the trace has."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from kvsched.sim.generator import QUICK, generate
from kvsched.sim.replay import ReplayConfig, replay

SMALL = replace(QUICK, workflows=3, rounds=2, worker_turns=3, session_tokens=(3000, 6000), brief_tokens=(500, 900))
BLOCK_BYTES = 16 * 1024  # any positive slot size; the tier's budget is counted in slots of it


def test_a_tier_of_zero_bytes_is_plain_kvsched():
    trace = generate(SMALL)
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True)
    plain = replay(trace, "kvsched", cfg)
    off = replay(trace, "kvsched", replace(cfg, tier_bytes=0, tier_block_bytes=BLOCK_BYTES))
    tiny = replay(trace, "kvsched", replace(cfg, tier_bytes=BLOCK_BYTES - 1, tier_block_bytes=BLOCK_BYTES))  # 0 slots
    for r in (off, tiny):
        assert (r.hit_tokens, r.restored_tokens, r.evictions) == (plain.hit_tokens, 0, plain.evictions)
        assert r.prefill_tokens_computed == plain.prefill_tokens_computed


def test_a_tier_with_room_for_everything_saves_what_an_unbounded_pool_would():
    trace = generate(SMALL)
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True)
    unbounded = replay(trace, "opt", replace(cfg, capacity_blocks=trace.working_set_blocks() + 1024)).tokens_saved
    gpu_only = replay(trace, "opt", cfg).tokens_saved
    plain = replay(trace, "kvsched", cfg)
    big = replay(trace, "kvsched", replace(cfg, tier_bytes=trace.working_set_blocks() * BLOCK_BYTES,
                                           tier_block_bytes=BLOCK_BYTES))
    assert plain.tokens_saved < gpu_only < unbounded  # the pool is short: there is something for the tier to do
    assert big.restored_tokens > 0 and big.tokens_saved == big.hit_tokens + big.restored_tokens
    # everything a pressure release dropped is loaded back (all of it on this trace; only blocks the pool evicts
    # without a release, e.g. a turn's unpinned tail, could still be lost)
    assert big.tokens_saved >= 0.99 * unbounded
    assert big.prefill_tokens_computed == big.prompt_tokens_total - big.tokens_saved


def test_a_middle_sized_tier_is_in_between_and_bounded_by_its_slots():
    trace = generate(SMALL)
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True)
    plain = replay(trace, "kvsched", cfg).tokens_saved
    slots = trace.working_set_blocks() // 10
    mid = replay(trace, "kvsched", replace(cfg, tier_bytes=slots * BLOCK_BYTES, tier_block_bytes=BLOCK_BYTES))
    assert mid.tokens_saved > plain
    assert 0 < mid.policy_stats["peak_tier_blocks"] <= slots


def test_simulate_cli_tier_flags(tmp_path):
    import json

    from kvsched.cli import main

    out = tmp_path / "sim.json"
    assert main(["simulate", "--generate", "--quick", "--workflows", "2", "--fp8-tier-blocks", "5000",
                 "--policies", "kvsched", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["fp8_tier_blocks"] == 5000 and result["kvsched"]["tier_capacity_blocks"] == 5000
    assert result["kvsched"]["tokens_saved"] == result["kvsched"]["prompt_tokens_total"] - \
        result["kvsched"]["prefill_tokens_computed"]
    assert main(["simulate", "--generate", "--quick", "--fp8-tier-gib", "-1"]) == 2


def _two_turns(tail_reuse=None):
    """Block size 4. Turn 0: 6 prompt + 2 output tokens, KV for 7: one full block and a tail of 3 tokens. Turn 1, 10 s
    later, continues it: 12 prompt tokens (vLLM computes the last one itself)."""
    from kvsched.sim.trace import Trace, TraceRequest

    return Trace.from_requests(4, [TraceRequest(0.0, "s", 6, 2, ["a0"]),
                                   TraceRequest(10.0, "s", 12, 1, ["a0", "a1", "a2"], tail_reuse=tail_reuse)])


def test_a_turns_partial_last_block_is_kept_and_loaded_as_much_as_the_next_prompt_repeats():
    cfg = ReplayConfig(capacity_blocks=64, check=True)
    tier = replace(cfg, tier_bytes=64 * BLOCK_BYTES, tier_block_bytes=BLOCK_BYTES)
    plain = replay(_two_turns(), "kvsched", cfg)
    assert plain.prefill_tokens_computed == 6 + (12 - 4)  # the second turn hits its first block only
    full = replay(_two_turns(), "kvsched", tier)
    assert full.restored_tokens == 3 and full.prefill_tokens_computed == 6 + (12 - 4 - 3)
    assert replay(_two_turns(tail_reuse=3), "kvsched", tier).prefill_tokens_computed == full.prefill_tokens_computed
    one = replay(_two_turns(tail_reuse=1), "kvsched", tier)  # the recording says the prompt repeated one of them
    assert one.restored_tokens == 1 and one.prefill_tokens_computed == 6 + (12 - 4 - 1)
    assert replay(_two_turns(tail_reuse=0), "kvsched", tier).restored_tokens == 0
    assert replay(_two_turns(), "lru", tier).prefill_tokens_computed == plain.prefill_tokens_computed  # kvsched's own


def test_a_trace_in_blocks_coarser_than_an_engines_keeps_no_partial_blocks():
    """Mooncake's 512-token ids are a hashing granularity: most of what lies past a request's last full id is full
    engine blocks that LRU would cache too, so the tier is not credited with it. At 128 tokens (an engine's) it is."""
    from kvsched.sim.policies import TAIL_MAX_BLOCK_TOKENS
    from kvsched.sim.trace import Trace, TraceRequest

    def restored(bs):
        trace = Trace.from_requests(bs, [TraceRequest(0.0, "s", bs + bs // 2, 2, ["a0"]),
                                         TraceRequest(10.0, "s", 3 * bs, 1, ["a0", "a1", "a2"])])
        cfg = ReplayConfig(capacity_blocks=64, tier_bytes=64 * BLOCK_BYTES, tier_block_bytes=BLOCK_BYTES)
        return replay(trace, "kvsched", cfg).restored_tokens

    assert restored(TAIL_MAX_BLOCK_TOKENS) == TAIL_MAX_BLOCK_TOKENS // 2 + 1  # half a block of prompt, 1 output
    assert restored(2 * TAIL_MAX_BLOCK_TOKENS) == 0


def test_replicas_split_the_stated_tier_and_report_settings_once(tmp_path):
    """Found by review: with `--replicas N` each replica got the whole stated tier while the pool was split N ways, and
    the replicas' sums added up settings (4 replicas reported a tier block of 4 MiB)."""
    import json

    from kvsched.cli import main

    out = tmp_path / "sim.json"
    args = ["simulate", "--generate", "--quick", "--workflows", "3", "--no-progress", "--capacity-blocks", "8000",
            "--policies", "kvsched,lru+offload", "--out", str(out)]
    assert main([*args, "--fp8-tier-blocks", "1000"]) == 0
    one = json.loads(out.read_text())
    assert main([*args, "--fp8-tier-blocks", "1000", "--replicas", "4"]) == 0
    four = json.loads(out.read_text())
    block = one["kvsched"]["tier_block_bytes"]
    assert four["kvsched"]["tier_block_bytes"] == block == 16 * 65536  # one replica's setting, not the sum
    assert four["config"]["fp8_tier_blocks"] == 1000 and four["config"]["fp8_tier_bytes"] == 1000 * block
    assert four["config"]["fp8_tier_bytes_per_replica"] == 250 * block
    assert four["kvsched"]["tier_capacity_blocks"] == four["lru+offload"]["host_slots"] == 1000  # 4 x 250: the fleet's
    assert four["kvsched"]["peak_tier_blocks"] <= 1000


def test_replicas_sum_counters_and_take_settings_once():
    """The fleet's sums add counters, capacities and peaks; a setting is every replica's (checked); a state each replica
    has its own of (the ledger's TTL cap) is listed per replica."""
    from kvsched.sim.replicas import merge_stats

    parts = [{"pins": 2, "tier_block_bytes": 8, "payback_ttl_cap_s": 30.0},
             {"pins": 3, "tier_block_bytes": 8, "payback_ttl_cap_s": 60.0}]
    settings, states = frozenset({"tier_block_bytes"}), frozenset({"payback_ttl_cap_s"})
    assert merge_stats(parts, settings, states) == {"pins": 5, "tier_block_bytes": 8, "payback_ttl_cap_s": [30.0, 60.0]}
    parts[1]["tier_block_bytes"] = 16
    with pytest.raises(RuntimeError, match="tier_block_bytes"):
        merge_stats(parts, settings, states)
