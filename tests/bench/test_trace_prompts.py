"""`kvsched bench replay`'s prompts: a trace's block ids become token blocks an engine caches exactly as the trace says
(shared ids, shared tokens; different ids, different tokens), at the trace's arrival times and scaled lengths."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from kvsched.bench.trace_engine import sides_arg
from kvsched.bench.trace_prompts import FIRST_TOKEN, block_tokens_of, plan, window
from kvsched.sim.trace import Trace, TraceRequest

BS = 512  # Mooncake's block size
K = 32


def req(t, session, blocks, prompt, output=100, reuse=0):
    return TraceRequest(t=t, session=session, prompt_tokens=prompt, output_tokens=output, blocks=blocks, reuse=reuse)


def trace_of(*requests):
    return Trace.from_requests(BS, requests)


def shared_tokens(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_an_id_is_the_same_tokens_wherever_it_appears_and_ids_differ():
    ids = np.array([0, 1, 2, 1, 0])
    toks = block_tokens_of(ids, K, 2048)
    assert toks.shape == (5, K)
    assert (toks[0] == toks[4]).all() and (toks[1] == toks[3]).all()
    assert len({tuple(r) for r in toks}) == 3
    assert toks.min() >= FIRST_TOKEN and toks.max() < 2048 - FIRST_TOKEN
    assert (block_tokens_of(np.array([7]), K, 2048) == block_tokens_of(np.array([7]), K, 2048)).all()


def test_a_session_turn_repeats_exactly_its_shared_blocks_and_other_sessions_only_theirs():
    # s1's second turn repeats its first turn's 3 blocks (prompt 2.5 blocks + output completing the third) and adds 2;
    # s2 shares only the first block (a system prompt) with s1.
    t = trace_of(req(0.0, "s1", ["a", "b", "c"], prompt=2 * BS + BS // 2, output=BS),
                 req(5.0, "s1", ["d", "e"], prompt=5 * BS, reuse=3),
                 req(1.0, "s2", ["a", "x"], prompt=2 * BS))
    p = plan(t, K, 2048)
    by_session = [(r.session, r) for r in p.requests]
    assert [s for s, _ in by_session] == ["s1", "s2", "s1"]  # arrival order
    first, other, second = (r for _, r in by_session)
    assert len(first.prompt) == 2 * K + K // 2 and first.blocks == 2
    assert len(second.prompt) == 5 * K and second.blocks == 5
    # the first turn's 2 full blocks and its tail (the start of block "c", which its output completes) repeat
    assert shared_tokens(first.prompt, second.prompt) == 2 * K + K // 2
    assert shared_tokens(first.prompt, other.prompt) == K  # block "a" only
    assert [r.at_s for r in p.requests] == [0.0, 1.0, 5.0]
    assert first.max_tokens == K and other.max_tokens == -(-100 * K // BS)  # output lengths scale too


def test_time_scale_window_and_the_longest_requests_left_out():
    t = trace_of(req(10.0, "s1", ["a"], prompt=BS), req(12.0, "s2", ["b"], prompt=BS),
                 req(30.0, "s3", [f"c{i}" for i in range(300)], prompt=300 * BS))
    w = window(t, 1.0, 10.0)  # from 11 s to 21 s after the first arrival (at 10 s)
    assert len(w) == 1 and w.sessions[int(w.session[0])][0] == "s2"
    p = plan(t, K, 2048, time_scale=0.5, max_tokens_per_request=4096)
    assert [r.at_s for r in p.requests] == [0.0, 1.0]
    assert p.dropped_long == 1 and p.kept.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="no request arrives"):
        window(t, 100.0, 5.0)
    with pytest.raises(ValueError):
        window(t, 0.0, 0.0)
    with pytest.raises(ValueError):
        plan(t, 0, 2048)


def test_a_prompt_off_a_block_boundary_stays_off_it_in_the_engine():
    # 15 tokens past 2 blocks scale to under one engine token: rounded down, the engine prompt would be 2 whole blocks
    # and vLLM could not hit the second (it computes the last token) where the trace's next turn can
    t = trace_of(req(0.0, "s1", ["a", "b", "c"], prompt=2 * BS + 15, output=BS),
                 req(1.0, "s1", ["d"], prompt=4 * BS, reuse=3),
                 req(2.0, "s2", ["e", "f"], prompt=2 * BS + BS - 1, output=1),
                 req(3.0, "s3", ["g", "h"], prompt=2 * BS))
    first, second, nearly, aligned = plan(t, K, 2048).requests
    assert len(first.prompt) == 2 * K + 1 and first.prompt[-1] == second.prompt[2 * K]  # the start of block "c"
    assert len(nearly.prompt) == 2 * K + K - 1  # never rounded up to a whole block
    assert len(aligned.prompt) == 2 * K


def test_one_id_with_two_salts_is_two_sessions():
    t = Trace.from_requests(BS, [TraceRequest(t=0.0, session="u", prompt_tokens=BS, output_tokens=4, blocks=["a"],
                                              salt="A"),
                                 TraceRequest(t=1.0, session="u", prompt_tokens=BS, output_tokens=4, blocks=["b"],
                                              salt="B"),
                                 TraceRequest(t=2.0, session="v", prompt_tokens=BS, output_tokens=4, blocks=["c"])])
    assert [r.session for r in plan(t, K, 2048).requests] == ["u@A", "u@B", "v"]


def test_peak_live_blocks_counts_the_kept_requests_reuse():
    t = trace_of(req(0.0, "s1", ["a", "b"], prompt=2 * BS), req(1.0, "s2", ["x"], prompt=BS),
                 req(2.0, "s1", ["c"], prompt=3 * BS, reuse=2))
    assert plan(t, K, 2048).peak_live_blocks == 2  # s1's two blocks live from its first turn to its second


def test_sides_are_checked():
    assert sides_arg("stock,kvsched") == ["stock", "kvsched"]
    with pytest.raises(ValueError, match="unknown"):
        sides_arg("stock,lru")
    with pytest.raises(ValueError):
        sides_arg(" , ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--sides", "stock,lru"], "--sides"), (["--pressure", "0"], "--pressure"), (["--pressure", "nan"], "--pressure"),
    (["--seconds", "0"], "--seconds"), (["--start-s", "1e9"], "no request arrives"),
    (["--time-scale", "0"], "time-scale"), (["--time-scale", "inf"], "time-scale"),
    (["--max-output-tokens", "0"], "--max-output-tokens"),
])
def test_bench_replay_refuses_bad_options_before_starting_a_server(tmp_path, capsys, argv, message):
    from kvsched.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n')
    assert main(["bench", "replay", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched bench replay: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("pressure", ["1e-320", "1e-300"])
def test_bench_replay_refuses_a_pressure_that_sizes_a_pool_past_any_count(tmp_path, capsys, pressure):
    """Found by review: 1e-320 (the peak live blocks over it: infinity) was an OverflowError traceback; 1e-300 would
    have started vLLM with a pool of ~10**300 blocks."""
    from kvsched.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n'
                    '{"t": 9, "session": "a", "prompt_tokens": 1536, "output_tokens": 4, "blocks": ["x", "y", "z"]}\n')
    assert main(["bench", "replay", str(path), "--pressure", pressure]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched bench replay: error: --pressure") and "Traceback" not in err


@pytest.mark.parametrize("sides", ["stock", "kvsched,stock-same-memory"])
def test_bench_replay_refuses_a_pool_past_the_hosts_memory_before_any_server_starts(tmp_path, sides):
    """Found by review: a pool under MAX_COUNT passed however large, and vLLM allocates a --num-gpu-blocks-override
    pool whole (vllm/v1/core/kv_cache_utils.py, may_override_num_blocks): a --pressure of 1e-6 asked the same-memory
    side of this 3-request trace for 183 GiB of KV cache (6,000,001 blocks of 32 KiB)."""
    from kvsched.bench.replay_memory import host_memory_bytes
    from kvsched.bench.trace_engine import prepare

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n'
                    '{"t": 9, "session": "a", "prompt_tokens": 1536, "output_tokens": 4, "blocks": ["x", "y", "z"]}\n')
    args = argparse.Namespace(trace=path, start_s=0.0, seconds=60.0, time_scale=1.0, pressure=1e-6, sides=sides,
                              max_output_tokens=4, model_size="test", out=None)
    with pytest.raises(ValueError, match=r"--pressure 1e-06 makes a pool of \d+ blocks, .* GiB of KV cache: past "
                                         r"this host's .* GiB of memory"):
        prepare(args)
    args.pressure = 1.0
    assert prepare(args).num_blocks * 32 * 1024 < host_memory_bytes()  # a pool that fits: taken


def test_bench_replay_refuses_a_missing_trace_a_directory_and_an_out_directory(tmp_path, capsys):
    from kvsched.cli import main

    assert main(["bench", "replay", str(tmp_path / "none.jsonl")]) == 2
    assert "no trace at" in capsys.readouterr().err
    assert main(["bench", "replay", str(tmp_path)]) == 2  # a directory: an OSError, one line
    assert "Traceback" not in capsys.readouterr().err
    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n')
    assert main(["bench", "replay", str(path), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_the_pool_holds_one_request_of_max_model_len_at_any_pressure(tmp_path):
    """Found at stop 52: a 60-s window at 1.5x sized the pool by its longest request (+ 4 blocks), fewer blocks than
    max_model_len (rounded up to 256 tokens) needs, and vLLM refused to start. Its usable blocks now hold it."""
    import argparse

    from kvsched.bench.trace_engine import BLOCK_TOKENS, prepare

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 5120, "output_tokens": 4, "blocks": '
                    + str([f"b{i}" for i in range(10)]).replace("'", '"') + "}\n")
    args = argparse.Namespace(trace=path, start_s=0.0, seconds=60.0, time_scale=1.0, pressure=100.0, sides="stock",
                              max_output_tokens=64, model_size="test", out=None)
    setup = prepare(args)
    assert (setup.num_blocks - 1) * BLOCK_TOKENS >= setup.max_model_len


def test_bench_replay_refuses_an_out_naming_its_trace_before_starting_a_server(tmp_path):
    """Found by review: only a directory was refused; --out naming the trace itself passed, and the JSON written
    after the first side replaced the trace."""
    import argparse

    from kvsched.bench.trace_engine import prepare

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n')
    args = argparse.Namespace(trace=path, start_s=0.0, seconds=300.0, time_scale=1.0, pressure=1.5, sides="stock",
                              max_output_tokens=64, model_size="test", out=tmp_path / "." / "t.jsonl")
    with pytest.raises(ValueError, match="would overwrite the input"):
        prepare(args)


def test_bench_replay_refuses_a_retention_setting_before_starting_a_server(tmp_path, monkeypatch):
    """Found by review: the simulator read KVSCHED_* only after every side had run (`--sides stock`: stock vLLM ignores
    them), and a malformed one was a traceback then."""
    import argparse

    from kvsched.bench.trace_engine import prepare

    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 512}\n'
                    '{"t": 0, "session": "a", "prompt_tokens": 1024, "output_tokens": 4, "blocks": ["x", "y"]}\n')
    args = argparse.Namespace(trace=path, start_s=0.0, seconds=300.0, time_scale=1.0, pressure=1.5, sides="stock",
                              max_output_tokens=64, model_size="test", out=None)
    monkeypatch.setenv("KVSCHED_DEFAULT_TTL_S", "nan")
    with pytest.raises(ValueError, match="KVSCHED_DEFAULT_TTL_S"):
        prepare(args)
