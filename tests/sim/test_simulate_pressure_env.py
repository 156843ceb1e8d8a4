"""`kvsched simulate`: pools sized from the peak live blocks (`--pressure-basis live`), and the kvsched side's
retention settings from the engine's `KVSCHED_*` variables."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kvsched.cli import main
from kvsched.sim.generator import QUICK, generate_requests
from kvsched.sim.trace import Trace, TraceRequest, write_jsonl

SMALL = replace(QUICK, workflows=3, rounds=2, worker_turns=2, session_tokens=(3000, 5000), brief_tokens=(500, 900))


def test_peak_live_blocks_counts_blocks_between_their_first_and_last_use():
    # a: blocks 1,2 (then used again by c); b: blocks 3,4,5 used once; c: 1,2,6; d: 7 once; e: 6 again.
    reqs = [TraceRequest(0, "a", 32, 0, [1, 2]), TraceRequest(1, "b", 48, 0, [3, 4, 5]),
            TraceRequest(2, "c", 48, 0, [1, 2, 6]), TraceRequest(3, "d", 16, 0, [7]),
            TraceRequest(4, "e", 48, 0, [1, 2, 6])]
    trace = Trace.from_requests(16, reqs)
    assert trace.working_set_blocks() == 7
    # live at c: 1, 2 (used at a and again at e) and 6 (c to e): 3; blocks 3, 4, 5 and 7 are never reused
    assert trace.peak_live_blocks() == 3
    assert Trace.from_requests(16, reqs[:2]).peak_live_blocks() == 0


def run_sim(tmp_path, *extra: str) -> dict:
    path, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    if not path.exists():
        write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    assert main(["simulate", str(path), "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_pressure_basis_live_sizes_the_pool_from_the_peak_live_set(tmp_path):
    distinct = run_sim(tmp_path, "--pressure", "1.5", "--policies", "lru")["config"]
    live = run_sim(tmp_path, "--pressure", "1.5", "--pressure-basis", "live", "--policies", "lru")["config"]
    assert distinct["peak_live_blocks"] == live["peak_live_blocks"] < live["working_set_blocks"]
    assert live["capacity_blocks"] == -(-live["peak_live_blocks"] * 2 // 3)
    assert live["pressure"] == live["pressure_live"] == pytest.approx(1.5, rel=0.01)
    assert distinct["pressure"] == distinct["pressure_distinct"] == pytest.approx(1.5, rel=0.01)
    assert live["pressure_distinct"] > live["pressure_live"]


def test_retention_settings_come_from_the_engine_variables(tmp_path, monkeypatch):
    base = run_sim(tmp_path, "--pressure", "2", "--policies", "lru,kvsched")
    assert base["config"]["retention"]["default_ttl_s"] == 30.0
    assert base["kvsched"]["pins"] > 0
    monkeypatch.setenv("KVSCHED_MAX_TTL_S", "0")  # caps every TTL (hints too): no pins, kvsched is LRU block for block
    off = run_sim(tmp_path, "--pressure", "2", "--policies", "lru,kvsched")
    assert off["config"]["retention"]["max_ttl_s"] == 0.0 and off["kvsched"]["pins"] == 0
    assert off["kvsched"]["prefill_tokens_computed"] == off["lru"]["prefill_tokens_computed"]
    assert base["kvsched"]["prefill_tokens_computed"] != off["kvsched"]["prefill_tokens_computed"]


def test_a_bad_variable_is_a_clear_error(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "t.jsonl", SMALL.block_size, generate_requests(SMALL))
    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "lots")
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    assert "KVSCHED_PIN_BUDGET_FRACTION" in capsys.readouterr().err


def test_replicas_keep_each_session_on_one_replica_and_sum_their_sides(tmp_path):
    import numpy as np

    from kvsched.sim.generator import generate
    from kvsched.sim.replay import ReplayConfig, replay
    from kvsched.sim.replicas import replay_replicas, replica_of_sessions

    trace = generate(SMALL)
    owner = replica_of_sessions(trace, 3)
    assert set(owner.tolist()) <= {0, 1, 2} and len(set(owner.tolist())) > 1
    assert np.array_equal(owner, replica_of_sessions(trace, 3))  # the ring is deterministic across calls
    cfg = ReplayConfig(capacity_blocks=400)
    total, served = replay_replicas(trace, "lru", cfg, 3)
    assert sum(served) == len(trace) == total.requests + total.rejected
    parts = [replay(trace.subset(owner[trace.session] == r), "lru", cfg) for r in range(3)]
    assert total.hit_tokens == sum(p.hit_tokens for p in parts)
    assert total.prompt_tokens_total == int(trace.prompt_tokens.sum())
    # one replica is the plain replay
    one, _ = replay_replicas(trace, "kvsched", cfg, 1)
    assert one.hit_tokens == replay(trace, "kvsched", cfg).hit_tokens
    with pytest.raises(ValueError, match="replicas"):
        replica_of_sessions(trace, 0)


def test_a_replicas_state_is_listed_at_its_index_and_none_for_a_replica_that_served_nothing():
    """Found by review: a replica that served no request was left out of `payback_ttl_cap_s`, so the list had fewer
    entries than replicas and its entry k was not replica k's (`replica_requests` lists every replica)."""
    from kvsched.sim.generator import generate
    from kvsched.sim.replay import ReplayConfig, replay
    from kvsched.sim.replicas import replay_replicas, replica_of_sessions

    trace = generate(SMALL)
    replicas = 4 * len(trace.sessions)  # more replicas than sessions: some serve nothing
    owner = replica_of_sessions(trace, replicas)
    cfg = ReplayConfig(capacity_blocks=400)
    total, served = replay_replicas(trace, "kvsched", cfg, replicas)
    caps = total.policy_stats["payback_ttl_cap_s"]
    assert len(caps) == len(served) == replicas and 0 in served
    for r in range(replicas):
        alone = replay(trace.subset(owner[trace.session] == r), "kvsched", cfg) if served[r] else None
        assert caps[r] == (alone.policy_stats["payback_ttl_cap_s"] if alone else None)


