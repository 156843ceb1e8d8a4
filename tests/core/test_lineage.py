"""Branches of named sessions and inferred sessions, decided on block hash chains (pure: hashes are tuples here)."""

from __future__ import annotations

import pytest

from kvsched.core.lineage import INFER_SCAN_BLOCKS, MAX_BRANCHES, InvalidLineageSetting, Lineage, LineageConfig
from kvsched.core.sessions import SessionId, SessionKey


def chain(*tokens: str) -> list[tuple[str, ...]]:
    """Chained 'hashes' of full blocks: block i's hash names every block up to i (as vLLM's chained hash does)."""
    return [tuple(tokens[: i + 1]) for i in range(len(tokens))]


BASE = SessionKey(SessionId("victim"))


def test_a_turn_that_continues_the_prefix_joins_the_branch_and_one_that_does_not_starts_its_own():
    lin = Lineage(LineageConfig())
    first = lin.named(BASE, chain("sys", "a1"))
    assert first == BASE and first.branch == 0
    lin.finished(first, (1, chain("sys", "a1")[1]))
    assert lin.named(BASE, chain("sys", "a1", "ans", "a2")) is first  # continues: the same key object
    stranger = lin.named(BASE, chain("sys", "evil"))
    assert stranger is not None and stranger.branch == 1 and stranger.session_id == "victim"
    lin.finished(stranger, (1, chain("sys", "evil")[1]))
    # each goes on joining its own branch
    assert lin.named(BASE, chain("sys", "evil", "more")) is stranger
    assert lin.named(BASE, chain("sys", "a1", "ans", "a2", "x")) is first
    assert lin.stats()["branches"] == 1


def test_a_new_branch_is_anchored_on_arrival_so_a_concurrent_stranger_cannot_join_it():
    lin = Lineage(LineageConfig())
    owner = lin.named(BASE, chain("sys", "a1"))  # still running: no finish yet
    other = lin.named(BASE, chain("sys", "b1"))
    assert other is not None and other != owner


def test_the_deepest_continued_anchor_wins_and_a_prompt_shorter_than_a_block_has_none():
    lin = Lineage(LineageConfig())
    short = lin.named(BASE, [])  # no full block: nothing to continue, any later turn does
    lin.finished(short, None)
    assert lin.named(BASE, chain("p")) is short
    lin.finished(short, (0, chain("p")[0]))
    deep = lin.named(BASE, chain("q"))  # branch 1 anchored at ("q",)
    lin.finished(deep, (0, chain("q")[0]))
    assert lin.named(BASE, chain("q", "r")) is deep


def test_branches_are_capped_and_an_overflowing_turn_gets_no_session():
    pinned: set[SessionKey] = set()
    lin = Lineage(LineageConfig(), is_pinned=lambda k: k in pinned)
    keys = [lin.named(BASE, chain(f"p{i}")) for i in range(MAX_BRANCHES)]
    assert len(set(keys)) == MAX_BRANCHES
    pinned.update(keys)
    for i, k in enumerate(keys):
        lin.finished(k, (0, chain(f"p{i}")[0]))
    assert lin.named(BASE, chain("one-too-many")) is None
    assert lin.stats()["branch_overflows"] == 1
    pinned.discard(keys[3])  # its pin expired: its slot can be taken, the pinned branches stay
    new = lin.named(BASE, chain("now-there-is-room"))
    assert new is not None and new not in keys and keys[3] not in lin.entries
    assert lin.named(BASE, chain("p5", "more")) is keys[5]


