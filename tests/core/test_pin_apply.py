"""Exact block-level outcomes of applying the retention policy's decisions, on a list-backed pool that records every
call (the vLLM adapter and the simulator run this code; tests/sim/test_apply_equivalence.py compares them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import replace

from kvsched.core.config import RetentionConfig
from kvsched.core.pin_apply import Applied, PinApplier, split_exact
from kvsched.core.retention import Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from kvsched.core.tier import TierConfig, TierDirectory

A, B, C = (SessionKey(SessionId(s)) for s in "abc")
BS = 16
NO_HINTS = TurnHints()


class ListPool:
    """Blocks are ints; `capacity` blocks, of which those not referenced are free. Odd ids above 1000 are uncached.
    Nothing but the pins holds blocks here, so the pool's references are the pins'."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.ref: Counter[int] = Counter()
        self.freed: list[list[int]] = []  # every give_back, in the order given

    def allocate(self, blocks: list[int]) -> None:
        self.ref.update(blocks)

    def hold(self, blocks: list[int]) -> None:
        self.ref.update(blocks)

    def hold_allocated(self, blocks: list[int]) -> None:
        assert all(self.ref[b] for b in blocks)

    def give_back(self, blocks: list[int]) -> None:
        self.freed.append(list(blocks))
        self.ref.subtract(blocks)
        self.ref += Counter()  # drop zeros

    def num_free(self) -> int:
        return self.capacity - len(self.ref)

    def num_pinned(self) -> int:
        return len(self.ref)

    def cached_keys(self, blocks: list[int]) -> list[tuple[Hashable, int]]:
        return [(f"k{b}", b) for b in blocks if not (b > 1000 and b % 2)]


def make(clock, capacity=100, **config):
    policy = RetentionPolicy(replace(RetentionConfig(), **config), clock, capacity, bytes_per_token=1024.0)
    pins: PinApplier[int] = PinApplier(policy, ListPool(capacity), BS)
    pins.log = []
    return pins


def turn(pins, key, groups, hints=NO_HINTS, cached=0):
    """One whole turn of `key` that ends holding `groups`."""
    pins.policy.request_arrived(key, hints)
    pins.turn_started(key, cached)
    pins.turn_finished(key, hints, groups, len(groups[0]) * BS)


def test_a_pin_extends_in_place_holding_only_new_blocks_and_a_branch_gives_back_the_old_tail_first(clock):
    pins = make(clock)
    turn(pins, A, [[1, 2, 3]])
    pin = pins.pinned[A][0]
    turn(pins, A, [[1, 2, 3, 4, 5]], cached=3 * BS)
    assert pins.pinned[A][0] is pin and pin == [1, 2, 3, 4, 5] and pins.pool.ref == Counter({1: 1, 2: 1, 3: 1, 4: 1,
                                                                                              5: 1})
    turn(pins, A, [[1, 2, 7, 8]], cached=2 * BS)  # branches after block 2: the partial hit released 3..5 already
    assert pins.pool.freed == [[5, 4, 3]] and pin == [1, 2, 7, 8]
    assert set(pins.pool.ref) == {1, 2, 7, 8} and pins.log[-1] == Applied("pin", "a", blocks=4)


def test_a_repin_over_a_different_prefix_drops_what_it_no_longer_holds_tail_first(clock):
    pins = make(clock)
    turn(pins, A, [[1, 2, 3, 4]])
    pins.repin(A, [[1, 9]])
    assert pins.pool.freed == [[4, 3, 2]] and pins.pinned[A] == [[1, 9]] and set(pins.pool.ref) == {1, 9}


def test_shared_blocks_are_counted_once_and_stay_held_until_the_last_pin_goes(clock):
    pins = make(clock)
    turn(pins, A, [[1, 2, 3]])
    turn(pins, B, [[1, 2, 4]])
    assert len(pins.pool.ref) == 4 and pins.pool.ref[1] == 2 and pins.pool.num_pinned() == 4
    pins.apply(pins.policy.end(A))
    assert pins.pool.freed == [[3, 2, 1]] and set(pins.pool.ref) == {1, 2, 4} and pins.pool.ref[1] == 1
    assert pins.pool.num_free() == 97
    assert pins.log[-1] == Applied("release", "a", "end", 3, 0)


