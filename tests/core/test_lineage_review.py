"""Session lineage as a review found it wanting: several sessions per block hash, the whole tail compared, the answer
as an anchor, and branch numbers never handed out while something is kept under them (pure: hashes are tuples)."""

from __future__ import annotations

from kvsched.core.lineage import BUCKET, MAX_BRANCHES, Lineage, LineageConfig
from kvsched.core.lineage_tail import TAIL_SLACK, repeats, tail_of
from kvsched.core.sessions import SessionId, SessionKey

BLOCK = 4
BASE = SessionKey(SessionId("victim"))


def hashes_of(tokens: list[int]) -> list[tuple[int, ...]]:
    """vLLM's chained block hashes, played by the tuple of every token up to each full block's end."""
    return [tuple(tokens[: (i + 1) * BLOCK]) for i in range(len(tokens) // BLOCK)]


def finish(lin: Lineage, key: SessionKey, prompt: list[int], answer: list[int]) -> None:
    """The turn of `key` that sent `prompt` and got `answer` finished, as the engine reports it: the prompt's last full
    block and its tail, and the last full block of prompt and answer but the last sampled token."""
    hashes = hashes_of(prompt)
    anchor = (len(hashes) - 1, hashes[-1]) if hashes else None
    done = hashes_of([*prompt, *answer][:-1])
    lin.finished(key, anchor, tail_of(prompt, len(hashes) * BLOCK), (len(done) - 1, done[-1]) if done else None)


def infer(lin: Lineage, prompt: list[int]) -> SessionKey:
    return lin.infer(None, None, hashes_of(prompt), prompt, BLOCK)


def named(lin: Lineage, prompt: list[int], base: SessionKey = BASE) -> SessionKey | None:
    hashes = hashes_of(prompt)
    return lin.named(base, hashes, prompt, BLOCK, tail_of(prompt, len(hashes) * BLOCK))


SYSTEM = list(range(1, 9))  # two full blocks every user shares
ODD_SYSTEM = list(range(1, 11))  # two full blocks and two tokens of a third: the tail starts with system prompt


def test_users_whose_first_turns_end_on_the_same_block_are_all_found_again():
    """Found by review: the index held one session per block hash, so each user whose short first message followed the
    shared system prompt replaced the one before, and only the last was recognised on its second turn (1 of 5)."""
    lin = Lineage(LineageConfig())
    firsts = [[*SYSTEM, 50 + 10 * u, 51 + 10 * u] for u in range(5)]
    keys = []
    for p in firsts:
        keys.append(infer(lin, p))
        hashes = hashes_of(p)
        lin.finished(keys[-1], (len(hashes) - 1, hashes[-1]), tail_of(p, len(hashes) * BLOCK))  # no answer anchor
    assert len(set(keys)) == 5
    for key, p in zip(keys, firsts, strict=True):
        assert infer(lin, [*p, 99, 99, 99, 99, 7]) == key  # each user's second turn: its own session


def test_a_hash_holds_a_bounded_number_of_sessions_the_newest():
    lin = Lineage(LineageConfig())
    firsts = [[*SYSTEM, 1000 + u] for u in range(BUCKET + 4)]
    keys = []
    for p in firsts:
        keys.append(infer(lin, p))
        lin.finished(keys[-1], (1, hashes_of(p)[1]), tail_of(p, 2 * BLOCK))
    assert lin.stats()["inference_table_entries"] == BUCKET
    assert infer(lin, [*firsts[-1], 5, 5, 5, 5]) == keys[-1]
    assert infer(lin, [*firsts[0], 5, 5, 5, 5]) not in keys  # the oldest fell out of the hash's list


def test_a_system_prompt_off_the_block_boundary_does_not_chain_unrelated_users():
    """Found by review: the first 8 tokens past the last full block were still system prompt, so every user's first
    turn passed the check and five unrelated users became one session, each taking the pin of the one before."""
    lin = Lineage(LineageConfig())
    users = [[*ODD_SYSTEM, 50 + u] for u in range(5)]  # tails: two system prompt tokens, then the user's one word
    keys = []
    for p in users:
        keys.append(infer(lin, p))
        finish(lin, keys[-1], p, [7] * 6)
    assert len(set(keys)) == 5 and lin.stats()["inference_hits"] == 0
    for key, p in zip(keys, users, strict=True):
        assert infer(lin, [*p, *[7] * 6, 60, 61, 62]) == key
    lone = Lineage(LineageConfig())  # the same without the answer's anchor: the tail alone tells them apart
    a = infer(lone, users[0])
    lone.finished(a, (1, hashes_of(users[0])[1]), tail_of(users[0], 2 * BLOCK))
    assert infer(lone, [*ODD_SYSTEM, 70, 71, 72, 73, 74]) != a
    assert infer(lone, [*users[0], 7, 7, 7, 80]) == a


def test_the_tail_rule():
    """The digested part must be repeated; of the last TAIL_SLACK tokens, a differing one is forgiven only when the
    prompt ends with the rest (a generation prompt rendered anew, and sent again at the end), and only after at least
    one token of the tail was repeated (an empty compared part joins nothing)."""
    words = list(range(100, 100 + TAIL_SLACK + 5))  # 13 tokens: 5 digested, 8 kept as sent
    tail = tail_of([0, 0, 0, 0, *words], BLOCK)
    assert tail.length == len(words) and tail.slack == tuple(words[5:])
    assert repeats([0] * 4 + words + [1, 2], BLOCK, tail)  # repeated whole
    assert repeats([0] * 4 + words[:9] + [1, 2] + words[9:], BLOCK, tail)  # re-rendered, then ends with the rest
    assert not repeats([0] * 4 + words[:9] + [1, 2] + words[10:], BLOCK, tail)  # ends otherwise
    assert not repeats([0] * 4 + [99] + words[1:] + [1], BLOCK, tail)  # the digested part differs
    short = tail_of([0, 0, 0, 0, 50, 51], BLOCK)  # nothing digested: the first token must be repeated
    assert not repeats([0, 0, 0, 0, 60, 61, 50, 51], BLOCK, short)
    assert repeats([0, 0, 0, 0, 50, 9, 51], BLOCK, short) and repeats([0, 0, 0, 0, 50, 51], BLOCK, short)
    assert repeats([0, 0, 0, 0, 1, 2], BLOCK, tail_of([0, 0, 0, 0], BLOCK))  # no tail: the hashes said it all
    opaque = tail_of([0, 0, 0, 0, 50, 51], BLOCK, ((4, 5),))  # an image's placeholders past the last full block
    assert not repeats([0, 0, 0, 0, 50, 51, 52], BLOCK, opaque)
    assert not repeats([0, 0, 0, 0, 50, 51, 52], BLOCK, short, ((5, 6),))  # the compared words hold an image
    # A new image further on (a follow-up attaching one) leaves the compared words comparable (found by review: any
    # image past the tail's start refused the continuation, so every such turn split its session).
    assert repeats([0, 0, 0, 0, 50, 51, 7, 7, 7], BLOCK, short, ((6, 9),))
    assert not repeats([0, 0, 0, 0, 50, 9, 7, 7], BLOCK, tail_of([0, 0, 0, 0, 50, 51, 7, 7], BLOCK), ((6, 8),))


def test_a_named_branch_under_one_block_is_not_joined_by_any_turn():
    """Found by review: a branch whose prompt was under one block had no anchor and matched any turn, so a stranger
    under the victim's id joined it (and could end it). It is anchored on its prompt and answer now."""
    lin = Lineage(LineageConfig())
    prompt = [900, 901, 902]
    victim = named(lin, prompt)
    finish(lin, victim, prompt, [7] * 9)
    stranger = named(lin, [2000 + i for i in range(10)])
    assert stranger is not None and stranger != victim
    assert named(lin, [*prompt, *[7] * 9, 40, 41]) == victim  # the victim's next turn repeats its answer


def test_a_named_branch_after_a_shared_system_prompt_wants_its_own_words():
    """Found by review: named branches had no tail check, so a stranger sending the shared system prompt and other
    words under the victim's id joined the victim's branch."""
    lin = Lineage(LineageConfig())
    prompt = [*SYSTEM, 500, 501, 502]
    victim = named(lin, prompt)
    lin.finished(victim, (1, hashes_of(prompt)[1]), tail_of(prompt, 2 * BLOCK))  # no answer anchor: the tail decides
    assert named(lin, [*SYSTEM, 700, 701, 702, 703, 704]) not in (None, victim)
    assert named(lin, [*prompt, 7, 7, 8]) == victim


def test_a_concurrent_stranger_cannot_join_a_running_branch_by_the_system_prompt():
    lin = Lineage(LineageConfig())
    owner = named(lin, [*SYSTEM, 500, 501])  # running: anchored on its arrival
    assert named(lin, [*SYSTEM, 600, 601, 602, 603, 604]) not in (None, owner)


def test_a_branch_number_is_never_reused_while_something_is_kept_under_it():
    """Found by review: a session ended while its turn ran, or forgotten past the retired-numbers bound, gave its
    number to the id's next conversation, which then inherited its record (its turns, role, end, and the old turn's
    pin). `in_use` says what the engine still keeps."""
    live: set[SessionKey] = set()
    lin = Lineage(LineageConfig(), in_use=live.__contains__)
    victim = named(lin, [*SYSTEM, 1, 2])
    live.add(victim)
    lin.forget(victim)  # ended while its turn ran: the record stays until that turn finishes
    other = named(lin, [*SYSTEM, 3, 4])
    assert other is not None and other != victim and other.branch == victim.branch + 1
    small = Lineage(LineageConfig(max_entries=1), in_use=live.__contains__)
    first = named(small, [*SYSTEM, 5, 6])
    live.add(first)
    small.finished(first, (1, hashes_of([*SYSTEM, 5, 6])[1]))
    for i in range(3):  # other ids push it out of the table, then out of the retired numbers
        k = named(small, [*SYSTEM, 10 + i], SessionKey(SessionId(f"other-{i}")))
        small.finished(k, (1, hashes_of([*SYSTEM, 10 + i])[1]))
    assert first not in small.entries and BASE not in small._retired
    again = named(small, [*SYSTEM, 77, 78])
    assert again is not None and again != first


def test_past_the_branch_limit_the_turn_gets_no_branch():
    lin = Lineage(LineageConfig(), is_pinned=lambda _k: True)
    for i in range(MAX_BRANCHES):
        k = named(lin, [*SYSTEM, 100 + i])
        finish(lin, k, [*SYSTEM, 100 + i], [7] * 4)
    assert named(lin, [*SYSTEM, 999]) is None and lin.stats()["branch_overflows"] == 1


def test_a_named_tail_that_cannot_be_compared_or_is_re_rendered_whole_still_continues():
    """Found by review of the lineage fixes: a named session's own continuation became a new branch when its tail
    past the last full block was re-rendered whole (Qwen3's empty think block dropped from the history, then sent
    again as the generation prompt), held an image, or was prompt embeddings. Named, those continue; inferred (no id
    to trust) they do not, and a stranger's other words under the id still do not."""
    think = (7, 8, 9)  # the generation prompt's empty think block: the whole tail past the last full block
    tail = tail_of([0, 0, 0, 0, *think], BLOCK)
    turn2 = [0, 0, 0, 0, 40, 41, 42, 43, 50, 51, *think]  # the history without it, a user message, then it again
    assert repeats(turn2, BLOCK, tail, named=True) and not repeats(turn2, BLOCK, tail)
    assert not repeats([0, 0, 0, 0, 60, 61, 62, 63, 64], BLOCK, tail, named=True)  # a stranger's words
    image = ((4, 7),)  # the earlier tail held an image
    assert repeats([0, 0, 0, 0, 1, 1, 1, 5, 6], BLOCK, tail_of([0, 0, 0, 0, 1, 1, 1], BLOCK, image), image, named=True)
    assert not repeats([0, 0, 0, 0, 1, 1, 1, 5, 6], BLOCK, tail_of([0, 0, 0, 0, 1, 1, 1], BLOCK, image), image)


def test_a_turn_that_ends_its_session_joins_an_inferred_one_by_its_answer_only():
    """Found by review: a request without a session field that repeats an inferred session's prompt joins it (a
    retry, or another user's identical first prompt); with an end hint it ended that session, and the other user's
    pin and tier copies went with it. An ending turn joins only a session whose answer it repeats, which no stranger
    can send; without an end hint the identical prompt still joins (a retry)."""
    lin = Lineage(LineageConfig())
    prompt, answer = [*SYSTEM, 5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25]
    first = infer(lin, prompt)
    finish(lin, first, prompt, answer)
    stranger = lin.infer(None, None, hashes_of(prompt), prompt, BLOCK, ending=True)
    assert stranger != first
    lin.forget(stranger)  # its end
    follow = [*prompt, *answer, 30, 31, 32, 33, 34]
    assert lin.infer(None, None, hashes_of(follow), follow, BLOCK, ending=True) == first
    lin.abandoned(first)
    assert infer(lin, prompt) == first
