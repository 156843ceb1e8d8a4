"""Branches, inferred sessions and tenants on vLLM's real scheduler and block pool (no model: see harness.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import harness as h  # noqa: E402
from kvsched.core.lineage import LineageConfig  # noqa: E402
from kvsched.core.tenancy import Caller  # noqa: E402

BLOCK = 16
FAKE_TOKEN, KVSCHED, STOCK = h.FAKE_TOKEN, h.KVSCHED_SCHEDULER, h.STOCK_SCHEDULER
PrefillCounts, RequestFactory, run_until_idle = h.PrefillCounts, h.RequestFactory, h.run_until_idle


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return h.HarnessConfig(model_dir=tiny_model_dir, num_blocks=64, block_size=BLOCK, max_model_len=1024)


def pool_is_whole(s) -> bool:
    return h.free_blocks(s) == h.usable_blocks(s)


def _sched(cfg, clock, cls=KVSCHED, infer=True):
    s = h.build_scheduler(cls, cfg)
    if hasattr(s, "kvsched"):
        s.kvsched.policy.clock = clock
        s.kvsched.resolver.config = LineageConfig(infer_sessions=infer)
    return s


def _flood(s, f, n=4, tokens=330):
    for i in range(n):  # 4 x 21 blocks through a 63-block pool
        s.add_request(f.make([5000 + i] * tokens, 4))
        run_until_idle(s)


def _rows(s, caller=None):
    return {(r["session_id"], r["branch"]): r for r in s("list", caller, 1000, None, False)["sessions"]} \
        if caller else {(r["session_id"], r["branch"]): r for r in s("list")["sessions"]}


def test_a_stranger_under_the_victims_id_cannot_shrink_retime_or_end_its_pin(cfg, clock, monkeypatch):
    # Without the FP8 tier the pin ledger (kvsched.core.pin_ledger) starts pins at 30 s whatever the hint; this test
    # is about who may change a pin, so its hinted TTL is kept whole.
    monkeypatch.setenv("KVSCHED_PAYBACK_SAMPLING", "0")
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    victim = list(range(100, 228))  # 8 full blocks
    s.add_request(f.make(victim, 4, session_id="victim", xargs={"ttl_s": 3600.0}))
    run_until_idle(s)
    before = _rows(s)[("victim", 0)]
    assert before["pinned_blocks"] == 8 and before["ttl_s"] == 600.0  # capped at KVSCHED_MAX_TTL_S
    for attack in ({"ttl_s": 0.0}, {"ttl_s": 30.0}, {"session_end": 1}):
        s.add_request(f.make([7, 7, 7] * 22, 4, session_id="victim", xargs=attack))
        run_until_idle(s)
    after = _rows(s)[("victim", 0)]
    assert (after["pinned_blocks"], after["ttl_s"], after["turns"]) == (8, 600.0, 1)
    clock.advance(100.0)  # past every TTL the stranger asked for, within the victim's
    s.kvsched.expire()
    turn2 = PrefillCounts()
    s.add_request(f.make(victim + [FAKE_TOKEN] * 3 + [1] * 20, 4, session_id="victim"))
    run_until_idle(s, counts=turn2)
    assert turn2.cached_tokens == 128  # all 8 blocks


def test_a_headerless_conversation_is_retained_like_a_named_one(cfg, clock):
    """Turn 1 and turn 2 of a conversation without any session field, then one-shot requests flooding the pool, then
    turn 3: inference found turn 2 extending turn 1, so the conversation is a session (and worth more than the
    one-shots nothing has continued), and turn 3 hits its whole prefix; stock LRU evicted it."""
    t1 = list(range(100, 228))  # 8 full blocks
    t2 = t1 + [FAKE_TOKEN] * 3 + list(range(900, 933))  # 10 full blocks
    t3 = t2 + [FAKE_TOKEN] * 3 + list(range(950, 980))
    cached = {}
    for name, cls, infer in (("stock", STOCK, True), ("off", KVSCHED, False),
                             ("inferred", KVSCHED, True)):
        s, f = _sched(cfg, clock, cls, infer), RequestFactory(BLOCK)
        for prompt in (t1, t2):
            s.add_request(f.make(prompt, 4))
            run_until_idle(s)
        _flood(s, f)
        turn3 = PrefillCounts()
        s.add_request(f.make(t3, 4))
        run_until_idle(s, counts=turn3)
        cached[name] = turn3.cached_tokens
        if name == "inferred":
            stats = s.kvsched.stats()
            assert stats["inference_hits"] == 2 and stats["inferred_sessions"] == 5  # the conversation + 4 floods
            s("end_all")
            assert pool_is_whole(s)
    assert cached == {"stock": 0, "off": 0, "inferred": 160}


def test_an_unrelated_prompt_sharing_only_the_system_prompt_is_not_inferred_into_the_session(cfg, clock):
    """Found by review: the earlier prompt's last full block was all system prompt, so another user's first turn
    with the same system prompt joined the session and moved its pin off the first user's answer; the first user's
    real second turn then continued nothing. The tokens past that block (the user's own words) must match too."""
    sys = list(range(100, 164))  # 4 full blocks, shared by every user
    a1 = sys + [500, 501, 502]  # user A: a short first message
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    s.add_request(f.make(a1, 40))
    run_until_idle(s)
    s.add_request(f.make(sys + list(range(600, 640)), 4))  # user B, unrelated
    run_until_idle(s)
    assert s.kvsched.stats()["inference_hits"] == 0
    s.add_request(f.make(a1 + [FAKE_TOKEN] * 39 + [700, 701, 702, 703], 4))  # A's real second turn
    run_until_idle(s)
    stats = s.kvsched.stats()
    assert stats["inference_hits"] == 1 and stats["inferred_sessions"] == 2
    assert sorted(r.turns for r in s.kvsched.policy.sessions.values()) == [1, 2]


def test_inference_never_joins_across_salt_or_tenant(cfg, clock):
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    history = list(range(100, 196))
    s.add_request(f.make(history, 4, cache_salt="a"))
    run_until_idle(s)
    follow = history + [FAKE_TOKEN] * 3 + [1] * 40
    s.add_request(f.make(follow, 4, cache_salt="b"))  # another salt: another hash chain, another session
    s.add_request(f.make(follow, 4, cache_salt="a", xargs={"kvsched_tenant": "other-key"}))  # same salt, other key
    run_until_idle(s)
    assert s.kvsched.stats()["inference_hits"] == 0 and s.kvsched.stats()["inferred_sessions"] == 3
    s.add_request(f.make(follow, 4, cache_salt="a"))
    run_until_idle(s)
    assert s.kvsched.stats()["inference_hits"] == 1


def test_a_request_can_opt_out_of_inference_and_named_sessions_are_never_inferred(cfg, clock):
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(100, 196)), 4, xargs={"kvsched_infer": 0}))
    run_until_idle(s)
    assert not s.kvsched.pinned and s.kvsched.stats()["inferred_sessions"] == 0
    s.add_request(f.make(list(range(300, 396)), 4, session_id="named"))
    run_until_idle(s)
    s.add_request(f.make(list(range(300, 396)) + [FAKE_TOKEN] * 3 + [1] * 40, 4))  # extends the named session
    run_until_idle(s)
    assert s.kvsched.stats()["inference_hits"] == 0  # an unnamed request never joins a named session