def test_a_partial_release_takes_each_groups_tail_in_proportion_and_demotes_cached_blocks_in_prefix_order(clock):
    pins = make(clock)
    demoted: list[tuple[SessionKey, list[tuple[Hashable, int]]]] = []
    dropped: list[SessionKey] = []
    directory = TierDirectory(TierConfig(budget_bytes=10 * 1024), 1024, lambda owner: 0.0)
    pins.attach_tier(directory, lambda key, blocks, start: demoted.append((key, blocks)) or len(blocks))
    pins.on_dropped = dropped.append
    turn(pins, A, [[1, 2, 3, 4], [11, 12, 1003, 1005]])  # two KV-cache groups; 1003 and 1005 are not cached
    assert pins.policy.sessions[A].pinned_blocks == 8
    pins.apply([Release(A, ReleaseReason.PRESSURE, 4)])  # 4 * 4/8 = 2 from each group
    assert pins.pool.freed == [[4, 3, 1005, 1003]] and pins.pinned[A] == [[1, 2], [11, 12]]
    assert demoted == [(A, [("k3", 3), ("k4", 4)])]
    assert pins.log[-1] == Applied("release", "a", "pressure", 4, 2) and dropped == []
    pins.apply([Release(A, ReleaseReason.TTL)])  # sessions return after their TTL: demoted too; the whole pin
    assert pins.pool.freed[-1] == [2, 1, 12, 11] and dropped == [A] and A not in pins.pinned
    assert len(demoted) == 2 and sorted(demoted[1][1]) == [("k1", 1), ("k11", 11), ("k12", 12), ("k2", 2)]
    turn(pins, B, [[21, 22]])
    pins.apply([Release(B, ReleaseReason.END)])  # an ended session will not come back: not demoted
    assert pins.pool.freed[-1] == [22, 21] and len(demoted) == 2 and dropped == [A, B]
    assert directory.value_of == pins.tier_value


def test_a_partial_release_of_two_groups_gives_back_exactly_the_blocks_the_policy_counted(clock):
    """Found by review (a hybrid model's full-attention and sliding-window groups): a ceiling per group released 2 + 2
    blocks for a 3-block release, and the policy's pinned_blocks stayed one above what the pin held."""
    pins = make(clock)
    turn(pins, A, [list(range(1, 11)), list(range(11, 21))])
    pins.apply(pins.policy.release_for_pressure(3))  # 1.5 + 1.5: the tie goes to the first group
    assert pins.pinned[A] == [list(range(1, 9)), list(range(11, 20))] and pins.pool.freed == [[10, 9, 20]]
    assert pins.policy.sessions[A].pinned_blocks == 17 == sum(map(len, pins.pinned[A])) == len(pins.pool.ref)
    assert split_exact(5, [3, 9]) == [1, 4]  # 1.25 + 3.75


def test_a_pin_with_a_group_shorter_than_another_is_released_whole_or_not_at_all(clock):
    """A hybrid model's sliding-window group past its window holds only the blocks before the prefix's end: once its
    tail goes, no hit can use the rest of the pin (vLLM's hybrid hit needs every group), so a release that asks for
    part of it takes it whole, and counts all of it towards the blocks asked for (the next pin is not touched)."""
    pins = make(clock)
    turn(pins, C, [list(range(51, 61)), list(range(61, 71))])  # equal groups (inside the window): tails may go
    turn(pins, B, [list(range(31, 40)), [88, 89]])  # a 2-block window at the end of a 9-block prefix
    policy = pins.policy
    assert policy.sessions[B].whole_only and not policy.sessions[C].whole_only
    releases = policy.release_blocks(5, ReleaseReason.BUDGET)
    assert releases == [Release(B, ReleaseReason.BUDGET)]  # 11 blocks released for 5 asked: none taken from C
    pins.apply(releases)
    assert B not in pins.pinned and policy.sessions[B].pinned_blocks == 0 and pins.pool.freed[-1] == [*range(39, 30, -1), 89, 88]
    assert policy.sessions[C].pinned_blocks == 20 == sum(map(len, pins.pinned[C])) == len(pins.pool.ref)
    assert policy.counters["released_blocks_budget"] == 11 and policy.pinned_blocks_total == 20
    # a turn that hits only part of a whole-only pin gives it all back (its request holds what it hit)
    turn(pins, B, [list(range(31, 40)), [88, 89]])
    pins.apply(policy.turn_started(B, 4 * BS))
    assert B not in pins.pinned and policy.sessions[B].pinned_blocks == 0


