"""KVSCHED_RECORD_TRACE on vLLM's real scheduler (harness.py): the recorded trace loads in the simulator with the
engine's own block structure, an existing file is never overwritten, and a bad path is refused before the engine
starts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle  # noqa: E402
from kvsched.adapters.vllm.settings_check import engine_setting_errors  # noqa: E402
from kvsched.adapters.vllm.trace_recorder import ENV_RECORD  # noqa: E402
from kvsched.cli import main  # noqa: E402
from kvsched.sim.trace import Trace  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402


def _run(s, f, prompts, **kw):
    reqs = [f.make(p, 5, **kw) for p in prompts]
    for r in reqs:
        s.add_request(r)
    run_until_idle(s)
    return reqs


def test_a_recorded_session_replays_with_the_engines_blocks(harness_cfg, clock, tmp_path, monkeypatch):
    path = tmp_path / "rec.jsonl"
    path.write_text("someone else's file\n")
    monkeypatch.setenv(ENV_RECORD, str(path))
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.kvsched.recorder.clock = clock
    history = list(range(100, 180))  # 80 tokens: 5 full blocks
    for turn in range(3):
        _run(s, f, [history], session_id="agent-1", cache_salt="tenant-salt", xargs={"agent_role": "worker"})
        clock.advance(2.0)
        history = history + [7] * 4 + list(range(300 + 20 * turn, 320 + 20 * turn))  # output + a tool result
    _run(s, f, [[900 + i for i in range(40)]])  # a request of no session
    s.kvsched.recorder.close()
    assert path.read_text() == "someone else's file\n"  # never overwritten: the recording went beside it
    rec = tmp_path / "rec.1.jsonl"
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    header, body = lines[0], lines[1:]
    assert header["block_size"] == BLOCK and header["meta"]["capacity_blocks"] == 63
    assert len(body) == 4 and "agent-1" not in rec.read_text() and "tenant-salt" not in rec.read_text()
    turns = [x for x in body if x.get("role") == "worker"]
    assert [x["prompt_tokens"] for x in turns] == [80, 104, 128] and all(x["output_tokens"] == 5 for x in turns)
    assert [x.get("reuse", 0) for x in turns] == [0, 5, 6]  # each turn repeats the last prompt's full blocks
    assert [x["t"] for x in turns] == [0.0, 2.0, 4.0] and len({x["session"] for x in turns}) == 1
    trace = Trace.load(rec)
    # every request's full blocks with KV: prompt + output - 1 tokens (the last sampled token was never fed back)
    assert [len(trace.blocks(i)) for i in range(len(trace.t))] == [5, 6, 8, 2]
    assert list(trace.blocks(1)[:5]) == list(trace.blocks(0)) and list(trace.blocks(2)[:6]) == list(trace.blocks(1))
    # and the simulator replays it at the engine's pool: every later turn hits its session's earlier blocks
    out = tmp_path / "sim.json"
    assert main(["simulate", str(rec), "--capacity-blocks", "63", "--policies", "lru,kvsched", "--out", str(out)]) == 0
    sim = json.loads(out.read_text())
    assert sim["lru"]["requests"] == sim["kvsched"]["requests"] == 4
    assert sim["lru"]["prompt_tokens_total"] == 80 + 104 + 128 + 40 and sim["kvsched"]["tokens_saved"] >= (5 + 6) * BLOCK


def test_a_missing_directory_is_refused_before_the_engine_starts(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "no-such-dir" / "rec.jsonl"))
    assert any(ENV_RECORD in e and "does not exist" in e for e in engine_setting_errors())
    monkeypatch.setenv(ENV_RECORD, str(tmp_path))
    assert any(ENV_RECORD in e and "directory" in e for e in engine_setting_errors())
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "ok.jsonl"))
    assert not [e for e in engine_setting_errors() if ENV_RECORD in e]
