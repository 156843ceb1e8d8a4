"""An inferred session two users share (`Lineage.shared_join`) on vLLM's real scheduler with kvsched's FP8 tier and its
disk level (no model, no worker: the test acks the disk writes as the worker would). A shared turn's end hint is
ignored (`RetentionPolicy.finish_hints`), so the tier's last-turn cleanup, which follows the applied hints
(`PinApplier.turn_finished` drops the host copies and the tail, `tier.end_session` the disk level's books), leaves the
copies the other user's next turn restores; and a shared turn's role hint leaves the role the session has."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402

FIRST = [*range(100, 164), 500, 501, 502]  # the first prompt both users send: 4 full blocks and 3 tokens


def _ack_disk_writes(s) -> None:
    step(s)  # the turn's writes are planned at its end: the worker writes them (here: acked)
    lv = s.connector.levels
    lv.written([(k, True) for k in list(lv.disk.pending)], disk_full=False)


def test_a_shared_turns_ignored_end_leaves_the_sessions_tier_and_disk_copies(harness_cfg, clock, tmp_path):
    """A's first turn, then B's identical one (joined: shared); the pin expires into the host tier; B's second turn
    repeats B's answer and ends its session. Before (the end applied): the session's host copies, its tail and the
    disk level's blocks went with it, though A's next turn repeats that prefix. Now they stay, under the session."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    tier = kv_transfer_config(0.01, disk_dir=str(tmp_path), disk_gb=0.01)
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    kp, lv = s.kvsched, s.connector.levels
    d = kp.tier.directory
    for _ in range(2):  # A, then B with the same words
        s.add_request(f.make(FIRST, 40))
        run_until_idle(s)
        _ack_disk_writes(s)
    [(key, rec)] = kp.policy.sessions.items()
    assert key.inferred and rec.turns == 2 and rec.pinned
    clock.advance(rec.ttl_s + 1.0)
    step(s)  # the pin's TTL runs out: its blocks are copied to the host tier
    host, disk = list(d.keys_of[key]), list(lv.disk.keys_of[key])  # A's prompt and answer: 6 full blocks
    assert not rec.pinned and len(host) == len(disk) == 6 and key in d.tail_of
    answer = [FAKE_TOKEN] * 39
    s.add_request(f.make([*FIRST, *answer, 700, 701, 702, 703], 4, request_id="b2", xargs={"session_end": 1}))
    assert kp.resolver.shared_turn("b2")  # it repeats B's answer: joined while shared
    run_until_idle(s)
    _ack_disk_writes(s)
    assert set(host) <= set(d.keys_of.get(key, ())) and key in d.tail_of  # the host tier's copies and tail
    assert set(disk) <= set(lv.disk.keys_of.get(key, ()))  # the disk level's books
    assert kp.stats()["inferred_shared_ends_ignored"] == 1 and key in kp.policy.sessions
    assert rec.pinned_blocks == 7  # B's last turn is pinned, as any turn of a session that goes on


def test_a_shared_turns_role_hint_leaves_the_sessions_role(harness_cfg, clock):
    """A says orchestrator (weight 2), B's identical prompt says worker (1): before, B's hint replaced the role of the
    session A's next turn continues, at B's arrival and at its finish. Now the role stays (counted)."""
    s, f = sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(FIRST, 40, xargs={"agent_role": "orchestrator"}))
    run_until_idle(s)
    s.add_request(f.make(FIRST, 40, request_id="b1", xargs={"agent_role": "worker"}))
    [(key, rec)] = s.kvsched.policy.sessions.items()
    assert s.kvsched.resolver.shared_turn("b1") and rec.role == "orchestrator"
    run_until_idle(s)
    assert rec.turns == 2 and rec.role == "orchestrator"
    assert s.kvsched.stats()["inferred_shared_roles_ignored"] == 1


def test_both_users_partial_last_blocks_stay_in_the_tier_while_they_share(harness_cfg, clock):
    """A and B send the same first prompt and get different answers (tokens 7 and 9): each turn ends 10 tokens past
    its 6th full block, a partial last block the tier keeps (`save_tail`). Before: B's tail replaced the session's, A's
    left the tier, and A's next turn hit its 6 pinned blocks only (96 tokens). Now A's tail is kept beside B's
    (`kvsched.core.shared_tails`): A's next turn loads it (106 tokens), B's hits its own; once A's turn continued its
    answer (the sharing is over), B's tail passes, with B's chain, to the companion session keeping B's answer."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    f, kp = RequestFactory(BLOCK), s.kvsched
    d = kp.tier.directory
    tokens = {"b1": 9}

    def run() -> dict[str, int]:
        news = {}
        while s.has_requests():
            out, _ = step(s, sample=lambda rid: tokens.get(rid, FAKE_TOKEN))
            news.update({n.req_id: n.num_computed_tokens for n in out.scheduled_new_reqs})
        return news

    for rid in ("a1", "b1"):
        s.add_request(f.make(FIRST, 40, request_id=rid))
        run()
    [(key, rec)] = kp.policy.sessions.items()
    tails = dict(d.tail_of)
    message = [700, 701, 702, 703]
    s.add_request(f.make([*FIRST, *[FAKE_TOKEN] * 40, *message], 4, request_id="a2"))
    assert run() == {"a2": 106}  # 6 pinned blocks and A's 10 tail tokens from the tier (before: 96)
    assert rec.pinned_blocks != 8 and len(tails) == 2  # B's tail was under the session, A's beside it
    b_tail = tails.pop(key).tokens
    assert set(b_tail) == {9} and [set(t.tokens) for t in tails.values()] == [{FAKE_TOKEN}]
    # A continued: B's conversation is its own now, and B's chain and tail are the companion's (`shared_answers`)
    [other] = kp.pins.tails.kept
    assert other == key._replace(branch=-1) and [d.tail_of[o].tokens for o in kp.pins.tails.kept[other]] == [b_tail]
    s.add_request(f.make([*FIRST, *[9] * 40, *message], 4, request_id="b2"))
    assert run()["b2"] == 106 and kp.tier.stats["tail_restores"] == 2


def test_both_users_answers_are_copied_to_the_host_tier_and_the_disk_level(harness_cfg, clock, tmp_path):
    """The other half of the tier side: the union's blocks, not the last turn's alone. The disk level's books only ever
    add a turn's blocks to the session's (`DiskDirectory.plan_writes`), and the union pin's expiry demotes both
    answers into the host tier: 4 prompt blocks and 2 per answer."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    tier = kv_transfer_config(0.01, disk_dir=str(tmp_path), disk_gb=0.01)
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    kp, lv = s.kvsched, s.connector.levels
    for rid, token in (("a1", FAKE_TOKEN), ("b1", 9)):
        s.add_request(f.make(FIRST, 40, request_id=rid))
        while s.has_requests():
            step(s, sample=lambda _rid, t=token: t)
        _ack_disk_writes(s)
    [(key, rec)] = kp.policy.sessions.items()
    assert rec.pinned_blocks == 8 and len(lv.disk.keys_of[key]) == 8
    clock.advance(rec.ttl_s + 1.0)
    step(s)  # the union's TTL runs out: all of it is copied to the host tier
    assert not rec.pinned and len(kp.tier.directory.keys_of[key]) == 8 and len(kp.tier.directory.tail_of) == 2
