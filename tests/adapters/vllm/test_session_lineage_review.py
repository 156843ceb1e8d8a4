"""Session lineage on vLLM's real scheduler and block pool, in the cases a review reproduced (harness.py: no model;
every sampled token is FAKE_TOKEN)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm import harness as h  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched, unset_env  # noqa: E402

FAKE_TOKEN, run_until_idle = h.FAKE_TOKEN, h.run_until_idle


def _turns(s) -> dict[tuple[str, int], int]:
    return {(str(k.session_id), k.branch): r.turns for k, r in s.kvsched.policy.sessions.items()}


def _held(s, hashes) -> list[bool]:
    """Per block hash, whether a pin holds the cached block of that hash."""
    pinned = {b.block_id for groups in s.kvsched.pinned.values() for g in groups for b in g}
    pool = s.kv_cache_manager.block_pool
    return [bool((c := pool.get_cached_block(x, [0])) and c[0].block_id in pinned) for x in hashes]


@pytest.mark.parametrize("system_tokens", [64, 72])  # on a block boundary, and half a block past one
def test_users_after_a_shared_system_prompt_keep_one_session_each(harness_cfg, clock, system_tokens):
    """Found by review: with the system prompt off the block boundary, the first tokens compared past the last full
    block were system prompt, and five users' first turns chained into one session; on the boundary, each user whose
    short first turn ended on the same block replaced the one before in the index (1 of 5 recognised)."""
    cfg = h.HarnessConfig(model_dir=harness_cfg.model_dir, num_blocks=256, block_size=BLOCK, max_model_len=1024)
    s, f = sched(cfg, clock=clock), h.RequestFactory(BLOCK)
    system = list(range(100, 100 + system_tokens))
    users = [[*system, 500 + 10 * u, 501 + 10 * u, 502 + 10 * u] for u in range(5)]
    for p in users:
        s.add_request(f.make(p, 40))
        run_until_idle(s)
    assert sorted(_turns(s).values()) == [1] * 5 and s.kvsched.stats()["inference_hits"] == 0
    for p in users:
        s.add_request(f.make([*p, *[FAKE_TOKEN] * 39, 777, 778, 779], 4))
        run_until_idle(s)
    assert sorted(_turns(s).values()) == [2] * 5 and s.kvsched.stats()["inference_hits"] == 5


def test_an_unrelated_first_turn_leaves_the_first_users_pin(harness_cfg, clock):
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    system = list(range(100, 172))  # 4.5 blocks
    a1 = [*system, 500, 501, 502]
    s.add_request(f.make(a1, 40))
    run_until_idle(s)
    s.add_request(f.make([*system, *range(600, 640)], 4))
    run_until_idle(s)
    a2 = f.make([*a1, *[FAKE_TOKEN] * 39, 700, 701, 702, 703], 4)
    assert all(_held(s, a2.block_hashes[:-1]))  # A's prompt and answer, all still pinned
    counts = h.PrefillCounts()
    s.add_request(a2)
    run_until_idle(s, counts=counts)
    assert counts.cached_tokens == (len(a2.prompt_token_ids) // BLOCK) * BLOCK
    assert sorted(_turns(s).values()) == [1, 2]


def test_a_session_ended_while_its_turn_runs_never_pins_that_turn_again(harness_cfg, clock):
    """Found by review: ending "x" while its turn ran, then starting a new conversation under "x", gave the new
    conversation the old key; the old turn's finish then pinned the old conversation under it and moved its anchor."""
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    old, new = list(range(100, 164)), list(range(3000, 3064))
    s.add_request(f.make(old, 60, session_id="x"))
    h.step(s)
    h.step(s)
    assert s("end", "x") == {"ended": 1}
    s.add_request(f.make(new, 2, session_id="x"))
    run_until_idle(s)
    assert not any(_held(s, f.make(old, 1).block_hashes))
    assert all(_held(s, f.make(new, 1).block_hashes))
    (key, rec), = s.kvsched.policy.sessions.items()
    assert rec.turns == 1 and rec.pinned_blocks == 4
    s.add_request(f.make([*new, FAKE_TOKEN, *range(4000, 4040)], 2, session_id="x"))  # its second turn
    run_until_idle(s)
    assert list(_turns(s).items()) == [((key.session_id, key.branch), 2)]


@pytest.mark.parametrize("victim", [[900 + i for i in range(10)], [*range(100, 164), 500, 501, 502]],
                         ids=["under-one-block", "after-a-system-prompt"])
def test_a_stranger_under_the_victims_id_cannot_end_its_pin(harness_cfg, clock, victim):
    """Found by review: a branch whose prompt was under one block matched any turn, and named branches had no tail
    check, so a stranger's different prompt with the end flag under the victim's id ended the victim's pin."""
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    s.add_request(f.make(victim, 60, session_id="victim"))
    run_until_idle(s)
    expected = (len(victim) + 60 - 1) // BLOCK  # every full block of prompt and answer
    assert {k.branch: r.pinned_blocks for k, r in s.kvsched.policy.sessions.items()} == {0: expected}
    stranger = [*victim[:64], *range(2000, 2040)] if len(victim) > 64 else list(range(2000, 2040))
    s.add_request(f.make(stranger, 2, session_id="victim", xargs={"session_end": 1}))
    run_until_idle(s)
    assert {k.branch: r.pinned_blocks for k, r in s.kvsched.policy.sessions.items()} == {0: expected}