def test_a_branch_forgotten_to_make_room_never_gives_its_number_to_a_strangers_turn():
    """Found by review: once an id's idle branches were forgotten to make room, the next turn that continued none got
    branch 0, the victim's own key, and with it the victim's record: its history, and its end."""
    lin = Lineage(LineageConfig())  # nothing pinned: every idle branch may go
    victim = lin.named(BASE, chain("sys", "mine"))
    lin.finished(victim, (1, chain("sys", "mine")[1]))
    strangers = [lin.named(BASE, chain("sys", f"evil{i}")) for i in range(MAX_BRANCHES - 1)]
    for i, k in enumerate(strangers):
        lin.finished(k, (1, chain("sys", f"evil{i}")[1]))
    used = {victim, *strangers}
    taker = lin.named(BASE, chain("sys", "evil-last"))  # all eight idle: forgotten to make room
    assert taker is not None and taker not in used and taker.branch == MAX_BRANCHES
    trimmed = Lineage(LineageConfig(max_entries=1))  # the same when the table's bound forgets the victim's branch
    first = trimmed.named(BASE, chain("a"))
    trimmed.finished(first, (0, chain("a")[0]))
    other = trimmed.named(SessionKey(SessionId("someone-else")), chain("b"))
    trimmed.finished(other, (0, chain("b")[0]))
    assert first not in trimmed.entries and trimmed.named(BASE, chain("c")) != first


def test_tenants_and_salts_are_separate_sessions_and_never_share_branches():
    lin = Lineage(LineageConfig())
    a = lin.named(SessionKey(SessionId("s"), tenant="key-a"), chain("x"))
    b = lin.named(SessionKey(SessionId("s"), tenant="key-b"), chain("y"))
    c = lin.named(SessionKey(SessionId("s"), cache_salt="salt"), chain("z"))
    assert len({a, b, c}) == 3 and {k.branch for k in (a, b, c)} == {0}  # each is its own id's first branch


def test_inference_joins_the_request_whose_prompt_this_one_extends():
    lin = Lineage(LineageConfig())
    t1 = chain("sys", "doc", "q1")
    s = lin.infer(None, None, t1)
    assert s.inferred and s.session_id.startswith("inferred-")
    lin.finished(s, (2, t1[2]))
    t2 = chain("sys", "doc", "q1", "a1", "q2")
    assert lin.infer(None, None, t2) is s
    lin.finished(s, (4, t2[4]))
    assert lin.infer(None, None, chain("sys", "doc", "q1", "a1", "q2", "a2", "q3")) is s
    st = lin.stats()
    assert st["inferred_sessions"] == 1 and st["inference_hits"] == 2 and st["inferred_turns"] == 3


def test_a_tenants_identical_prompt_never_displaces_anothers_entry():
    lin = Lineage(LineageConfig())
    t1 = chain("sys", "q1")
    mine = lin.infer(None, "a", t1)
    lin.finished(mine, (1, t1[1]))
    theirs = lin.infer(None, "b", t1)
    lin.finished(theirs, (1, t1[1]))
    assert lin.infer(None, "a", chain("sys", "q1", "x")) is mine
    assert lin.infer(None, "b", chain("sys", "q1", "y")) is theirs


def test_inference_never_joins_across_salt_or_tenant():
    lin = Lineage(LineageConfig())
    t1 = chain("sys", "q1")
    s = lin.infer("salt-a", None, t1)
    lin.finished(s, (1, t1[1]))
    assert lin.infer("salt-b", None, t1 + chain("sys", "q1", "x")[2:]) != s
    assert lin.infer("salt-a", "other-key", chain("sys", "q1", "y")) != s
    assert lin.infer("salt-a", None, chain("sys", "q1", "z")) is s


def test_a_branch_of_an_inferred_session_the_first_continues_later_ones_fork():
    lin = Lineage(LineageConfig())
    t1 = chain("sys", "q")
    s = lin.infer(None, None, t1)
    lin.finished(s, (1, t1[1]))
    first = lin.infer(None, None, chain("sys", "q", "x"))
    second = lin.infer(None, None, chain("sys", "q", "y"))  # arrives while the first is in flight
    assert first is s and second != s
    lin.finished(first, (2, chain("sys", "q", "x")[2]))
    third = lin.infer(None, None, chain("sys", "q", "z"))  # extends a turn the session has moved past
    assert third not in (s, second)
    assert lin.infer(None, None, chain("sys", "q", "x", "more")) is s


def test_an_aborted_joined_turn_frees_the_session_to_be_joined_again():
    lin = Lineage(LineageConfig())
    t1 = chain("a")
    s = lin.infer(None, None, t1)
    lin.finished(s, (0, t1[0]))
    assert lin.infer(None, None, chain("a", "b")) is s
    lin.abandoned(s)
    assert lin.infer(None, None, chain("a", "c")) is s