def test_a_sliding_window_group_is_held_anew_when_its_window_slides(clock):
    """A hybrid model's sliding-window group holds the window ending at the prefix's end (blocks at positions 4..5,
    then 5..6): nothing at a common index, so the whole new window is held before the old one is given back."""
    pins = make(clock)
    turn(pins, A, [[1, 2, 3, 4, 5, 6], [14, 15]])
    turn(pins, A, [[1, 2, 3, 4, 5, 6, 7], [15, 16]], cached=6 * BS)
    assert pins.pinned[A] == [[1, 2, 3, 4, 5, 6, 7], [15, 16]] and pins.pool.freed == [[15, 14]]
    assert pins.pool.ref == Counter({b: 1 for b in (1, 2, 3, 4, 5, 6, 7, 15, 16)})
    assert pins.policy.sessions[A].pinned_blocks == 9


def test_the_exact_split_sums_to_the_release_and_stays_within_each_group():
    assert split_exact(3, [10, 10]) == [2, 1] and split_exact(5, [3, 9]) == [1, 4]
    assert split_exact(4, [4, 4]) == [2, 2] and split_exact(0, [5, 5]) == [0, 0] and split_exact(2, [0, 3]) == [0, 2]
    for blocks in range(12):
        for sizes in ([11], [1, 10], [3, 4, 4], [0, 6, 5], [2, 2, 7]):
            parts = split_exact(blocks, sizes)
            assert sum(parts) == blocks and all(0 <= p <= n for p, n in zip(parts, sizes, strict=True))


def test_a_shortage_releases_other_sessions_first_about_the_shortfall_and_the_own_session_last(clock):
    pins = make(clock, capacity=20)
    turn(pins, A, [list(range(1, 9))])  # 8 blocks
    clock.advance(1.0)
    turn(pins, B, [list(range(21, 29))])  # 8 blocks, more recent: worth more
    pins.policy.request_arrived(B, NO_HINTS)
    # B's request needs 10 new tokens' blocks and 4 free: at least PRESSURE_CHUNK (4) blocks are released, from A
    assert pins.on_shortage(B, 10 * BS, own_free_hits=0) is True
    assert pins.log[-1] == Applied("release", "a", "pressure", 7) and pins.pool.num_free() == 11
    # nothing else to release but B's own pin: it goes rather than leave B's request waiting on it forever
    assert pins.on_shortage(B, 10 * BS) is True and pins.log[-1].session == "a"
    for _ in range(2):  # now the shortfall is covered by free blocks: a chunk at a time
        assert pins.on_shortage(B, 10 * BS) is True and pins.log[-1] == Applied("release", "b", "pressure", 4)
    assert pins.on_shortage(B, 10 * BS) is False and not pins.pinned