def test_tenants_are_separate_sessions_and_end_only_their_own(cfg, clock):
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    for tenant, salt in (("key-a", None), ("key-b", None), ("key-a", "salt-1")):
        s.add_request(f.make([len(tenant) + (salt is not None)] * 64, 2, session_id="same",
                             xargs={"kvsched_tenant": tenant}, cache_salt=salt))
    run_until_idle(s)
    assert len(s.kvsched.pinned) == 3
    a, b = Caller(tenant="key-a").as_args(), Caller(tenant="key-b").as_args()
    assert [r["session_id"] for r in s("list", a, 100, None, False)["sessions"]] == ["same"]
    assert s("end", "same", Caller(tenant="key-c").as_args()) == {"ended": 0}
    assert s("end", "same", b) == {"ended": 1}
    assert {(k.tenant, k.cache_salt) for k in s.kvsched.pinned} == {("key-a", None), ("key-a", "salt-1")}
    assert s("end", "same", Caller(tenant="key-a", cache_salt="salt-1", salt_given=True).as_args()) == {"ended": 1}
    assert s("list", Caller(admin=True).as_args(), 100, None, True)["summary"]["sessions"] == 1
    assert s("end_all", Caller(admin=True).as_args()) == {"ended": 1}
    assert pool_is_whole(s)