def test_simulate_replicas_splits_the_pool(tmp_path):
    r = run_sim(tmp_path, "--capacity-blocks", "900", "--replicas", "3")
    c = r["config"]
    assert c["replicas"] == 3 and c["capacity_blocks_per_replica"] == 300 and c["capacity_blocks"] == 900
    assert sum(r["lru"]["replica_requests"]) == c["requests"]
    assert r["opt"]["tokens_saved"] >= r["lru"]["tokens_saved"]
    single = run_sim(tmp_path, "--capacity-blocks", "900")
    assert single["lru"]["tokens_saved"] >= r["lru"]["tokens_saved"]  # one 900-block pool shares what 3 of 300 cannot


def test_a_recordings_own_pool_is_the_default_and_pressure_still_overrides_it(tmp_path):
    path, out = tmp_path / "rec.jsonl", tmp_path / "r.json"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL), meta={"capacity_blocks": 777})  # its largest
    # request takes 313 blocks: a pool that rejects every request is an error
    at_pressure_2 = -(-Trace.load(path).working_set_blocks() // 2)
    for extra, expect in (((), 777), (("--pressure", "2"), at_pressure_2)):
        assert main(["simulate", str(path), "--no-progress", "--policies", "lru", "--out", str(out), *extra]) == 0
        assert json.loads(out.read_text())["config"]["capacity_blocks_per_replica"] == expect
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, SMALL.block_size, generate_requests(SMALL))
    assert main(["simulate", str(plain), "--no-progress", "--policies", "lru", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["capacity_blocks_per_replica"] == -(
        -Trace.load(plain).working_set_blocks() // 2)  # no recorded pool: pressure 2 as before


def test_a_recordings_own_bytes_size_its_tier_and_a_preset_overrides_them(tmp_path):
    path, out = tmp_path / "rec.jsonl", tmp_path / "r.json"
    meta = {"capacity_blocks": 777, "kv_bytes_per_token": 1024.0, "fp8_tier_block_bytes": 8208}
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL), meta=meta)
    args = ["simulate", str(path), "--no-progress", "--policies", "lru,kvsched", "--fp8-tier-gib", "0.01",
            "--out", str(out)]
    assert main(args) == 0
    c = json.loads(out.read_text())["config"]
    assert c["kv_bytes_per_token"] == 1024 and c["fp8_tier_blocks"] == int(0.01 * 2**30) // 8208
    assert main([*args[:-2], "--kv-gib", "0.01", "--out", str(out)]) == 0  # the pool from the recorded bytes too
    assert json.loads(out.read_text())["config"]["capacity_blocks"] == int(0.01 * 2**30) // (1024 * SMALL.block_size)
    assert main([*args, "--preset", "llama-3.1-8b"]) == 0  # a named model: its bytes (8B, fp8 KV), not the recording's
    c = json.loads(out.read_text())["config"]
    assert c["kv_bytes_per_token"] == 65536 and c["fp8_tier_blocks"] < int(0.01 * 2**30) // 8208


def test_a_recording_without_tier_bytes_keeps_its_bytes_per_token_and_refuses_a_tier(tmp_path, capsys):
    """Found by review: a recording without `fp8_tier_block_bytes` (an engine the FP8 tier does not serve: MLA, sliding
    window) was replayed at the Llama-3.1-8B preset's bytes per token, its own ignored."""
    path, out = tmp_path / "rec.jsonl", tmp_path / "r.json"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL), meta={"kv_bytes_per_token": 1024.0})
    args = ["simulate", str(path), "--no-progress", "--policies", "lru,kvsched", "--out", str(out)]
    assert main([*args, "--kv-gib", "0.01"]) == 0
    c = json.loads(out.read_text())["config"]
    assert c["kv_bytes_per_token"] == 1024 and c["capacity_blocks"] == int(0.01 * 2**30) // (1024 * SMALL.block_size)
    assert c["fp8_tier_bytes"] == 0
    for tier in (("--fp8-tier-gib", "0.01"), ("--fp8-tier-blocks", "10"), ("--host-gib-per-gpu", "64")):
        assert main([*args, *tier]) == 2
        assert "fp8_tier_block_bytes" in (err := capsys.readouterr().err) and "--preset" in err
    assert main([*args, "--fp8-tier-gib", "0"]) == 0  # no tier asked for: nothing to size
    assert main([*args, "--preset", "deepseek-v2-lite"]) == 0  # an MLA preset: no tier, no error (was one)
    assert main([*args, "--preset", "deepseek-v2-lite", "--fp8-tier-gib", "1"]) == 2
    assert "fp8_tier_block_bytes" in capsys.readouterr().err


