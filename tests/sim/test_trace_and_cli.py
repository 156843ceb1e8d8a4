"""Traces (JSONL round trip, bad input with line numbers), the seeded generator, and `kvsched simulate`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.sim.generator import QUICK, generate, generate_requests
from kvsched.sim.trace import Trace, TraceRequest, chain_hashes, write_jsonl

SMALL = replace(QUICK, workflows=3, rounds=2, worker_turns=2, session_tokens=(3000, 5000), brief_tokens=(500, 900))


def test_generator_is_deterministic_by_seed():
    a, b, c = generate(SMALL), generate(SMALL), generate(replace(SMALL, seed=1))
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens) and np.array_equal(a.t, b.t)
    assert not np.array_equal(a.prompt_tokens, c.prompt_tokens)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    direct, loaded = generate(SMALL), Trace.load(path)
    assert len(direct) == len(loaded) and direct.working_set_blocks() == loaded.working_set_blocks()
    assert np.array_equal(direct.prompt_tokens, loaded.prompt_tokens)
    for i in (0, len(direct) // 2, len(direct) - 1):
        assert len(direct.blocks(i)) == len(loaded.blocks(i))


def test_chain_hashes_share_exactly_the_common_prefix():
    a = chain_hashes(list(range(40)), 8)
    b = chain_hashes(list(range(24)) + [99] * 16, 8)
    assert len(a) == 5 and a[:3] == b[:3] and a[3] != b[3]
    assert chain_hashes(list(range(40)), 8, salt="x")[0] != a[0]  # cache_salt separates


def test_bad_trace_lines_name_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"kvsched_trace": 1, "block_size": 16}) + "\n"
                    + json.dumps(TraceRequest(0.0, "s", 40, 4, ["x", "y"]).to_json()) + "\n"
                    + json.dumps({"t": 1.0, "session": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: .*prompt_tokens"):
        Trace.load(path)
    (tmp_path / "nohdr.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="header"):
        Trace.load(tmp_path / "nohdr.jsonl")


def test_simulate_generate_quick_writes_the_three_policies(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--generate", "--quick", "--workflows", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for p in ("lru", "kvsched", "opt"):
        assert {"prompt_tokens_total", "prefill_tokens_computed", "hit_rate"} <= result[p].keys()
        assert result[p]["prompt_tokens_total"] == result["lru"]["prompt_tokens_total"]  # same trace for all
    assert result["opt"]["tokens_saved"] >= result["lru"]["tokens_saved"]
    assert result["config"]["pressure"] == pytest.approx(2.0, rel=0.01)


def test_simulate_a_trace_file_and_bad_arguments(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    assert main(["simulate", str(path), "--capacity-blocks", "400", "--policies", "lru,opt"]) == 0
    assert "opt" in capsys.readouterr().out
    assert main(["simulate"]) == 2
    assert main(["simulate", "--generate", "--quick", "--policies", "lru,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.jsonl")]) == 2


def test_requests_share_blocks_only_under_the_same_salt():
    """Found by review: the loader mapped ids alone, so two tenants' equal ids (different cache_salt) shared blocks,
    contrary to docs/trace_schema.md."""
    from kvsched.sim.replay import ReplayConfig, replay

    reqs = [TraceRequest(t, s, 9, 0, ["x1", "x2"], salt=salt)
            for t, s, salt in ((0, "a", "tenantA"), (10, "b", "tenantB"), (20, "c", "tenantA"))]
    trace = Trace.from_requests(4, reqs)
    assert trace.working_set_blocks() == 4 and list(trace.blocks(0)) == list(trace.blocks(2))
    for policy in ("lru", "opt", "kvsched"):
        assert replay(Trace.from_requests(4, reqs[:2]), policy, ReplayConfig(capacity_blocks=16)).hit_tokens == 0
        assert replay(trace, policy, ReplayConfig(capacity_blocks=16)).hit_tokens == 8  # c hits a's blocks


def test_generated_requests_list_the_blocks_vllm_computes_and_the_loader_refuses_more():
    """Found by review: the generator listed the block completed by the last sampled token, whose KV vLLM never
    computes (the engine recorder writes max(p // bs, (p + o - 1) // bs) blocks, as the loader now requires)."""
    trace = generate(QUICK)
    bs = trace.block_size
    for i in range(len(trace)):
        p, o = int(trace.prompt_tokens[i]), int(trace.output_tokens[i])
        assert len(trace.blocks(i)) == max(p // bs, (p + o - 1) // bs)
    assert len(Trace.from_requests(4, [TraceRequest(0, "s", 4, 5, ["a", "b"])]).blocks(0)) == 2  # 8 tokens computed
    with pytest.raises(ValueError, match="last sampled token"):  # 4 + 4 tokens: the 8th is never computed
        Trace.from_requests(4, [TraceRequest(0, "s", 4, 4, ["a", "b"])])
