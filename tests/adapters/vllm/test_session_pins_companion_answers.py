"""A companion keeping several answers of a shared inferred session (`kvsched.core.shared_answers`) on vLLM's real
scheduler and block pool (no model: the harness samples the tokens), with and without the FP8 tier: three users sent
one first prompt and got answers A, B and C; A's next turn continues A's, so the companion keeps B's and C's. B comes
back: B's answer leaves the companion, C's stays pinned for C; C comes back: the companion ends. Until now only the
core tested several answers (tests/core/test_shared_pin_answers.py); the pool's own bookkeeping is checked here."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, free_blocks  # noqa: E402
from tests.adapters.vllm.conftest import sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402
from tests.adapters.vllm.test_session_pins_shared_answers import FIRST, MESSAGE, Users  # noqa: E402

TOKENS = {"b1": 9, "c1": 8}  # B's and C's answers (A's: FAKE_TOKEN), 40 tokens each: 2 full blocks and 7 KV tokens


def _next(token: int) -> list[int]:
    """The next turn of the user whose answer was `token`s: its whole conversation and a new message."""
    return [*FIRST, *[token] * 40, *MESSAGE]


def _three_answers(s, clock):
    u = Users(s, lambda rid, i: TOKENS.get(rid, FAKE_TOKEN))
    for rid in ("a1", "b1", "c1"):
        u.send(rid, FIRST, 40)
    kp = s.kvsched
    [(key, rec)] = kp.policy.sessions.items()
    union = [b.block_id for b in kp.pinned[key][0]]
    assert rec.union_pin and len(union) == 10  # the prompt (4), then A's, B's and C's answers (2 each)
    assert not pool_violations(s)  # the union is a tree: each answer's blocks a prefix of its chain, in order
    clock.advance(10.0)
    return u, key, union


def _returned(s, u, rid: str, token: int) -> tuple[dict[str, int], list[int]]:
    """`rid`'s next turn: the tokens it hit, and the blocks its own session (new: its conversation is its own) pins
    first, the blocks of that hit (a request's first blocks are the ones it hit)."""
    kp = s.kvsched
    before = set(kp.policy.sessions)
    news = u.send(rid, _next(token), 4)
    [key] = [k for k in kp.policy.sessions if k not in before]
    return news, [b.block_id for b in kp.pinned[key][0]][:6]


@pytest.mark.parametrize("tier", [False, True], ids=["pool", "fp8_tier"])
def test_a_companion_of_two_answers_lets_the_returning_users_go_and_keeps_the_others(harness_cfg, clock, tier):
    """The companion pins the prompt and B's and C's answers (8 blocks), each answer's blocks a prefix of its chain.
    B comes back after a flood: it hits the prompt and B's answer, its own blocks only (96 tokens, 106 with B's
    partial block from the tier, B's tokens); B's answer leaves the companion, which keeps C's chain (6 blocks,
    counted so), and C's partial block only. C comes back: hits its own (96 / 106), and the companion ends, record,
    answers and tails. Every session ended, the pool has every block free again and no pin reference is left."""
    cfg = harness_cfg
    if tier:
        from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

        cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01))
    s = sched(cfg, clock=clock)
    start = free_blocks(s)
    kp = s.kvsched
    u, key, union = _three_answers(s, clock)
    tail = 10 if tier else 0  # a turn's 10 KV tokens past its 6th full block: the tier's partial block
    assert u.send("a2", _next(FAKE_TOKEN), 4) == {"a2": 96 + tail}
    u.flood()
    other = key._replace(branch=-1)
    p, b, c = union[:4], union[6:8], union[8:]
    assert [x.block_id for x in kp.pinned[other][0]] == [*p, *b, *c]
    assert kp.policy.sessions[other].pinned_blocks == 8 and not pool_violations(s)
    pin = kp.pinned[other][0]
    pin[4], pin[5] = pin[5], pin[4]  # (the check sees a hole: B's second block before its first, released after it)
    assert [e for e in pool_violations(s) if "not a prefix of its chain" in e]
    pin[4], pin[5] = pin[5], pin[4]
    if tier:
        d = kp.tier.directory
        assert sorted(set(d.tail_of[o].tokens) for o in kp.pins.tails.kept[other]) == [{8}, {9}]
    assert _returned(s, u, "b2", 9) == ({"b2": 96 + tail}, [*p, *b])  # B's blocks only: none of C's
    if tier:
        assert kp.tier.stats["restored_tail_tokens"] == 2 * tail  # A's, then B's (B's tokens: the tier matches them)
        assert [set(d.tail_of[o].tokens) for o in kp.pins.tails.kept[other]] == [{8}]
    rec = kp.policy.sessions[other]
    assert [x.block_id for x in kp.pinned[other][0]] == [*p, *c] and rec.pinned_blocks == 6
    assert rec.pinned_tokens == 6 * 16 and kp.policy.counters["shared_answers_returned"] == 1
    [row] = [r for r in s("list")["sessions"] if r["companion"]]  # what `GET /kvsched/sessions` shows of it
    assert (row["branch"], row["pinned_blocks"]) == (-1, 6)
    assert not pool_violations(s)
    u.flood()
    assert set(c) <= set(kp.block_refs)  # C's answer stays pinned for C through the flood
    assert _returned(s, u, "c2", 8) == ({"c2": 96 + tail}, [*p, *c])
    assert other not in kp.policy.sessions and other not in kp.pinned and not kp.pins.others.chains
    assert other not in kp.pins.tails.kept and kp.policy.counters["shared_answers_returned"] == 2
    assert not pool_violations(s)
    for sid in {str(k.session_id) for k in kp.policy.sessions}:
        s("end", sid)
    assert not kp.policy.sessions and not kp.pinned and not kp.block_refs and not kp.policy.pinned_blocks_total
    assert free_blocks(s) == start and not pool_violations(s)
    if tier:
        assert not d.keys_of and not d.tail_of and not kp.pins.tails.kept