def test_inference_scans_a_bounded_number_of_blocks_back():
    lin = Lineage(LineageConfig())
    t1 = chain("a")
    s = lin.infer(None, None, t1)
    lin.finished(s, (0, t1[0]))
    near = chain("a", *[f"n{i}" for i in range(INFER_SCAN_BLOCKS - 1)])
    assert lin.infer(None, None, near) is s
    lin.finished(s, (0, t1[0]))
    far = chain("a", *[f"f{i}" for i in range(INFER_SCAN_BLOCKS)])
    assert lin.infer(None, None, far) != s


def test_the_table_is_capped_oldest_first_but_never_forgets_a_pinned_or_running_session():
    pinned: set[SessionKey] = set()
    lin = Lineage(LineageConfig(max_entries=3), is_pinned=lambda k: k in pinned)
    keys = []
    for i in range(3):
        t = chain(f"p{i}")
        k = lin.infer(None, None, t)
        lin.finished(k, (0, t[0]))
        keys.append(k)
    pinned.add(keys[0])
    t = chain("p3")
    k3 = lin.infer(None, None, t)  # running: kept; room is made from the oldest unpinned (keys[1])
    assert keys[0] in lin.entries and keys[1] not in lin.entries and k3 in lin.entries
    assert lin.infer(None, None, chain("p1", "x")) != keys[1]  # forgotten
    assert len(lin.entries) <= 4 and lin.stats()["inference_table_entries"] <= 3


def test_forget_frees_the_branch_slot_and_the_index_entry():
    lin = Lineage(LineageConfig())
    k = lin.named(BASE, chain("a"))
    lin.finished(k, (0, chain("a")[0]))
    lin.forget(k)
    assert lin.named(BASE, chain("b")) == BASE  # the id starts over
    t = chain("c")
    s = lin.infer(None, None, t)
    lin.finished(s, (0, t[0]))
    lin.forget(s)
    assert not lin.index


@pytest.mark.parametrize("raw, on", [("0", False), ("off", False), ("1", True), ("TRUE", True)])
def test_the_setting(raw, on):
    assert LineageConfig.from_env({"KVSCHED_INFER_SESSIONS": raw}).infer_sessions is on
    assert LineageConfig.from_env({}).infer_sessions is True


def test_a_malformed_setting_names_the_variable():
    with pytest.raises(InvalidLineageSetting, match="KVSCHED_INFER_SESSIONS='maybe'"):
        LineageConfig.from_env({"KVSCHED_INFER_SESSIONS": "maybe"})


def test_a_compacted_turns_new_branch_supersedes_the_idle_branch_that_finished_last():
    """`superseded` names what kvsched's own compaction leaves behind: the idle branch of the id whose turn finished
    last. Nothing for a turn that joined a branch, a branch still running, or an inferred session."""
    lin = Lineage(LineageConfig())
    a = lin.named(BASE, chain("sys", "a1"))
    assert lin.created == a  # the id's first branch
    lin.finished(a, (1, chain("sys", "a1")[1]))
    assert lin.named(BASE, chain("sys", "a1", "a2")) is a and lin.created is None  # joined: nothing created
    assert lin.superseded(a) is None  # a rewrite that joined a branch leaves nothing behind
    lin.finished(a, (2, chain("sys", "a1", "a2")[2]))
    b = lin.named(BASE, chain("sys", "b1"))  # another conversation under the id, finished before the rewrite
    lin.finished(b, (1, chain("sys", "b1")[1]))
    assert lin.named(BASE, chain("sys", "a1", "a2", "a3")) is a  # the conversation goes on: a finished last
    lin.finished(a, (3, chain("sys", "a1", "a2", "a3")[3]))
    busy = lin.named(BASE, chain("sys", "a1", "a2", "a3", "a4"))  # a turn of a in flight: a is not idle
    assert busy is a
    rewritten = lin.named(BASE, chain("sys", "summary"))
    assert lin.created == rewritten and lin.superseded(rewritten) == b
    lin.finished(a, (4, chain("sys", "a1", "a2", "a3", "a4")[4]))
    again = lin.named(BASE, chain("sys", "summary 2"))  # rewritten still runs; a is idle again and finished last
    assert lin.superseded(again) == a
    assert lin.superseded(rewritten) is None  # asked for a branch the last call did not create
    inferred = lin.infer(None, None, chain("x", "y"))
    assert lin.created is None and lin.superseded(inferred) is None