def test_the_list_pages_in_a_stable_order(cfg, clock):
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    for i in range(7):
        s.add_request(f.make([i + 1] * 20, 2, session_id=f"s{6 - i}"))
    run_until_idle(s)
    admin = Caller(admin=True).as_args()
    seen, cursor = [], None
    while True:
        page = s("list", admin, 3, cursor, False)
        assert page["total"] == 7 and len(page["sessions"]) <= 3
        seen += [r["session_id"] for r in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"s{i}" for i in range(7)]
    assert "error" in s("list", admin, 3, "not-a-cursor", False)


def test_a_failure_in_session_bookkeeping_never_reaches_the_engine(cfg, clock, monkeypatch):
    from types import SimpleNamespace

    from kvsched.core.sessions import SessionId, SessionKey, TurnHints

    s = _sched(cfg, clock)
    odd = SimpleNamespace(request_id="odd", session_id="s", cache_salt=None, block_hashes=7,
                          sampling_params=SimpleNamespace(extra_args=None))
    assert s.kvsched.resolver.resolve(odd) == (None, TurnHints())  # served without a session

    class Broken:  # the lineage with a bug in `finished` (a mypyc-compiled Lineage's methods cannot be replaced)
        def __init__(self, real: object) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def finished(self, *_a: object) -> None:
            raise RuntimeError("bug")

    monkeypatch.setattr(s.kvsched.resolver, "lineage", Broken(s.kvsched.resolver.lineage))
    s.kvsched.resolver.finished("r", SessionKey(SessionId("s")))  # logged once, not raised
    f = RequestFactory(BLOCK)
    s.add_request(f.make(list(range(64)), 2, session_id="s"))
    run_until_idle(s)  # the engine loop goes on
    assert s.kvsched.pinned


def test_sessions_ended_by_their_last_turn_leave_no_lineage_state(cfg, clock):
    """Found by review: a turn carrying the end flag skipped the only place that dropped its request's anchor, so the
    resolver kept one entry per ended session, forever."""
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    for i in range(50):
        s.add_request(f.make(list(range(1000 + i * 40, 1040 + i * 40)), 2, session_id=f"one-shot-{i}",
                             xargs={"session_end": 1}))
        run_until_idle(s)
    assert s.kvsched.resolver.anchors == {} and s.kvsched.requests == {}
    assert not s.kvsched.policy.sessions and not s.kvsched.resolver.lineage.entries and pool_is_whole(s)


def test_the_summary_counts_a_block_several_sessions_share_once(cfg, clock):
    """Found by review: three sessions sharing a long system prompt summed to more pinned blocks than the pool has."""
    s, f = _sched(cfg, clock), RequestFactory(BLOCK)
    system = list(range(100, 164))  # 4 blocks every session shares
    for i in range(3):
        s.add_request(f.make(system + [500 + i] * 32, 2, session_id=f"s{i}"))  # + 2 blocks of its own
    run_until_idle(s)
    summary = s("list", Caller(admin=True).as_args(), 100, None, True)["summary"]
    assert summary["pinned_session_blocks"] == 3 * 6
    assert summary["pinned_blocks"] == 4 + 3 * 2 == s.kvsched.stats()["pinned_blocks"]
