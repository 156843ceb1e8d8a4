"""KVSCHED_RECORD_TRACE and shared inferred sessions: a turn that repeated a shared session's last prompt is recorded
as such (`joins_pin`), so `kvsched simulate` pins its answer beside the other user's as the engine did, through the
same core code (`kvsched.core.shared_turns.JoinedPins`), instead of re-pinning turn by turn."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, step  # noqa: E402
from kvsched.adapters.vllm.trace_recorder import ENV_RECORD  # noqa: E402
from kvsched.sim.replay import ReplayConfig, replay  # noqa: E402
from kvsched.sim.trace import Trace  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402

FIRST = [*range(100, 164), 500, 501, 502]  # the first prompt both users send: 4 full blocks and 3 tokens


def recording(harness_cfg, clock, tmp_path, monkeypatch):
    """A kvsched scheduler recording its traffic (`KVSCHED_RECORD`) and logging its pin actions: (scheduler, request
    factory, its kvsched part, the pin log)."""
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "shared.jsonl"))
    monkeypatch.setenv("KVSCHED_PAYBACK_SAMPLING", "0")
    s, f = sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    kp = s.kvsched
    kp.recorder.clock = clock
    kp.pins.log = engine = []
    return s, f, kp, engine


def test_a_recorded_shared_session_replays_with_the_engines_union_pin(harness_cfg, clock, tmp_path, monkeypatch):
    """A and B send the same first prompt and get different answers (tokens 7 and 9): the engine pins both chains
    (8 blocks). Before: the recording did not say B's turn joined the pin, so the replay pinned B's chain alone
    (6 blocks) and A's answer went to the LRU there. Now B's line says `joins_pin` and the replay pins 8 blocks."""
    s, f, kp, engine = recording(harness_cfg, clock, tmp_path, monkeypatch)
    for rid, token in (("a1", FAKE_TOKEN), ("b1", 9), ("c1", FAKE_TOKEN)):  # C's answer is A's: it adds nothing
        s.add_request(f.make(FIRST, 40, request_id=rid))
        while s.has_requests():
            step(s, sample=lambda _rid, t=token: t)
        clock.advance(1.0)
    [rec] = kp.policy.sessions.values()
    assert rec.pinned_blocks == 8 and rec.union_pin
    kp.recorder.close()
    lines = [json.loads(x) for x in kp.recorder.path.read_text().splitlines()[1:]]
    assert [x.get("joins_pin", False) for x in lines] == [False, True, True]
    trace = Trace.load(kp.recorder.path)
    cfg = ReplayConfig(capacity_blocks=trace.recorded_capacity_blocks, prefill_tps=float("inf"), tpot_s=0.0,
                       retention=kp.policy.config, check=True, record_applied=True)
    sim = replay(trace, "kvsched", cfg)
    pins = [a.blocks for a in engine if a.op == "pin"]
    assert pins == [6, 8, 8]
    assert [a.blocks for a in sim.applied if a.op == "pin"] == pins
    assert sim.policy_stats["peak_pinned_blocks"] == 8


def test_a_trace_without_the_field_loads_and_never_joins(tmp_path):
    """Old traces (no `joins_pin`) still load; the column is None and the replay joins nothing."""
    path = tmp_path / "old.jsonl"
    path.write_text('{"kvsched_trace": 1, "block_size": 4, "meta": {}}\n'
                    '{"t": 0, "session": "s", "prompt_tokens": 9, "output_tokens": 2, "blocks": [1, 2]}\n'
                    '{"t": 1, "session": "s", "prompt_tokens": 9, "output_tokens": 2, "blocks": [], "reuse": 2, '
                    '"joins_pin": false}\n')
    trace = Trace.load(path)
    assert trace.joins_pin is None and len(trace) == 2
    path.write_text(path.read_text().replace('"joins_pin": false', '"joins_pin": 1'))
    with pytest.raises(ValueError, match="joins_pin"):
        Trace.load(path)


def test_a_recorded_continuation_of_one_answer_replays_with_the_engines_kept_answer(harness_cfg, clock, tmp_path,
                                                                                    monkeypatch):
    """A, then B (answers 7 and 9: the union, 8 blocks), then A's next turn continuing A's answer: the engine pins B's
    chain (6 blocks) under a companion and A's turn's chain (7) under the session (`kvsched.core.shared_answers`);
    the replay of the recording pins the same, through the same core code, and so releases the same at the TTL."""
    s, f, kp, engine = recording(harness_cfg, clock, tmp_path, monkeypatch)
    tokens = {"b1": 9}
    a2 = [*FIRST, *[FAKE_TOKEN] * 40, 700, 701, 702, 703]
    for rid, prompt, n in (("a1", FIRST, 40), ("b1", FIRST, 40), ("a2", a2, 4)):
        s.add_request(f.make(prompt, n, request_id=rid))
        while s.has_requests():
            step(s, sample=lambda r: tokens.get(r, FAKE_TOKEN))
        clock.advance(1.0)
    assert len(kp.pinned) == 2 and kp.policy.counters["shared_answers_kept"] == 1
    kp.recorder.close()
    trace = Trace.load(kp.recorder.path)
    cfg = ReplayConfig(capacity_blocks=trace.recorded_capacity_blocks, prefill_tps=float("inf"), tpot_s=0.0,
                       retention=kp.policy.config, check=True, record_applied=True)
    sim = replay(trace, "kvsched", cfg)
    pins = [(a.op, a.blocks) for a in engine]
    assert pins == [("pin", 6), ("pin", 8), ("pin", 6), ("pin", 7)]
    assert [(a.op, a.blocks) for a in sim.applied if a.op in ("pin", "release")][:4] == pins


def test_with_the_tier_the_replay_pins_and_restores_partial_blocks_as_the_engine(harness_cfg, clock, tmp_path,
                                                                                  monkeypatch):
    """The same three turns with the FP8 tier, then B's next turn (a session of its own): pins and releases identical
    in the engine and the replay (B's turn's finish ends the companion: its answer is back). Partial last blocks: the
    engine loads A's (kept beside while shared) and B's (kept by the companion, `SharedTails.hand_over`), 20 tokens.
    Before: the replay, whose tokens are synthetic, found a partial block through the request's own session only, so
    B's, under another session's companion, was recomputed there (10). Now it also finds the tails a companion keeps
    after the prompt's last full block (`SharedTails.tail_after`), as the engine matches a tail whoever owns it."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "shared.jsonl"))
    monkeypatch.setenv("KVSCHED_PAYBACK_SAMPLING", "0")
    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    f, kp = RequestFactory(BLOCK), s.kvsched
    kp.recorder.clock = clock
    kp.pins.log = engine = []
    tokens = {"b1": 9, "b2": 9}
    rest = [700, 701, 702, 703]
    news = {}
    for rid, prompt, n in (("a1", FIRST, 40), ("b1", FIRST, 40), ("a2", [*FIRST, *[FAKE_TOKEN] * 40, *rest], 4),
                           ("b2", [*FIRST, *[9] * 40, *rest], 4)):
        s.add_request(f.make(prompt, n, request_id=rid))
        while s.has_requests():
            out, _ = step(s, sample=lambda r: tokens.get(r, FAKE_TOKEN))
            news.update({x.req_id: x.num_computed_tokens for x in out.scheduled_new_reqs})
        clock.advance(1.0)
    assert news == {"a1": 0, "b1": 64, "a2": 106, "b2": 106}
    kp.recorder.close()
    trace = Trace.load(kp.recorder.path)
    cfg = ReplayConfig(capacity_blocks=trace.recorded_capacity_blocks, prefill_tps=float("inf"), tpot_s=0.0,
                       retention=kp.policy.config, check=True, record_applied=True, tier_bytes=10**7,
                       tier_block_bytes=10**4)
    sim = replay(trace, "kvsched", cfg)
    assert [(a.op, a.blocks) for a in sim.applied] == [(a.op, a.blocks) for a in engine]
    assert [a.blocks for a in engine if a.op == "pin"] == [6, 8, 6, 7, 7]
    assert [(a.op, a.reason, a.blocks) for a in engine][-1] == ("release", "turn", 6)  # the companion, B back
    assert (sim.hit_tokens, sim.restored_tokens) == (256, 20) and kp.tier.stats["restored_tail_tokens"] == 20
