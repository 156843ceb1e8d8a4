"""`kvsched trace stats`: a trace's sessions, gaps, repeated prompt share and KV, computed from the requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.sim.trace import Trace, TraceRequest
from kvsched.sim.trace_stats import trace_stats

BS = 4
DATA = Path(__file__).parent / "data"


def _trace(durations: bool) -> Trace:
    """Session a: 3 turns (arrivals 0, 10, 100; each 2 s long), each repeating the last prompt and adding a block;
    session b: one turn; session c: 2 turns of unrelated prompts."""
    d = 2.0 if durations else None
    reqs = [TraceRequest(0.0, "a", 2 * BS, 1, ["a0", "a1"], duration_s=d),
            TraceRequest(10.0, "a", 3 * BS, 1, ["a2"], reuse=2, duration_s=d),
            TraceRequest(100.0, "a", 4 * BS, 1, ["a3"], reuse=3, duration_s=d),
            TraceRequest(5.0, "b", 2 * BS, 1, ["b0", "b1"], duration_s=d),
            TraceRequest(1.0, "c", 1 * BS, 1, ["c0"], duration_s=d),
            TraceRequest(41.0, "c", 1 * BS, 1, ["x0"], duration_s=d)]
    return Trace.from_requests(BS, sorted(reqs, key=lambda r: r.t), meta={"capacity_blocks": 4})


def test_gaps_run_from_a_turns_finish_when_recorded_and_from_its_arrival_otherwise():
    s = trace_stats(_trace(durations=True), ttls=(10.0, 60.0))
    assert (s["requests"], s["sessions"], s["single_turn_sessions"], s["gaps"]) == (6, 3, 1, 3)
    assert s["gap_basis"] == "finish_to_arrival" and s["gap_s"]["p50"] == 38.0 and s["gap_s"]["max"] == 88.0
    assert s["returns_within_ttl"] == {"10": 1 / 3, "60": 2 / 3}  # gaps 8, 38, 88
    a = trace_stats(_trace(durations=False), ttls=(10.0,))
    assert a["gap_basis"] == "arrival_to_arrival" and a["gap_s"]["p50"] == 40.0 and a["returns_within_ttl"] == {"10": 1 / 3}


def test_repeated_share_counts_the_blocks_a_turn_shares_with_its_sessions_previous_one():
    s = trace_stats(_trace(durations=True))
    assert s["prompt_tokens_total"] == 13 * BS
    assert s["repeated_prompt_share"] == (2 + 3) * BS / (13 * BS)  # session a's turns 2 and 3; c's turns share nothing
    assert s["distinct_blocks"] == 8 and s["capacity_blocks"] == 4
    assert s["live_pressure_at_capacity"] == s["peak_live_blocks"] / 4


def test_a_resent_prompt_repeats_its_prompt_not_the_blocks_its_output_completed():
    """Found by review: a session's request sent again (a retry; greedy decoding gave the same answer) shares all its
    blocks with the first, output blocks too, and those counted as repeated prompt tokens: 100% of the prompts (or
    more) repeated where half of them did."""
    reqs = [TraceRequest(0.0, "a", 2 * BS, 3 * BS, ["p0", "p1", "o2", "o3"]),
            TraceRequest(9.0, "a", 2 * BS, 3 * BS, [], reuse=4)]
    s = trace_stats(Trace.from_requests(BS, reqs))
    assert s["repeated_prompt_share"] == 2 * BS / (4 * BS)


def test_the_command_on_an_imported_slice_and_its_errors(tmp_path, capsys):
    out = tmp_path / "conv.jsonl"
    assert main(["trace", "import", "--format", "mooncake", str(DATA / "mooncake_conversation_slice.jsonl"),
                 str(out)]) == 0
    capsys.readouterr()
    assert main(["trace", "stats", str(out), "--json", "--ttl", "30"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["requests"] == len(out.read_text().splitlines()) - 1 and list(stats["returns_within_ttl"]) == ["30"]
    assert main(["trace", "stats", str(out)]) == 0
    assert "sessions" in capsys.readouterr().out
    assert main(["trace", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvsched_trace": 1, "block_size": 4}\n{"t": 0}\n')
    assert main(["trace", "stats", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace", "stats", str(out), "--ttl", "soon"])
    assert main(["trace", "stats", str(out), "--ttl", "-3"]) == 2
