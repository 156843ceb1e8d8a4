"""`kvsched bench compaction`: arguments and the per-side figures, on synthetic run records (no server)."""

import argparse

import pytest

from kvsched.bench.agents_driver import RunRecord, TurnRecord
from kvsched.bench.compaction import parse_sides, settings, side_result
from kvsched.cli import build_parser


def test_sides_and_bad_settings():
    assert parse_sides("summarize, stock,summarize") == ["summarize", "stock"]
    with pytest.raises(argparse.ArgumentTypeError, match="squash"):
        parse_sides("stock,squash")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "compaction", "--sides", "nope"])
    args = build_parser().parse_args(["bench", "compaction", "--quick", "--trigger-tokens", "0"])
    with pytest.raises(SystemExit, match="trigger"):
        settings(args)
    args = build_parser().parse_args(["bench", "compaction", "--quick", "--sessions", "3"])
    assert settings(args)["sessions"] == 3


def test_peaks_are_per_session_from_usage_and_pins():
    record = RunRecord(turns=[
        TurnRecord("a", 0, 0.1, 0.2, 100, 8), TurnRecord("a", 1, 0.1, 0.2, 300, 8),
        TurnRecord("b", 0, 0.1, 0.2, 500, 8), TurnRecord("b", 1, None, 0.2, 0, 0, error="boom"),
    ], wall_s=1.0)
    before = {"vllm:prompt_tokens_total": 0.0, "vllm:prefix_cache_hits_total": 0.0,
              "kvsched_compaction_summary_calls_total": 1.0}
    after = {"vllm:prompt_tokens_total": 900.0, "vllm:prefix_cache_hits_total": 200.0,
             "kvsched_compaction_summary_calls_total": 4.0}
    out = side_result(record, before, after, pool_tokens=1000, pin_peaks={"a": 256, "b": 480})
    assert out["peak_kv_tokens_per_session"] == (308 + 508) / 2 and out["peak_kv_tokens_max_session"] == 508
    assert out["peak_pinned_tokens_per_session"] == (256 + 480) / 2
    assert out["sessions_pool_holds_at_peak"] == 1 and out["prefill_tokens_computed"] == 700
    assert out["summary_calls"] == 3 and out["errors"] == 1
    stock = side_result(record, before, after, pool_tokens=1000, pin_peaks=None)
    assert "peak_pinned_tokens_per_session" not in stock