def test_a_rewrite_supersedes_only_a_branch_whose_conversation_it_continues():
    """Given the conversations a rewrite continues (the engine's case), only an idle branch whose last turn sent one of
    them is named, the latest finished of those; never another conversation's branch under the same id."""
    lin = Lineage(LineageConfig())
    a = lin.named(BASE, chain("sys", "a1"))
    lin.note_conversation(a, "A1")
    lin.finished(a, (1, chain("sys", "a1")[1]))
    b = lin.named(BASE, chain("sys", "b1"))
    lin.note_conversation(b, "B1")
    lin.finished(b, (1, chain("sys", "b1")[1]))  # b finished last
    rewrite = lin.named(BASE, chain("sys", "summary of a"))
    assert lin.superseded(rewrite) == b  # the replay's rule: the latest idle branch
    assert lin.superseded(rewrite, {"A0", "A1"}) == a
    assert lin.superseded(rewrite, {"X"}) is None and lin.superseded(rewrite, ()) is None
    lin.note_conversation(rewrite, "A2")
    assert lin.entries[rewrite].conversation == "A2" and lin.entries[a].conversation == "A1"


def test_inferred_session_names_are_numbered_per_tenant():
    """Found by review: one server-wide counter named a key's first inferred session `inferred-4`, telling it three
    sessions of other keys came first."""
    lin = Lineage(LineageConfig())
    a = [lin.infer(None, "key-a", chain(f"a{i}")) for i in range(3)]
    b = lin.infer(None, "key-b", chain("b0"))
    assert [k.session_id for k in a] == ["inferred-1", "inferred-2", "inferred-3"] and b.session_id == "inferred-1"
    assert len({*a, b}) == 4  # the tenant keeps them apart


def test_inference_wants_the_earlier_prompts_last_words_repeated_but_not_its_rewritten_generation_prompt():
    """Found by review twice: on the hashes alone an unrelated prompt sharing only the system prompt joined; with an
    exact match on the tokens past the last full block, a template that renders its generation prompt differently
    once the answer follows (Qwen3's empty think block, a raw prompt's trailing space) split one conversation in two.
    Such a continuation renders the earlier prompt's last tokens anew after its own words, and ends with them again
    (its own generation prompt)."""
    from kvsched.core.lineage import TAIL_SLACK, tail_of

    block = 4
    system = [1, 2, 3, 4, 5, 6, 7, 8]  # two full blocks, shared by every user
    gen = [90, 91, 92, 93, 94]  # a generation prompt; 92..94 (the empty think block) are left out once answered
    first = [*system, 50, 51, *gen]  # the user's words (50, 51), then the generation prompt
    hashes = chain("s0", "s1", "u0")[:2]  # the prompt's full blocks: all system prompt
    lin = Lineage(LineageConfig())
    key = lin.infer(None, None, hashes, first, block)
    lin.finished(key, (1, hashes[1]), tail_of(first, 2 * block))
    stranger = [*system, 60, 61, *gen, 70, 71, *gen]
    assert lin.infer(None, None, chain("s0", "s1", "x", "x"), stranger, block) != key  # not its words: its own
    rewritten = [*system, 50, 51, 90, 91, 95, 96, 52, 53, *gen]  # answered (95, 96), the think block gone, asked again
    assert len(first) - 2 * block <= TAIL_SLACK
    assert lin.infer(None, None, chain("s0", "s1", "y", "y"), rewritten, block) == key
    long_tail = Lineage(LineageConfig())  # a 32-token block: a tail of up to 31 tokens, more than the 8 kept
    block, words = 32, list(range(500, 527))  # 27 tokens past the last full block
    prompt = [*range(1, 33), *words]
    k = long_tail.infer(None, None, chain("b0"), prompt, block)
    long_tail.finished(k, (0, chain("b0")[0]), tail_of(prompt, block))
    assert long_tail.infer(None, None, chain("b0", "b1"), [*prompt, 7, 7, 7, 7, 7, 7], block) == k