def test_a_branch_number_is_not_reused_while_its_record_lives(harness_cfg, clock, monkeypatch):
    """Found by review: the numbers of forgotten branches were remembered in a bounded LRU; once it dropped the id,
    a stranger's turn got branch 0 again and with it the victim's record (its turns and role)."""
    monkeypatch.setenv("KVSCHED_MAX_SESSIONS", "2")
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    s.add_request(f.make(list(range(100, 164)), 2, session_id="victim", xargs={"agent_role": "planner"}))
    run_until_idle(s)
    clock.advance(10_000)
    s.kvsched.expire()  # the pin expires; the record stays
    for i in range(5):  # other ids push the victim's branch out of the lineage table and its number out of the LRU
        s.add_request(f.make([7000 + i] * 10, 2, session_id=f"other{i}"))
        run_until_idle(s)
    s.add_request(f.make(list(range(5000, 5064)), 2, session_id="victim"))  # a different prompt under the id
    run_until_idle(s)
    rows = sorted(((r.turns, r.role or "") for k, r in s.kvsched.policy.sessions.items() if k.session_id == "victim"),
                  reverse=True)
    assert rows in ([(1, "planner"), (1, "")], [(1, "")])  # the victim's record as it was (unless trimmed), and a
    # fresh one for the stranger's turn


def test_conversations_past_the_branch_limit_of_one_user_id_are_inferred(harness_cfg, clock):
    """Found by review: an app sending one constant `user` (`user:<value>`) had every conversation past the eighth
    served without a session; they are inferred within the same tenant and salt now, as without the field."""
    cfg = h.HarnessConfig(model_dir=harness_cfg.model_dir, num_blocks=256, block_size=BLOCK, max_model_len=1024)
    s, f = sched(cfg, clock=clock), h.RequestFactory(BLOCK)
    user = {"session_id": "user:my-app"}
    convs = [list(range(100 + 1000 * i, 148 + 1000 * i)) for i in range(12)]
    for c in convs:
        s.add_request(f.make(c, 2, xargs=user))
        run_until_idle(s)
    assert len(s.kvsched.pinned) == 12
    for i, c in enumerate(convs):
        s.add_request(f.make([*c, FAKE_TOKEN, *range(9000 + 50 * i, 9020 + 50 * i)], 2, xargs=user))
    run_until_idle(s)
    turns = _turns(s)
    assert sum(turns.values()) == 24 and sorted(turns.values()) == [2] * 12
    assert sum(1 for k in s.kvsched.policy.sessions if k.inferred) == 4


def test_a_keyed_server_gives_requests_without_a_tenant_no_session(harness_cfg, clock, monkeypatch):
    """Found by review: requests on routes kvsched does not rewrite reach the engine without `kvsched_tenant`, and
    every key's (and on /invocations, unauthenticated callers') were inferred into one shared pool."""
    monkeypatch.setenv(compat.ENV_KEYED, "1")
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    a = list(range(100, 196))
    s.add_request(f.make(a, 4))  # no tenant: key A's request on /inference/v1/generate, say
    s.add_request(f.make(list(range(300, 396)), 4, session_id="named"))
    run_until_idle(s)
    assert not s.kvsched.policy.sessions and not s.kvsched.pinned
    tenant = {"kvsched_tenant": "key-a"}
    s.add_request(f.make(a, 4, xargs=tenant))
    run_until_idle(s)
    s.add_request(f.make([*a, *[FAKE_TOKEN] * 3, *range(900, 940)], 4, xargs=tenant))
    run_until_idle(s)
    assert [(k.tenant, r.turns) for k, r in s.kvsched.policy.sessions.items()] == [("key-a", 2)]


def test_the_api_server_marks_its_engine_keyed_before_starting_it(serve_parser, monkeypatch):
    unset_env(monkeypatch, compat.ENV_KEYED)
    unset_env(monkeypatch, "VLLM_API_KEY")
    me = os.getpid()  # the engine core this API server starts is its child: its parent is `me`
    serve_parser.parse_args(["--scheduler", "kvsched"])
    assert not compat.keyed_server(parent_pid=me)
    serve_parser.parse_args(["--scheduler", "kvsched", "--api-key", "k"])
    assert compat.keyed_server(parent_pid=me)
    assert not compat.keyed_server()  # an engine this process builds itself is not its child (found by review)
    serve_parser.parse_args(["--scheduler", "kvsched"])  # a stale mark (another server's) goes
    assert not compat.keyed_server(parent_pid=me)
    monkeypatch.setenv("VLLM_API_KEY", "k")
    serve_parser.parse_args(["--scheduler", "kvsched"])
    assert compat.keyed_server(parent_pid=me)
    assert compat.keyed_server({compat.ENV_KEYED: "1"})  # set by hand for another launcher
    for word, keyed in (("true", True), ("Yes", True), ("no", False), ("off", False), ("0", False), ("", False)):
        assert compat.keyed_server({compat.ENV_KEYED: word}) is keyed, word  # a word fails safe: keyed