def test_a_shortage_that_releasing_every_pin_could_not_cover_releases_none(clock):
    """Found by review: a waiting request too large to fit beside the running ones released every pin each time it
    was tried (each engine step), for nothing: the pool kept no pin while it waited."""
    pins = make(clock, capacity=48)
    turn(pins, A, [list(range(1, 9))])  # 8 blocks
    turn(pins, B, [list(range(21, 29))])
    turn(pins, C, [list(range(41, 49))])
    pins.policy.request_arrived(C, NO_HINTS)
    pins.turn_started(C, 8 * BS)  # C's running turn holds all its pin: releasing it would free nothing
    pins.pool.allocate(list(range(100, 116)))  # 16 blocks other running requests hold: 8 free
    assert pins.policy.pressure_bound(None) == 16 and pins.policy.pressure_bound(C) == 24
    assert pins.on_shortage(None, 26 * BS) is False  # it lacks 17 at least (18 at most): A's and B's pins hold 16
    assert set(pins.pinned) == {A, B, C} and not [a for a in pins.log if a.op == "release"]
    assert pins.on_shortage(None, 25 * BS) is True and pins.log[-1].op == "release"  # lacks 16 at least: may fit


def test_make_room_never_takes_the_excluded_session(clock):
    pins = make(clock, capacity=20)
    turn(pins, A, [list(range(1, 9))])
    turn(pins, B, [list(range(21, 29))])
    pins.make_room(12, exclude=B)
    assert pins.pinned == {B: [list(range(21, 29))]} and pins.pool.num_free() == 12


def test_make_room_spares_sessions_with_a_request_queued_or_running(clock):
    """A queued request's prefetch makes room from idle sessions only: in a fan-out burst, taking the pin of the next
    queued turn would only make that turn's own prefetch (or recompute) take it back."""
    pins = make(clock, capacity=24)
    turn(pins, A, [list(range(1, 9))])
    turn(pins, B, [list(range(21, 29))])
    turn(pins, C, [list(range(41, 45))])
    clock.advance(5.0)  # B is the oldest-used pin but has a request waiting now
    pins.policy.request_arrived(B, NO_HINTS)
    pins.make_room(12, exclude=C)
    assert B in pins.pinned and pins.pinned[B] == [list(range(21, 29))]
    assert A not in pins.pinned and pins.pool.num_free() == 12  # A's 8 blocks + the 4 free: not B's
    pins.make_room(0, exclude=C)  # nothing asked: nothing released
    assert set(pins.pinned) == {B, C}


def test_an_adopted_prefetch_extends_the_pin_and_one_over_budget_is_given_back(clock):
    pins = make(clock, capacity=20, pin_budget_fraction=0.5)
    turn(pins, A, [[1, 2]])
    pins.pool.allocate([3, 4])  # a prefetch's new blocks come with their allocation's reference
    assert pins.adopt(A, [1, 2], [3, 4]) is True
    assert pins.pinned[A] == [[1, 2, 3, 4]] and set(pins.pool.ref) == {1, 2, 3, 4} and pins.log[-1].op == "prefetch"
    pins.pool.allocate(list(range(5, 12)))
    assert pins.adopt(A, [1, 2, 3, 4], list(range(5, 12))) is False  # 11 blocks > the budget of 10
    assert pins.pool.freed[-1] == list(range(11, 4, -1)) and pins.pinned[A] == [[1, 2, 3, 4]]
    assert set(pins.pool.ref) == {1, 2, 3, 4}


def test_the_budget_releases_the_overflow_and_the_last_turn_drops_the_sessions_tier_blocks(clock):
    pins = make(clock, capacity=20, pin_budget_fraction=0.5)
    directory = TierDirectory(TierConfig(budget_bytes=10 * 1024), 1024, lambda owner: 0.0)
    pins.attach_tier(directory, lambda key, blocks, start: len(directory.demote(key, blocks, start)))
    turn(pins, A, [list(range(1, 9))])
    turn(pins, B, [list(range(21, 29))], hints=TurnHints(role="orchestrator"))
    pins.enforce_budget()  # 16 pinned, budget 10: A's tail (a worker's: the lower value) goes to the tier
    assert len(pins.pool.ref) == 10 and pins.log[-1] == Applied("release", "a", "budget", 6, 6)
    assert directory.blocks_of(A) == 6
    turn(pins, A, [list(range(1, 3))], hints=TurnHints(end=True), cached=2 * BS)
    assert directory.blocks_of(A) == 0 and A not in pins.pinned