def test_a_kv_dtype_a_recording_would_ignore_is_refused(tmp_path, capsys):
    """Found by review: `--kv-dtype bf16` on an engine's recording (no --preset) was accepted, and the pool and byte
    figures came from the recording's own bytes per token all the same: the JSON said nothing of the dtype asked for."""
    path, out = tmp_path / "rec.jsonl", tmp_path / "r.json"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL), meta={"kv_bytes_per_token": 1024.0})
    args = ["simulate", str(path), "--no-progress", "--policies", "lru", "--out", str(out)]
    for pool in ([], ["--kv-gib", "0.01"]):
        assert main([*args, *pool, "--kv-dtype", "bf16"]) == 2
        assert "--kv-dtype bf16 applies to a --preset" in (err := capsys.readouterr().err) and err.count("\n") == 1
    assert main([*args, "--kv-dtype", "bf16", "--preset", "llama-3.1-8b"]) == 0  # a named model: its dtype applies
    assert json.loads(out.read_text())["config"]["kv_bytes_per_token"] == 131072
    plain = tmp_path / "plain.jsonl"  # not a recording: the dtype applies to the default preset, as before
    write_jsonl(plain, SMALL.block_size, generate_requests(SMALL))
    assert main([*args[:1], str(plain), *args[2:], "--kv-dtype", "bf16"]) == 0
    assert json.loads(out.read_text())["config"]["kv_bytes_per_token"] == 131072


@pytest.mark.parametrize("recorded", [False, True])
@pytest.mark.parametrize("gib", ["0", "-1", "nan", "inf"])
def test_a_kv_size_that_is_not_a_positive_number_is_a_clear_error(tmp_path, capsys, recorded, gib):
    """Both ways of sizing the pool from --kv-gib (a preset's shape; a recording's own bytes per token) refuse it."""
    path = tmp_path / "t.jsonl"
    meta = {"kv_bytes_per_token": 1024.0, "fp8_tier_block_bytes": 8208} if recorded else {}
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL), meta=meta)
    assert main(["simulate", str(path), "--no-progress", "--policies", "lru", "--kv-gib", gib]) == 2
    assert "--kv-gib must be a positive number of GiB" in capsys.readouterr().err


