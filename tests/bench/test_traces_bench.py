"""`kvsched bench traces` on the committed Mooncake slices: every side reported as a share of OPT's saving on a pool
sized from the peak live blocks, and the headroom sides' flags on each session's first and last turn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvsched.bench.traces import first_turns, last_turns
from kvsched.cli import main
from kvsched.sim.mooncake import convert_file
from kvsched.sim.trace import Trace

DATA = Path(__file__).parents[1] / "sim" / "data"


def test_bench_traces_on_a_slice(tmp_path, capsys):
    trace = tmp_path / "conv.jsonl"
    convert_file(DATA / "mooncake_conversation_slice.jsonl", trace)
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--pressure", "1.5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["traces"]["conv.jsonl"]["pressures"]["1.5"]
    s = r["share_of_opt_saving"]
    assert set(s) == {"lru", "kvsched", "opt", "kvsched, long TTL", "first turns unpinned", "end oracle"}
    assert s["opt"] == 1.0 and 0 < s["lru"] <= 1.0
    assert r["gate_share"] == s["lru"] + 0.3 * (1 - s["lru"])
    assert r["capacity_blocks"] == -(-r["peak_live_blocks"] * 2 // 3) and r["peak_live_blocks"] < r["distinct_blocks"]
    assert "gate" in capsys.readouterr().out


def test_headroom_flags_mark_each_sessions_first_and_last_turn(tmp_path):
    path = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", path)
    t = Trace.load(path)
    first, last = first_turns(t), last_turns(t)
    assert first.sum() == last.sum() == len(t.sessions)
    for s in range(len(t.sessions)):
        idx = np.flatnonzero(t.session == s)
        assert first[idx].tolist() == [True] + [False] * (len(idx) - 1)
        assert last[idx].tolist() == [False] * (len(idx) - 1) + [True]


def test_missing_default_traces_are_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    assert main(["bench", "traces"]) == 2
    assert "kvsched trace fetch mooncake" in capsys.readouterr().out
