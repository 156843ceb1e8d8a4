"""Compaction in the simulator: the server's CompactionStore decides, the trace is rewritten as it would be served."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace

import pytest

from kvsched.core.compaction_config import CompactionConfig, Strategy
from kvsched.sim.compaction import compact_trace, system_tokens_of
from kvsched.sim.generator import QUICK, generate
from kvsched.sim.replay import ReplayConfig, replay

SMALL = replace(QUICK, workflows=3, rounds=2, worker_turns=4, session_tokens=(3000, 6000), brief_tokens=(500, 900))


def per_session(trace):
    out = defaultdict(list)
    for i in range(len(trace)):
        out[trace.sessions[int(trace.session[i])][0]].append(i)
    return out


def test_a_trigger_never_reached_leaves_the_trace_as_it_was():
    trace = generate(SMALL)
    same, stats = compact_trace(trace, CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=10**9))
    assert (stats.summaries, stats.rewritten_requests) == (0, 0)
    assert len(same) == len(trace) and list(same.prompt_tokens) == list(trace.prompt_tokens)
    rename: dict[int, int] = {}  # ids are renumbered; the same blocks must still be shared the same way
    for i in range(len(trace)):
        assert len(same.blocks(i)) == len(trace.blocks(i))
        for a, b in zip(trace.blocks(i), same.blocks(i), strict=True):
            assert rename.setdefault(int(a), int(b)) == int(b)
    assert len(set(rename.values())) == len(rename) == trace.working_set_blocks()
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True)
    assert replay(same, "kvsched", cfg).prefill_tokens_computed == replay(trace, "kvsched", cfg).prefill_tokens_computed


def test_a_trigger_never_reached_keeps_what_a_recording_measured():
    """Found by review: the rewritten trace dropped `duration_s`, `tail_reuse`, `joins_pin` and `compacted`, so on an
    engine's recording the compaction side replayed the time model and another lineage than the kvsched side, and
    differed from it with nothing rewritten (the Mooncake conversation slice with durations: 446,578 prefill tokens,
    not 432,242)."""
    import numpy as np

    trace = generate(SMALL)
    n = len(trace)
    trace = replace(trace, duration_s=0.5 + 3.0 * (np.arange(n) % 7), tail_reuse=np.arange(n) % 3 - 1,
                    joins_pin=np.arange(n) % 5 == 0, compacted=np.arange(n) % 11 == 3)
    same, stats = compact_trace(trace, CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=10**9))
    assert stats.rewritten_requests == 0 and same.duration_s is not None
    assert same.duration_s.tolist() == trace.duration_s.tolist()
    assert same.tail_reuse.tolist() == trace.tail_reuse.tolist() and same.joins_pin.tolist() == trace.joins_pin.tolist()
    assert same.compacted.tolist() == trace.compacted.tolist()
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True, tier_bytes=2**24,
                       tier_block_bytes=2**16)
    a, b = replay(same, "kvsched", cfg), replay(trace, "kvsched", cfg)
    assert (a.prefill_tokens_computed, a.restored_tokens, a.evictions) == (b.prefill_tokens_computed,
                                                                         b.restored_tokens, b.evictions)


def test_summarize_serves_system_summary_and_recent_turns_and_summarises_each_checkpoint_once():
    trace = generate(SMALL)
    cfg = CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=1500, summary_target_tokens=200)
    out, stats = compact_trace(trace, cfg)
    sessions = per_session(out)
    calls = [s for s in sessions if s.endswith("#summary")]
    assert stats.summaries == sum(len(sessions[s]) for s in calls) > 0 and stats.rewritten_requests > 0
    sys_blocks = system_tokens_of(trace) // trace.block_size
    originals = per_session(trace)
    for sid, rows in originals.items():
        served = sessions[sid]
        assert len(served) == len(rows)
        for i, j in zip(rows, served, strict=True):
            assert out.prompt_tokens[j] <= trace.prompt_tokens[i]  # compaction never grows a prompt
            assert list(out.blocks(j)[:sys_blocks]) == list(out.blocks(served[0])[:sys_blocks])  # shared head kept
    shrunk = [sid for sid, rows in originals.items()
              if out.prompt_tokens[sessions[sid][-1]] < trace.prompt_tokens[rows[-1]]]
    assert shrunk, "some session's last turn must be served compacted"
    for s in calls:  # each summary call is made on what the session had just been served (its cached prefix)
        call = sessions[s][0]
        owner = sessions[s[: -len("#summary")]]
        before = max(j for j in owner if out.t[j] <= out.t[call])
        k = min(len(out.blocks(call)), len(out.blocks(before))) - 3  # all but the instruction's blocks
        assert list(out.blocks(call)[:k]) == list(out.blocks(before)[:k])
        assert out.output_tokens[call] == 200 and out.end[call]


def test_sliding_window_makes_no_summary_calls_and_cuts_prompts():
    trace = generate(SMALL)
    out, stats = compact_trace(trace, CompactionConfig(strategy=Strategy.SLIDING_WINDOW, trigger_tokens=1500))
    assert stats.summaries == 0 and stats.rewritten_requests > 0 and len(out) == len(trace)
    assert int(out.prompt_tokens.sum()) < int(trace.prompt_tokens.sum())


def test_compaction_replayed_computes_less_than_kvsched_on_the_full_histories():
    """Sessions growing to ~6-10x the trigger (as in `kvsched bench compaction`); with short sessions a rewrite's
    re-prefill and the summary calls can cost more than they save, which is why the trigger is a setting."""
    trace = generate(replace(QUICK, workflows=2))
    cfg = ReplayConfig(capacity_blocks=math.ceil(trace.working_set_blocks() / 2), check=True)
    out, _ = compact_trace(trace, CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=2000))
    assert replay(out, "kvsched", cfg).prefill_tokens_computed < replay(trace, "kvsched", cfg).prefill_tokens_computed


def test_compaction_needs_a_strategy_that_rewrites_and_a_sane_system_prompt():
    with pytest.raises(ValueError, match="summarize or sliding_window"):
        compact_trace(generate(SMALL), CompactionConfig(strategy=Strategy.CAP))
    with pytest.raises(ValueError, match="system_tokens must be >= 0"):
        compact_trace(generate(SMALL), CompactionConfig(strategy=Strategy.SUMMARIZE), system_tokens=-1)


def test_simulate_cli_compaction_flags(tmp_path):
    from kvsched.cli import main

    out = tmp_path / "sim.json"
    assert main(["simulate", "--generate", "--quick", "--workflows", "2", "--policies", "kvsched",
                 "--compaction", "summarize", "--compaction-trigger-tokens", "3000", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    side = result["kvsched+compaction"]
    assert side["compaction"]["summaries"] > 0
    assert side["prompt_tokens_total"] < result["kvsched"]["prompt_tokens_total"]
    for bad in (["--compaction-trigger-tokens", "0"], ["--compaction-keep-recent", "0"], ["--system-tokens", "-5"]):
        assert main(["simulate", "--generate", "--quick", "--compaction", "summarize", *bad]) == 2


@pytest.mark.parametrize("flag", ["--compaction-trigger-tokens", "--compaction-summary-tokens",
                                  "--compaction-keep-recent", "--system-tokens"])
def test_a_compaction_flag_without_compaction_is_refused(tmp_path, capsys, flag):
    """Found by review: accepted without --compaction, and nothing compacted (no side, no word)."""
    from kvsched.cli import main

    out = tmp_path / "sim.json"
    assert main(["simulate", "--generate", "--quick", "--workflows", "2", "--policies", "kvsched", "--no-progress",
                 flag, "300", "--out", str(out)]) == 2
    assert f"{flag} only applies with --compaction" in capsys.readouterr().err and not out.exists()


def test_compaction_flags_without_compaction_are_named_together(capsys):
    from kvsched.cli import main

    assert main(["simulate", "--generate", "--quick", "--workflows", "2", "--no-progress",
                 "--compaction-keep-recent", "2", "--system-tokens", "10"]) == 2
    assert capsys.readouterr().err == ("kvsched simulate: error: --compaction-keep-recent, --system-tokens only apply "
                                       "with --compaction\n")


def test_sliding_window_refuses_a_summary_size_and_takes_a_trigger_below_the_default_summary(tmp_path, capsys):
    """Found by review: `--compaction sliding_window` took --compaction-summary-tokens silently (a window makes no
    summary), and refused --compaction-trigger-tokens 300 for being below the default summary size it never used."""
    from kvsched.cli import main

    out = tmp_path / "sim.json"
    argv = ["simulate", "--generate", "--quick", "--workflows", "2", "--policies", "kvsched", "--no-progress",
            "--compaction", "sliding_window", "--out", str(out)]
    assert main([*argv, "--compaction-summary-tokens", "300"]) == 2
    assert capsys.readouterr().err == ("kvsched simulate: error: --compaction-summary-tokens only applies with "
                                       "--compaction summarize: sliding_window makes no summary\n")
    assert not out.exists()
    assert main([*argv, "--compaction-trigger-tokens", "300"]) == 0
    side = json.loads(out.read_text())["kvsched+compaction"]
    assert side["compaction"]["windows"] > 0 and side["compaction"]["summaries"] == 0
    assert main([*argv[:-4], "--compaction", "summarize", "--compaction-trigger-tokens", "300"]) == 2
    assert "--compaction-summary-tokens (500) must be smaller than" in capsys.readouterr().err  # summarize's own


@pytest.mark.parametrize("strategy", [Strategy.SUMMARIZE, Strategy.SLIDING_WINDOW])
def test_a_rewritten_turn_ends_the_branch_it_leaves_in_the_replay_as_in_the_engine(strategy):
    """Rewritten requests are marked in the trace (`compacted`, kept through a JSONL round trip); each that starts a
    branch ends the session's branch it left, so no pin is held for a conversation no turn will continue again: those
    pins go at once (released for the end), where the same replay with the marks cleared holds them to their TTLs."""
    trace = generate(SMALL)
    out, stats = compact_trace(trace, CompactionConfig(strategy=strategy, trigger_tokens=1500))
    assert out.compacted is not None and int(out.compacted.sum()) == stats.rewritten_requests > 0
    cfg = ReplayConfig(capacity_blocks=4 * trace.working_set_blocks(), check=True)  # no pressure: only pins decide
    marked = replay(out, "kvsched", cfg)
    unmarked = replay(replace(out, compacted=None), "kvsched", cfg)
    superseded = marked.policy_stats["branches_superseded"]
    m, u = marked.policy_stats, unmarked.policy_stats
    assert superseded == m["branches"] == u["branches"]  # every branch here is a rewrite's, and each left one
    assert u["branches_superseded"] == 0
    assert m["released_end"] == u["released_end"] + superseded  # each left branch's pin goes at once, whole
    assert m["released_blocks_end"] > u["released_blocks_end"]
    assert marked.prefill_tokens_computed == unmarked.prefill_tokens_computed  # nothing continued a left branch


def test_the_compacted_mark_survives_a_jsonl_round_trip(tmp_path):
    from kvsched.sim.trace import TraceRequest, read_jsonl, write_jsonl

    reqs = [TraceRequest(t=0.0, session="s", prompt_tokens=32, output_tokens=0, blocks=["a", "b"], compacted=True),
            TraceRequest(t=1.0, session="s", prompt_tokens=32, output_tokens=0, blocks=["a", "b"])]
    write_jsonl(tmp_path / "t.jsonl", 16, reqs)
    _, back = read_jsonl(tmp_path / "t.jsonl")
    assert [r.compacted for r in back] == [True, False]


def test_with_replicas_the_compaction_side_runs_on_every_replica_and_summaries_on_their_sessions(tmp_path):
    """Found by review: with `--replicas N` the kvsched+compaction side replayed the whole trace on ONE replica's pool
    (1/N of the total) while the other sides ran per replica and were summed."""
    from kvsched.cli import main
    from kvsched.sim.replicas import replica_of_sessions

    cfg = CompactionConfig(strategy=Strategy.SUMMARIZE, trigger_tokens=1500, summary_target_tokens=200)
    compacted, stats = compact_trace(generate(SMALL), cfg)
    assert stats.summaries > 0
    owner = dict(zip((sid for sid, _ in compacted.sessions), replica_of_sessions(compacted, 4).tolist(), strict=True))
    parents = [sid.removesuffix("#summary") for sid in owner if sid.endswith("#summary")]
    assert parents and all(owner[f"{p}#summary"] == owner[p] for p in parents)  # the session's engine makes the call
    out = tmp_path / "r.json"
    assert main(["simulate", "--generate", "--quick", "--replicas", "4", "--compaction", "summarize", "--policies",
                 "lru,kvsched", "--no-progress", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    side, per_replica = r["kvsched+compaction"], r["config"]["capacity_blocks_per_replica"]
    assert sum(side["replica_requests"]) == side["requests"] + side["rejected"] and len(side["replica_requests"]) == 4
    assert side["peak_held_blocks"] > per_replica  # the replicas' peaks add up: more than one replica's pool
    assert side["prefill_tokens_computed"] < r["kvsched"]["prefill_tokens_computed"]  # shorter prompts, same fleet