def test_images_past_the_last_full_block_are_not_taken_for_the_same_prompt(harness_cfg, clock):
    """Suspected by review, and so: an image's placeholder tokens are the same ids whatever the image, so two users
    who sent different images after the same system prompt had the same tail; the images' hashes are in the block
    hashes only, which the answer's anchor compares."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    resolver = s.kvsched.resolver
    system, image = list(range(100, 164)), [99] * 8  # 4 full blocks, then 8 placeholder tokens

    def request(tokens, image_id):
        r = f.make(tokens, 1)
        r.mm_features = [MultiModalFeatureSpec(data=None, modality="image", identifier=image_id,
                                               mm_position=PlaceholderRange(offset=64, length=8))]
        r.block_hashes[:] = []
        r.update_block_hashes()  # with the image's hash
        return r

    first = request([*system, *image, 500], "image-a")
    key, _ = resolver.resolve(first)  # as it arrives
    first.append_output_token_ids([FAKE_TOKEN] * 40)  # its answer
    resolver.finished(first.request_id, key, first)
    follow = [*system, *image, 500, *[FAKE_TOKEN] * 39, 600]
    other, _ = resolver.resolve(request(follow, "image-b"))
    assert other is not None and other != key
    same, _ = resolver.resolve(request(follow, "image-a"))
    assert same == key


def test_a_side_turn_that_ends_last_leaves_the_branch_to_the_conversation(harness_cfg, clock):
    """A title request sent beside the conversation's turn continues the session and ends last, keeping the longer
    pin; the conversation's next turn continues the longer turn, not the title's words, so the session's anchors stay
    the longer turn's (with its words compared, the title's would have sent that turn to a branch of its own)."""
    s, f, counts = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK), h.PrefillCounts()
    first = list(range(100, 164))  # 4 blocks
    s.add_request(f.make(first, 2, session_id="chat"))
    run_until_idle(s)
    turn = [*first, FAKE_TOKEN, *range(300, 395)]  # 10 blocks
    s.add_request(f.make(turn, 2, session_id="chat"))
    s.add_request(f.make([*first, *[55] * 5], 12, session_id="chat"))  # "a title for this", ends last
    run_until_idle(s)
    [rec] = s.kvsched.policy.sessions.values()
    assert rec.kept_over and rec.pinned_blocks == 10
    s.add_request(f.make([*turn, FAKE_TOKEN, *range(600, 620)], 2, session_id="chat"))
    run_until_idle(s, counts=counts)
    assert [r.turns for r in s.kvsched.policy.sessions.values()] == [4] and counts.cached_tokens == 10 * BLOCK


def test_two_users_sharing_an_inferred_session_neither_ends_nor_shortens_the_others_pin(harness_cfg, clock,
                                                                                         monkeypatch):
    """Found by review: users A and B send the same first prompt without a session field, so B's joins A's inferred
    session (as a retry would). B asked for a 5 s TTL, which then held A's pin too; B's second turn, which repeats
    the (same) answer, ended the session, releasing the blocks A's second turn repeats. Now B's hints are B's alone:
    the longer TTL stays, the end is ignored (counted) and the TTL expires the pin."""
    monkeypatch.setenv("KVSCHED_PAYBACK_SAMPLING", "0")  # the hinted TTLs are kept whole (the pin ledger is off)
    s, f = sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    first = [*range(100, 164), 500, 501, 502]  # 4 full blocks and 3 tokens
    s.add_request(f.make(first, 40))  # A
    run_until_idle(s)
    s.add_request(f.make(first, 40, xargs={"ttl_s": 5.0}))  # B, the same words
    run_until_idle(s)
    [(key, rec)] = s.kvsched.policy.sessions.items()
    assert key.inferred and rec.turns == 2 and rec.ttl_s == 30.0, rec.ttl_s
    answer = [FAKE_TOKEN] * 39
    s.add_request(f.make([*first, *answer, 700, 701, 702, 703], 4, xargs={"session_end": 1}))  # B's last turn
    run_until_idle(s)
    assert key in s.kvsched.policy.sessions and s.kvsched.stats()["inferred_shared_ends_ignored"] == 1
    a2 = f.make([*first, *answer, 800, 801, 802, 803], 4)
    full = list(a2.block_hashes)  # its prompt's 6 full blocks: A's first prompt and answer
    assert len(full) == 6 and all(_held(s, full))  # still pinned
    counts = h.PrefillCounts()
    s.add_request(a2)
    run_until_idle(s, counts=counts)
    assert counts.cached_tokens == 6 * BLOCK
