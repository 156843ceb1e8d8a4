"""The recorder side of `kvsched bench agents` (no server started): its settings, the replay of a recording after the
run's first requests, and the prediction check's arithmetic."""

from __future__ import annotations

import json

from kvsched.bench.agents import parse_sides
from kvsched.bench.agents_recorded import (
    RECORDER_SIDE,
    prediction_check,
    recorded_lines,
    recorder_env,
    replay_recording,
    replay_with_tier,
)
from kvsched.cli import build_parser
from kvsched.core.config import RetentionConfig
from kvsched.sim.trace_record import Finished, TraceRecording

BS = 16


def test_the_recorder_is_a_side_to_ask_for_not_a_default_one(tmp_path):
    assert parse_sides("stock,recorder") == ["stock", RECORDER_SIDE]
    assert RECORDER_SIDE not in build_parser().parse_args(["bench", "agents"]).sides
    env = recorder_env(tmp_path / "r.jsonl")
    assert env["KVSCHED_MAX_TTL_S"] == "0" and env["KVSCHED_RECORD_TRACE"] == str(tmp_path / "r.jsonl")


def _recording(path, probes=3, turns=6):
    """`probes` one-off requests (the throughput probes), then one session's growing turns."""
    with open(path, "w") as f:
        rec = TraceRecording(f, BS, {"capacity_blocks": 64})
        for i in range(probes):
            rec.arrived(f"p{i}", float(i), None, None)
            rec.finished(f"p{i}", i + 0.5, Finished(4 * BS, 1, [f"probe{i}:{k}".encode() for k in range(4)]))
        for t in range(turns):
            rec.arrived(f"t{t}", 10.0 + t, "agent", None)
            n = 3 + 2 * t
            rec.finished(f"t{t}", 10.5 + t, Finished(n * BS, 1, [f"agent:{k}".encode() for k in range(n)]))


def test_the_replay_skips_what_was_recorded_before_the_run(tmp_path):
    path = tmp_path / "r.jsonl"
    assert recorded_lines(path) == 0  # not written yet
    _recording(path)
    assert recorded_lines(path) == 9
    out = replay_recording(path, 3, prefill_tok_s=1000.0, tpot_s=0.01, bytes_per_token=1024.0)
    assert out["requests"] == 6 and out["capacity_blocks"] == 64
    # a big pool: every turn after the first recomputes only its new blocks, under every policy
    prompts = sum((3 + 2 * t) * BS for t in range(6))
    hits = sum((3 + 2 * (t - 1)) * BS for t in range(1, 6))
    assert out["lru"] == out["kvsched"] == out["opt"] == prompts - hits
    assert out["retention"] == RetentionConfig.from_env().as_dict()  # kvsched's settings, with the result
    assert replay_recording(path, 0, 1000.0, 0.01, 1024.0)["requests"] == 9


def test_the_prediction_check_puts_each_measured_side_next_to_its_policys_prediction():
    result = {RECORDER_SIDE: {"prefill_tokens_computed": 100, "recorded_replay": {"lru": 110, "kvsched": 80, "opt": 60}},
              "stock": {"prefill_tokens_computed": 104}, "kvsched-no-tier": {"prefill_tokens_computed": 64}}
    check = prediction_check(result)
    assert check[RECORDER_SIDE] == {"policy": "lru", "measured": 100, "predicted": 110, "predicted_over_measured": 1.1}
    assert check["stock"]["predicted"] == 110 and check["kvsched-no-tier"]["predicted_over_measured"] == 1.25
    assert check["opt_predicted"] == 60 and "kvsched" not in check
    assert prediction_check({"stock": {"prefill_tokens_computed": 1}}) == {}
    json.dumps(check)  # written into the result JSON as is


def _crowded(path, meta, sessions=4, turns=5):
    """Sessions taking turns in a pool of 16 blocks that holds about one of them: they push each other out."""
    with open(path, "w") as f:
        rec = TraceRecording(f, BS, meta)
        for t in range(turns):
            for s in range(sessions):
                rid, at, n = f"s{s}t{t}", 10.0 * t + s, 6 + t
                rec.arrived(rid, at, f"agent{s}", None)
                rec.finished(rid, at + 0.5, Finished(n * BS, 1, [f"a{s}:{k}".encode() for k in range(n)]))


def test_the_tier_sides_prediction_replays_with_its_capacity_in_the_recorded_block_size(tmp_path):
    path = tmp_path / "r.jsonl"
    _crowded(path, {"capacity_blocks": 16, "kv_bytes_per_token": 1024.0, "fp8_tier_block_bytes": 1000})
    recorded = replay_recording(path, 0, 1000.0, 0.01, 1024.0)
    replay_with_tier(recorded, tier_bytes=100 * 1000 + 999)
    assert recorded["tier"]["slots"] == 100 and recorded["tier"]["block_bytes"] == 1000
    assert recorded["tier"]["restored_tokens"] > 0 and recorded["kvsched+tier"] < recorded["kvsched"]
    tiny = replay_with_tier(replay_recording(path, 0, 1000.0, 0.01, 1024.0), tier_bytes=999)  # not one slot
    assert tiny["tier"]["restored_tokens"] == 0 and tiny["kvsched+tier"] == tiny["kvsched"]
    check = prediction_check({RECORDER_SIDE: {"prefill_tokens_computed": 1, "recorded_replay": recorded},
                              "kvsched": {"prefill_tokens_computed": recorded["kvsched+tier"]}})
    assert check["kvsched"]["policy"] == "kvsched+tier" and check["kvsched"]["predicted_over_measured"] == 1.0
    json.dumps(recorded)


def test_a_tier_prediction_needs_the_recorded_tier_block_size(tmp_path):
    import pytest

    path = tmp_path / "old.jsonl"
    _crowded(path, {"capacity_blocks": 16, "kv_bytes_per_token": 1024.0})
    with pytest.raises(ValueError, match="old.jsonl.*no FP8-tier block size"):
        replay_with_tier(replay_recording(path, 0, 1000.0, 0.01, 1024.0), tier_bytes=10**6)


def test_a_recording_whose_header_names_no_pool_is_refused_with_its_path(tmp_path):
    import pytest

    for meta, message in (({}, "names no pool"), ({"capacity_blocks": "lots"}, "capacity_blocks must be an integer")):
        path = tmp_path / "nopool.jsonl"
        with open(path, "w") as f:
            rec = TraceRecording(f, BS, meta)
            rec.arrived("r", 0.0, "s", None)
            rec.finished("r", 1.0, Finished(BS, 1, [b"x"]))
        with pytest.raises(ValueError, match=f"nopool.jsonl.*{message}"):
            replay_recording(path, 0, 1000.0, 0.01, 1024.0)
