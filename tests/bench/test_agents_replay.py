"""The clairvoyant replay of a `kvsched bench agents` run (no server: a run record laid out the way the driver plays
the workload)."""

from dataclasses import replace

import pytest

from kvsched.bench.agents import clairvoyant_bound
from kvsched.bench.agents_driver import RunRecord, TurnRecord, prompt_messages
from kvsched.bench.agents_replay import build_trace, clairvoyant_replay
from kvsched.sim.workload import Topology, WorkloadConfig, generate, shared_system_prompt
from kvsched.tiny_model import ensure_tiny_model

CFG = WorkloadConfig(workflows=2, topology=Topology.HIERARCHICAL, workers=2, rounds=2, worker_turns=2,
                     system_words=40, brief_words=60, tool_words=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model("test", cache_dir=tmp_path_factory.mktemp("models"))


def played(workflows, run_s: float = 0.2) -> RunRecord:
    """Turns sent as the driver sends them: phases in order, each turn after its tool delay, `run_s` per request."""
    record = RunRecord()
    for wf in workflows:
        now = wf.start_s
        for phase in wf.phases:
            ends = []
            for agent in phase.agents:
                lo, hi = phase.turn_slice or (0, len(agent.turns))
                t = now
                for idx in range(lo, hi):
                    t += agent.turns[idx].delay_s
                    record.turns.append(TurnRecord(agent.session_id, idx, 0.05, run_s, 0, 8, sent_s=t))
                    t += run_s
                ends.append(t)
            now = max(ends)
    return record


def test_prompt_messages_rebuild_the_history_the_driver_sends():
    agent = generate(CFG)[0].agents()[1]
    msgs = prompt_messages(agent.system, agent.turns, 2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == shared_system_prompt(CFG)
    assert msgs[3]["content"] == agent.turns[1].user and msgs[4]["content"] == agent.turns[1].assistant
    assert msgs[-1]["content"] == agent.turns[2].user


def test_trace_holds_every_served_turn_and_checks_the_token_counts(model_dir):
    workflows = generate(CFG)
    record = played(workflows)
    trace, mismatches = build_trace(model_dir, workflows, record, block_size=16)
    assert len(trace) == len(record.turns)
    assert mismatches == len(record.turns)  # the record says 0 prompt tokens: every count is flagged
    by_key = {}
    for i in range(len(trace)):
        by_key.setdefault(trace.sessions[trace.session[i]][0], []).append(i)
    # What the server would report: feed the trace's own counts back, then break one.
    counts = {(r.session_id, r.turn_index): 0 for r in record.turns}
    for sid, idx in by_key.items():
        for turn, i in enumerate(idx):
            counts[(sid, turn)] = int(trace.prompt_tokens[i])
    record.turns = [replace(r, prompt_tokens=counts[(r.session_id, r.turn_index)]) for r in record.turns]
    assert build_trace(model_dir, workflows, record, 16)[1] == 0
    record.turns[3] = replace(record.turns[3], prompt_tokens=record.turns[3].prompt_tokens + 1)
    record.turns[4] = replace(record.turns[4], error="APIError: boom")  # not served: not replayed
    trace2, mismatches = build_trace(model_dir, workflows, record, 16)
    assert (mismatches, len(trace2)) == (1, len(record.turns) - 1)
    # A session's next turn starts with its previous prompt's full blocks; generated tokens are never shared.
    for idx in by_key.values():
        for a, b in zip(idx, idx[1:], strict=False):
            prev, cur = trace.blocks(a), trace.blocks(b)
            full = int(trace.prompt_tokens[a]) // 16
            assert list(cur[:full]) == list(prev[:full])
            assert not set(prev[full:]) & set(cur)
    assert trace.end.sum() == sum(len(wf.agents()) for wf in workflows)


def test_belady_bounds_lru_and_kvsched_under_pressure_and_all_meet_with_room(model_dir):
    workflows = generate(CFG)
    record = played(workflows)
    trace, _ = build_trace(model_dir, workflows, record, 16)
    tight = trace.working_set_blocks() // 2  # half of everything: pressure even for Belady
    r = clairvoyant_replay(model_dir, workflows, record, 16, tight, prefill_tok_s=5000.0, bytes_per_token=1024.0)
    assert r["requests"] == len(record.turns) and r["capacity_blocks"] == tight
    assert r["opt"] <= r["kvsched"] and r["opt"] <= r["lru"]
    assert r["opt"] < r["lru"]  # the pool is tight enough for the order to matter
    roomy = clairvoyant_replay(model_dir, workflows, record, 16, 4 * trace.working_set_blocks(), 5000.0, 1024.0)
    assert roomy["lru"] == roomy["kvsched"] == roomy["opt"] < r["opt"]
    assert r["tpot_s"] == pytest.approx((0.2 - 0.05) / 7)


def test_clairvoyant_bound_against_stock():
    side = lambda n, **replay: {"prefill_tokens_computed": n, **({"replay": replay} if replay else {})}  # noqa: E731
    b = clairvoyant_bound({"stock": side(1000, lru=950, kvsched=700, opt=580),
                           "kvsched-no-tier": side(650, lru=900, kvsched=640, opt=560)})
    assert b["opt_over_stock"] == pytest.approx(0.56)
    assert b["opt_on_stock_arrivals_over_stock"] == pytest.approx(0.58)
    assert b["sim_lru_over_stock"] == pytest.approx(0.95)
    assert b["no_tier_share_of_clairvoyant_saving"] == pytest.approx(350 / 440)
    assert clairvoyant_bound({"stock": side(1000), "kvsched-no-tier": side(650)}) == {}


def test_measured_durations_hold_blocks_longer_and_the_trace_file_replays_the_same(model_dir, tmp_path):
    from kvsched.sim.replay import ReplayConfig, replay
    from kvsched.sim.trace import Trace

    workflows = generate(CFG)
    trace, _ = build_trace(model_dir, workflows, played(workflows), 16)
    cap = trace.working_set_blocks() // 2
    quick = clairvoyant_replay(model_dir, workflows, played(workflows, run_s=0.05), 16, cap, 5000.0, 1024.0)
    slow = clairvoyant_replay(model_dir, workflows, played(workflows, run_s=1.5), 16, cap, 5000.0, 1024.0,
                              trace_out=tmp_path / "run.jsonl")
    # Same arrivals' order within a session, but requests that ran 1.5 s overlap more: less room for pins.
    assert slow["opt"] > quick["opt"]
    assert set(slow["time_model"]) == {"lru", "kvsched", "opt"}
    loaded = Trace.load(tmp_path / "run.jsonl")
    assert loaded.duration_s is not None and len(loaded) == slow["requests"]
    cfg = ReplayConfig(capacity_blocks=cap, prefill_tps=5000.0, tpot_s=slow["tpot_s"], bytes_per_token=1024.0)
    assert replay(loaded, "opt", cfg).prefill_tokens_computed == slow["opt"]


def test_kvscheds_replay_runs_the_engines_settings_and_writes_them(model_dir, monkeypatch):
    """Found by review: the replay's kvsched ran the default retention whatever KVSCHED_* settings the engine's sides
    read, and the result did not say which. With every TTL capped at 0 (no pin) kvsched's order is LRU's."""
    workflows = generate(CFG)
    record = played(workflows)
    tight = build_trace(model_dir, workflows, record, 16)[0].working_set_blocks() // 2
    pinned = clairvoyant_replay(model_dir, workflows, record, 16, tight, 5000.0, 1024.0, ttl_s=60.0)
    assert pinned["kvsched"] != pinned["lru"] and pinned["retention"]["max_ttl_s"] == 600  # the default's pins
    monkeypatch.setenv("KVSCHED_MAX_TTL_S", "0")
    unpinned = clairvoyant_replay(model_dir, workflows, record, 16, tight, 5000.0, 1024.0, ttl_s=60.0)
    assert unpinned["kvsched"] == unpinned["lru"] == pinned["lru"]
    assert unpinned["retention"]["max_ttl_s"] == 0
