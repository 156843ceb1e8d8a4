"""A shared inferred session's union pin on vLLM's real scheduler and block pool (no model: the harness samples the
tokens) once one user's next turn continues its own answer: the other users' answers stay pinned for them until the
union's TTL (`kvsched.core.shared_answers`), and two answers that differ only in their partial last block never serve
one user the other's KV (the FP8 tier matches a partial block by its tokens, `TierDirectory.match_tail`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, free_blocks, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402

FIRST = [*range(100, 164), 500, 501, 502]  # the first prompt both users send: 4 full blocks and 3 tokens
MESSAGE = [700, 701, 702, 703]


class Users:
    """The scheduler, and answers per request: `sample(rid, i)` is the i-th token request `rid` samples."""

    def __init__(self, s, sample=lambda rid, i: FAKE_TOKEN) -> None:
        self.s, self.f, self.sample, self.n = s, RequestFactory(BLOCK), sample, Counter[str]()

    def _token(self, rid: str) -> int:
        self.n[rid] += 1
        return self.sample(rid, self.n[rid] - 1)

    def send(self, rid: str, prompt: list[int], max_tokens: int, **kw) -> dict[str, int]:
        """Run `rid` to its end: every request scheduled meanwhile, with the tokens it started from the cache."""
        self.s.add_request(self.f.make(prompt, max_tokens, request_id=rid, **kw))
        news = {}
        while self.s.has_requests():
            out, _ = step(self.s, sample=self._token)
            news.update({n.req_id: n.num_computed_tokens for n in out.scheduled_new_reqs})
        return news

    def flood(self) -> None:
        """Every block no pin holds is taken, then freed: whatever is not pinned is evicted."""
        self.send("flood", list(range(2000, 2000 + free_blocks(self.s) * BLOCK)), 1, xargs={"kvsched_infer": 0})


def _union(clock, harness_cfg):
    s = sched(harness_cfg, clock=clock)
    u = Users(s, lambda rid, i: 9 if rid == "b1" else FAKE_TOKEN)
    u.send("a1", FIRST, 40)
    u.send("b1", FIRST, 40)
    kp = s.kvsched
    [(key, rec)] = kp.policy.sessions.items()
    held = [b.block_id for b in kp.pinned[key][0]]
    assert rec.union_pin and len(held) == 8  # the prompt (4), A's answer (2), B's (2)
    return s, u, key, rec, held


def test_a_continuation_of_one_answer_leaves_the_other_pinned_for_its_user(harness_cfg, clock):
    """A's next turn continues A's answer 10 s after the union. Before: its finish made its chain the pin and dropped
    B's answer (given back uncounted), so after a flood B's next turn, a session of its own now, hit the prompt
    only (64 tokens). Now B's chain stays pinned under a companion of the session: B's next turn hits 96."""
    s, u, key, rec, held = _union(clock, harness_cfg)
    kp = s.kvsched
    clock.advance(10.0)
    assert u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4) == {"a2": 96}
    u.flood()
    other = key._replace(branch=-1)
    assert [b.block_id for b in kp.pinned[other][0]] == [*held[:4], *held[6:]]  # B's chain: prompt and answer
    assert [b.block_id for b in kp.pinned[key][0]][:6] == held[:6] and not rec.union_pin
    assert kp.stats()["released_ttl"] == 0 and kp.policy.counters["shared_answers_kept"] == 1
    assert not pool_violations(s)  # references, free queue, the policy's counts, each pin a prefix in order
    assert u.send("b2", [*FIRST, *[9] * 40, *MESSAGE], 4) == {"b2": 96}  # before: 64
    # B is back: its own session pins its chain, and the companion, keeping no other answer, ends with its record
    [b2] = [k for k in kp.policy.sessions if k not in (key, other)]
    assert [b.block_id for b in kp.pinned[b2][0]][:6] == [*held[:4], *held[6:]] and other not in kp.pinned
    assert other not in kp.policy.sessions and kp.policy.counters["shared_answers_returned"] == 1
    assert not pool_violations(s)


@pytest.mark.parametrize("hint", [{"session_end": 1}, {"ttl_s": 2}])
def test_a_returned_users_own_session_decides_how_long_its_answer_stays_pinned(harness_cfg, clock, hint):
    """B comes back and hits its answer from the companion, but its turn ends its session, or pins for 2 s only.
    Before: the companion held B's answer on to the union's TTL (30 s from B's first turn), a session record counted
    in the release order and the budget: after B's end, or B's pin's TTL, B's answer blocks were still pinned (and
    the companion listed). Now the answer left the companion at B's turn's finish: B's own session's rule holds."""
    s, u, key, rec, held = _union(clock, harness_cfg)
    kp = s.kvsched
    clock.advance(10.0)
    u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4)
    other = key._replace(branch=-1)
    assert set(held[6:]) <= set(kp.block_refs) and other in kp.policy.sessions
    assert u.send("b2", [*FIRST, *[9] * 40, *MESSAGE], 4, xargs=hint) == {"b2": 96}
    clock.advance(3.0)
    step(s)  # expires B's own 2 s pin
    assert not set(held[6:]) & set(kp.block_refs)  # before: held by the companion until the union's TTL
    assert not [k for k in kp.policy.sessions if k.branch < 0] and other not in kp.pinned
    assert not pool_violations(s)


def test_the_listing_says_a_companion_is_one_and_a_delete_of_the_id_ends_it(harness_cfg, clock):
    """`GET /kvsched/sessions` (the engine's `list`) shows the companion as branch -1 with `companion: true` (before:
    nothing but the negative branch told it from a session); `DELETE /kvsched/sessions/{id}` (`end`) ends it with
    the session: its record, its pin (B's answer blocks unpinned) and its answers' bookkeeping go."""
    s, u, key, rec, held = _union(clock, harness_cfg)
    kp = s.kvsched
    u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4)
    rows = {r["branch"]: r for r in s("list")["sessions"]}
    sid = str(key.session_id)
    assert {b: (r["session_id"], r["companion"], r["inferred"]) for b, r in rows.items()} == {
        0: (sid, False, True), -1: (sid, True, True)}
    assert rows[-1]["pinned_blocks"] == 6
    assert s("end", sid) == {"ended": 2}
    assert not kp.policy.sessions and not kp.pinned and not kp.block_refs and not kp.pins.others.chains
    assert not pool_violations(s)


def test_an_answer_nobody_continued_goes_at_the_unions_ttl_as_an_unreturned_pin_does(harness_cfg, clock):
    """The union's TTL (30 s from B's first turn) passes 20 s after A's next turn: B's answer is released then, as a
    TTL release (2 blocks freed; the prompt stays, A's pin holds it), while A's pin runs on to its own TTL. A flood
    then evicts B's answer and B's late turn hits the prompt only, as any turn after its pin's TTL."""
    s, u, key, rec, held = _union(clock, harness_cfg)
    kp = s.kvsched
    expires = rec.expires_at
    clock.advance(10.0)
    u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4)
    other = key._replace(branch=-1)
    pinned = set(kp.block_refs)
    assert set(held) <= pinned
    clock.now = expires + 1.0
    step(s)  # the scheduler's step expires pins
    assert other not in kp.pinned and kp.stats()["released_ttl"] == 1
    assert pinned - set(kp.block_refs) == set(held[6:])  # B's answer, and nothing else
    assert rec.pinned_blocks == 7 and key in kp.pinned and not pool_violations(s)
    u.flood()
    assert u.send("b2", [*FIRST, *[9] * 40, *MESSAGE], 4) == {"b2": 64}


@pytest.mark.parametrize("common", [0, 3])
def test_answers_differing_only_in_the_partial_last_block_serve_neither_user_the_others_kv(harness_cfg, clock,
                                                                                        common):
    """A's and B's answers fill the same 6 full blocks and differ in the partial last block (10 tokens each; `common`
    of them alike): the pool keeps one chain, and the tier keeps B's partial block (the later), under the session
    (`kvsched.core.shared_tails`: the same full blocks are the same answer). A's next turn hits its 6 full blocks and
    takes from B's tier copy only the `common` tokens A's prompt repeats (a token's KV depends on the tokens before it
    only): never a token of B's that A's prompt does not have."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    split = 29 + common  # answer tokens 29..38 are the partial block's (the 40th has no KV)
    u = Users(s, lambda rid, i: 9 if rid == "b1" and i >= split else FAKE_TOKEN)
    u.send("a1", FIRST, 40)
    u.send("b1", FIRST, 40)
    kp = s.kvsched
    d = kp.tier.directory
    [(key, rec)] = kp.policy.sessions.items()
    b_answer = [FAKE_TOKEN] * split + [9] * (40 - split)
    assert rec.pinned_blocks == 6 and not rec.union_pin and list(d.tail_of) == [key]
    assert list(d.tail_of[key].tokens) == b_answer[29:39]  # B's partial block: the session's tail
    assert u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4) == {"a2": 96 + common}
    assert kp.tier.stats["restored_tail_tokens"] == common


def test_with_the_tier_the_other_answers_partial_last_block_stays_with_its_chain(harness_cfg, clock):
    """The FP8 tier keeps each answer's partial last block while the session is shared (`shared_tails`): 10 tokens
    past the 6th full block. A's next turn continues A's answer (its own partial block loaded: 106). Before: that
    finish ended the sharing and B's partial block left the tier (the session's own tail became A's turn's), so B's
    next turn, after a flood, hit its 6 full blocks from the companion and recomputed the rest (96). Now the tail
    passes to the companion's owners with B's chain, and B's turn loads it too (106)."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    u = Users(s, lambda rid, i: 9 if rid == "b1" else FAKE_TOKEN)
    u.send("a1", FIRST, 40)
    u.send("b1", FIRST, 40)
    kp = s.kvsched
    [key] = kp.policy.sessions
    clock.advance(10.0)
    assert u.send("a2", [*FIRST, *[FAKE_TOKEN] * 40, *MESSAGE], 4) == {"a2": 106}
    u.flood()
    other = key._replace(branch=-1)
    assert [set(kp.tier.directory.tail_of[o].tokens) for o in kp.pins.tails.kept[other]] == [{9}]
    assert u.send("b2", [*FIRST, *[9] * 40, *MESSAGE], 4) == {"b2": 106}  # before: 96
    assert kp.tier.stats["restored_tail_tokens"] == 20
    assert other not in kp.pins.tails.kept  # B is back: its answer's partial block left the companion with its chain