def test_the_tier_value_counts_the_sessions_tail_tokens(clock):
    pins = make(clock)
    directory = TierDirectory(TierConfig(budget_bytes=10 * 1024), 1024, lambda owner: 0.0)
    pins.attach_tier(directory, lambda key, blocks, start: len(directory.demote(key, blocks, start)))
    turn(pins, A, [[1, 2]])
    directory.demote(A, [("k1", 1)])
    blocks_only = pins.tier_value(A)
    directory.put_tail(A, "k1", [5, 6, 7], 9)
    assert pins.tier_value(A) > blocks_only > 0
    assert pins.tier_value(B) == 0.0 and pins.tier_value("not a session") == 0.0


def two_turns_at_once(pins, key, first, second, cached=0):
    """Two requests of `key` run at once (a conversation's turn and a side request sent with it, e.g. for a title);
    `first` finishes first. Each is (blocks,)."""
    for _ in range(2):
        pins.policy.request_arrived(key, NO_HINTS)
    pins.turn_started(key, cached)
    pins.turn_started(key, cached)
    pins.turn_finished(key, NO_HINTS, [first], len(first) * BS)
    pins.turn_finished(key, NO_HINTS, [second], len(second) * BS)


def test_a_shorter_turn_that_ran_beside_the_pinned_one_keeps_the_longer_pin(clock):
    """Mooncake's conversation trace: a one-block side request beside a session's long turn, finishing after it, used
    to replace the session's pin and give back the long prefix the next turn continued (conversation at live 1.5x:
    0.054% more prefill than LRU)."""
    pins = make(clock)
    long = [1, 2, 3, 4, 5]
    two_turns_at_once(pins, A, long, [1, 9])
    assert pins.pinned[A] == [long] and pins.pool.freed == [] and set(pins.pool.ref) == set(long)
    rec = pins.policy.sessions[A]
    assert rec.pinned_blocks == 5 and rec.pinned_tokens == 5 * BS and not rec.pin_overlapped
    assert pins.policy.counters["pins_kept_over_overlapping_turn"] == 1
    clock.advance(rec.ttl_s - 1)
    pins.expire()
    assert pins.pinned[A] == [long]  # its TTL runs from the later turn's end


def test_a_longer_turn_that_ran_beside_the_pinned_one_takes_the_pin(clock):
    pins = make(clock)
    two_turns_at_once(pins, A, [1, 9], [1, 2, 3, 4, 5])
    assert pins.pinned[A] == [[1, 2, 3, 4, 5]] and pins.pool.freed == [[9]]
    assert pins.policy.counters["pins_kept_over_overlapping_turn"] == 0


def test_a_shorter_turn_after_the_session_ran_alone_again_replaces_the_pin(clock):
    """Only turns that overlapped keep the longer pin: a later turn on a shorter prefix (an edited or compacted
    history) is what the session continues."""
    pins = make(clock)
    two_turns_at_once(pins, A, [1, 2, 3, 4, 5], [1, 9])
    turn(pins, A, [[1, 2, 3, 4, 5, 6]], cached=5 * BS)  # alone: extends
    turn(pins, A, [[1, 7]], cached=BS)  # alone, shorter: replaces
    assert pins.pinned[A] == [[1, 7]] and set(pins.pool.ref) == {1, 7}
    assert pins.policy.counters["pins_kept_over_overlapping_turn"] == 1


def test_a_pin_restored_from_the_tier_is_one_group_and_releases_its_tail_again(clock):
    """`prefetched` makes the pin one group (`PinApplier.adopt`): the whole-only mark of an earlier windowed pin goes."""
    pins = make(clock)
    turn(pins, B, [list(range(31, 40)), [88, 89]])
    policy = pins.policy
    assert policy.sessions[B].whole_only
    policy.prefetched(B, 14 * BS, 14)
    assert not policy.sessions[B].whole_only
    assert policy.release_blocks(3, ReleaseReason.PRESSURE) == [Release(B, ReleaseReason.PRESSURE, 3)]
