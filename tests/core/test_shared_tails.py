"""`kvsched.core.shared_tails`: a shared inferred session's other answers' partial last blocks stay in the tier beside
its own, at most the pin's cap of answers, until the sharing or the session ends."""

from __future__ import annotations

from kvsched.core.shared_tails import SharedTails
from kvsched.core.tier import TierConfig, TierDirectory

S = "session"


def directory() -> TierDirectory:
    return TierDirectory(TierConfig(budget_bytes=64 * 100), 100, lambda _owner: 0.0)


def answer(d: TierDirectory, tails: SharedTails, n: int, repeated: bool = True, other: bool = True) -> None:
    """A turn of S ends (a repeat of the shared prompt or not, with an answer the pin does not hold or not), then its
    tail `n` is saved, as the engine orders it."""
    tails.turn_finished(d, S, repeated, other)
    d.put_tail(S, f"block-{n}", (n, n + 1), block_id=n)


def held(d: TierDirectory) -> set[int]:
    return {t.tokens[0] for t in d.tail_of.values()}


def test_a_repeat_keeps_the_tail_it_replaces_up_to_the_cap_the_oldest_leaving_first():
    d, tails = directory(), SharedTails(cap=3)
    answer(d, tails, 1, repeated=False)  # A's first turn
    for n in (2, 3, 4):  # B, C, D repeat the prompt with other answers
        answer(d, tails, n)
    assert held(d) == {2, 3, 4} and d.tail_of[S].tokens[0] == 4 and len(tails.kept[S]) == 2
    answer(d, tails, 4, other=False)  # the same answer again (the pin's union grew by nothing): nothing is kept
    assert held(d) == {2, 3, 4} and len(tails.kept[S]) == 2
    assert tails.tail_after(d, S, "block-3").tokens == (3, 4) and tails.tail_after(d, S, "block-1") is None


def test_a_turn_that_continues_one_answer_or_the_end_lets_the_kept_tails_go():
    d, tails = directory(), SharedTails(cap=4)
    answer(d, tails, 1, repeated=False)
    answer(d, tails, 2)
    answer(d, tails, 5, repeated=False)  # continues one answer: the sharing is over
    assert held(d) == {5} and not tails.kept and d.used_slots == 1
    answer(d, tails, 6)
    tails.release(d, S)  # the session's end (`PinApplier.drop_tier`)
    d.drop_owner(S)
    assert not d.tail_of and d.used_slots == 0


def test_a_continuation_hands_the_other_answers_tails_to_the_companion_keeping_their_blocks():
    """A (1), B (2), C (3) answered; A's next turn continues A's answer and the companion `to` keeps B's and C's
    chains (`kvsched.core.shared_answers`): their tails stay under owners of `to`, A's goes with the sharing; the
    turn's own tail then replaces the session's, and the kept ones stay until `to` is released."""
    d, tails = directory(), SharedTails(cap=4)
    answer(d, tails, 1, repeated=False)
    answer(d, tails, 2)
    answer(d, tails, 3)
    tails.hand_over(d, S, "to", {"block-2", "block-3"})
    assert S not in tails.kept and len(tails.kept["to"]) == 2
    d.put_tail(S, "block-5", (5, 6), block_id=5)
    assert held(d) == {2, 3, 5} and d.used_slots == 3
    assert {tails.tail_after(d, "to", f"block-{n}").tokens[0] for n in (2, 3)} == {2, 3}
    tails.release(d, "to")
    assert held(d) == {5} and d.used_slots == 1


def test_cap_one_keeps_nothing_beside():
    d, tails = directory(), SharedTails(cap=1)
    answer(d, tails, 1, repeated=False)
    answer(d, tails, 2)
    assert held(d) == {2} and not tails.kept


def test_the_sessions_kept_are_bounded_the_least_recently_kept_first():
    d, tails = directory(), SharedTails(cap=2, max_sessions=2)
    for s in ("s1", "s2", "s3"):
        d.put_tail(s, f"{s}-a", (1, 2), block_id=1)
        tails.turn_finished(d, s, repeated=True)
        d.put_tail(s, f"{s}-b", (3, 4), block_id=2)
    assert list(tails.kept) == ["s2", "s3"] and sorted(t.parent for t in d.tail_of.values()) == [
        "s1-b", "s2-a", "s2-b", "s3-a", "s3-b"]


def test_a_returning_users_own_session_finds_the_tail_a_companion_keeps_and_a_return_lets_it_go():
    """After the hand-over, B's next turn is a session of its own ("b2"). Before: `tail_after` looked through that
    session and its own companions only, so the simulator recomputed B's partial block, which the engine (matching a
    tail by its parent and tokens, whoever owns it) loads. Now the companion's tails are found by their parent. When
    B's answer leaves the companion (`keep_after`: its full blocks no longer pinned there), its tail goes; C's stays
    until C's does."""
    d, tails = directory(), SharedTails(cap=4)
    answer(d, tails, 1, repeated=False)
    answer(d, tails, 2)
    answer(d, tails, 3)
    tails.hand_over(d, S, "to", {"block-2", "block-3"})
    d.put_tail(S, "block-5", (5, 6), block_id=5)  # A's next turn's own tail
    assert tails.tail_after(d, "b2", "block-2").tokens == (2, 3) and tails.tail_after(d, "b2", "block-9") is None
    tails.keep_after(d, "to", {"block-3"})
    assert held(d) == {3, 5} and tails.tail_after(d, "b2", "block-2") is None and len(tails.kept["to"]) == 1
    tails.keep_after(d, "to", set())
    assert held(d) == {5} and "to" not in tails.kept and not tails._handed and not tails._parent