@pytest.mark.parametrize("pressure", ["1e-320", "1e-300"])
def test_a_pressure_that_sizes_a_pool_past_any_count_is_a_clear_error(tmp_path, capsys, pressure):
    """Found by review: --pressure 1e-320 (the trace's blocks over it: infinity) was an OverflowError traceback, and
    1e-300 replayed a pool of ~10**304 blocks, where --capacity-blocks stops at MAX_COUNT."""
    path = tmp_path / "t.jsonl"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    assert main(["simulate", str(path), "--no-progress", "--policies", "lru", "--pressure", pressure]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched simulate: error: --pressure") and err.count("\n") == 1


def test_a_negative_tail_reuse_is_refused_with_its_line(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 4}\n{"t": 0, "session": "s", "prompt_tokens": 8, '
                    '"blocks": ["a", "b"]}\n{"t": 1, "session": "s", "prompt_tokens": 8, "blocks": ["a", "b"], '
                    '"tail_reuse": -2}\n')
    assert main(["simulate", str(path), "--no-progress", "--policies", "lru"]) == 2
    assert "t.jsonl:3" in (err := capsys.readouterr().err) and "tail_reuse must be an integer" in err


def test_plot_replays_with_the_tables_settings(tmp_path, monkeypatch):
    """Found by review: `--plot` replayed kvsched with the default retention (not KVSCHED_*), on one replica and with
    free restores, so its curves were not the table's policy."""
    from unittest.mock import MagicMock

    import kvsched.bench.plots as plots
    import kvsched.commands.simulate as sim

    calls: list[tuple[tuple, dict]] = []
    real = sim.simulate
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    plt = MagicMock()
    plt.subplots.return_value = (MagicMock(), MagicMock())
    monkeypatch.setattr(plots, "pyplot", lambda: plt)
    monkeypatch.setenv("KVSCHED_MAX_TTL_S", "7")
    r = run_sim(tmp_path, "--policies", "lru,kvsched", "--replicas", "2", "--h2d-gbps", "8", "--fp8-tier-blocks", "64",
                "--plot", str(tmp_path / "plots"))
    (table_args, table), *runs = calls
    assert len(runs) == 7 and table["retention"].max_ttl_s == 7.0
    for args, kwargs in runs:
        assert {k: kwargs.get(k) for k in ("retention", "replicas", "restore_bytes_per_s")} == {
            k: table[k] for k in ("retention", "replicas", "restore_bytes_per_s")}
        assert args[5] == table_args[5] and args[5][0] > 0  # the table's tier
    ws = r["config"]["working_set_blocks"]
    assert runs[-1][0][1] == ws // 2  # the whole working set over 2 replicas


def test_a_plot_path_that_is_a_file_is_refused_before_the_replay(tmp_path, capsys):
    """Found by review: `--plot FILE` failed only after the table's replays, with "File exists", and
    --out was never written."""
    path, out, plot = tmp_path / "t.jsonl", tmp_path / "r.json", tmp_path / "plots.png"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    plot.write_text("")
    argv = ["simulate", str(path), "--no-progress", "--policies", "lru", "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "--plot" in captured.err and "is not a directory" in captured.err and not out.exists()


def test_live_basis_on_a_trace_that_reuses_no_block_says_so(tmp_path, capsys):
    """Found by review: it replayed a one-block pool, rejected every request and said "give a lower --pressure",
    which no pressure could help."""
    path = tmp_path / "once.jsonl"
    write_jsonl(path, 16, [TraceRequest(0, "a", 32, 0, [1, 2]), TraceRequest(1, "b", 48, 0, [3, 4, 5])])
    assert main(["simulate", str(path), "--no-progress", "--pressure-basis", "live", "--policies", "lru"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reuses no block" in err and "--pressure " not in err
    assert main(["simulate", str(path), "--no-progress", "--policies", "lru"]) == 0  # distinct: 5 blocks


def test_a_pool_smaller_than_its_replicas_is_refused(tmp_path, capsys):
    """Found by review: --capacity-blocks 2 --replicas 4 replayed four one-block pools, twice the pool asked for."""
    path = tmp_path / "t.jsonl"
    write_jsonl(path, SMALL.block_size, generate_requests(SMALL))
    assert main(["simulate", str(path), "--no-progress", "--capacity-blocks", "2", "--replicas", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--capacity-blocks 2 cannot be split across --replicas 4" in err
    cfg = run_sim(tmp_path, "--capacity-blocks", "2002", "--replicas", "4", "--policies", "lru")["config"]
    assert cfg["capacity_blocks"] == 2000 and cfg["capacity_blocks_per_replica"] == 500  # what divides, reported
