"""A session's blocks in the FP8 tier stay in chain order whatever order its pin released them in (`tier_chain`).

The tier evicts a session's blocks from the tail of its list, so that what stays is a prefix a restore can reach (a
restore runs along the chain from the pool's hit). A pin is released tail first, a batch at a time: pressure takes its
last blocks, its TTL later the rest, whose batch comes before the first one in the chain. Listed in the order of the
demotions (k5, k6, k1..k4), a full tier evicted k4 and kept k5, k6, which no restore can reach."""

from __future__ import annotations

import pytest

from kvsched.core.sessions import SessionId, SessionKey, TurnHints
from kvsched.core.tier import TierConfig, TierDirectory
from tests.core.test_pin_apply import BS, A, B, make, turn
from tests.core.test_shared_answers_order import _companion


def _tiered(clock, slots: int = 8):
    pins = make(clock)
    d = TierDirectory(TierConfig(budget_bytes=slots * 1024), 1024, lambda owner: 0.0)
    # `*at`: the chain position the applier passes (the same test, run on an applier that passes none, fails)
    pins.attach_tier(d, lambda key, blocks, *at: len(d.demote(key, blocks, *at)))
    return pins, d


def _keys(*blocks: int) -> list[str]:
    return [f"k{b}" for b in blocks]


def test_a_pin_released_in_two_steps_is_listed_in_chain_order_and_a_full_tier_evicts_its_tail(clock):
    """The reproducer: pressure takes the pin's last 2 blocks, its TTL the other 4; then another session needs a slot
    of the full tier: A's last block goes, and A's restore still reaches 5 blocks (k4 went before: 0 reachable past
    k3, and k5, k6 held for nothing)."""
    pins, d = _tiered(clock)
    turn(pins, A, [[1, 2, 3, 4, 5, 6]])
    pins.apply(pins.policy.release_for_pressure(2))
    assert d.keys_of[A] == _keys(5, 6)
    clock.now += 1e6
    pins.expire()
    assert A not in pins.pinned and d.keys_of[A] == _keys(1, 2, 3, 4, 5, 6)
    d.demote("other", [("x1", 11), ("x2", 12), ("x3", 13)])  # 8 slots, 6 used: one of A's goes
    assert d.keys_of[A] == _keys(1, 2, 3, 4, 5) and "k6" not in d.slot_of
    assert len(d.match(_keys(1, 2, 3, 4, 5, 6), 0, 6)) == 5


def test_several_partial_releases_and_a_last_one_keep_the_chain(clock):
    pins, d = _tiered(clock, slots=16)
    turn(pins, A, [list(range(1, 9))])
    for n in (2, 3, 1):  # 7..8, then 4..6, then 3
        pins.apply(pins.policy.release_for_pressure(n))
    assert d.keys_of[A] == _keys(3, 4, 5, 6, 7, 8)
    clock.now += 1e6
    pins.expire()
    assert d.keys_of[A] == _keys(*range(1, 9))


def test_a_turn_that_repins_a_longer_chain_and_releases_again_fills_the_hole_in_place(clock):
    """Turn 1's pin (4 blocks) expires into the tier; turn 2 hits them and pins 8; pressure takes 7..8 (a hole at
    5..6), its TTL the rest: 5, 6 go between 4 and 7, and the tier's eviction takes 8 first."""
    pins, d = _tiered(clock, slots=10)
    turn(pins, A, [[1, 2, 3, 4]])
    clock.now += 1e6
    pins.expire()
    assert d.keys_of[A] == _keys(1, 2, 3, 4)
    turn(pins, A, [list(range(1, 9))], cached=4 * BS)
    pins.apply(pins.policy.release_for_pressure(2))
    assert d.keys_of[A] == _keys(1, 2, 3, 4, 7, 8)
    clock.now += 1e6
    pins.expire()
    assert d.keys_of[A] == _keys(*range(1, 9))
    d.demote("other", [("x1", 11), ("x2", 12), ("x3", 13)])
    assert d.keys_of[A] == _keys(*range(1, 8))


def test_a_shared_prefix_keeps_each_owners_order(clock):
    """B's pin shares A's first two blocks: each session's list is its own chain (a key's position is per owner)."""
    pins, d = _tiered(clock, slots=16)
    turn(pins, A, [[1, 2, 3, 4]])
    turn(pins, B, [[1, 2, 5, 6, 7]])
    pins.apply(pins.policy.release_for_pressure(2, exclude=[A]))  # B's 6, 7
    pins.apply(pins.policy.release_for_pressure(1, exclude=[B]))  # A's 4
    clock.now += 1e6
    pins.expire()
    assert d.keys_of[A] == _keys(1, 2, 3, 4) and d.keys_of[B] == _keys(1, 2, 5, 6, 7)


@pytest.mark.parametrize("k", range(1, 8))
def test_a_companion_of_several_answers_released_in_two_steps_keeps_each_answer_a_prefix(clock, k):
    """A shared session's companion keeps B's, C's and D's answers (the union's order, `shared_answers`): pressure
    takes `k` of its 8 blocks, its TTL the rest; its list is the pin's order, so the tier evicts as the pin released:
    whatever it takes, what stays of each answer is a prefix of its chain."""
    e, key, other, d, chains = _companion(clock)
    before = list(e.pins.pinned[other][0])
    e.pins.apply(e.policy.release_for_pressure(k, exclude=[key]))
    clock.now += 1e6
    e.pins.expire()
    assert other not in e.pins.pinned and d.keys_of[other] == [f"k{b}" for b in before]
    for n in range(1, 9):  # the tier's eviction takes the list's tail: n blocks of it
        left = [int(s[1:]) for s in d.keys_of[other][:8 - n]]
        for chain in chains.values():
            mine = [x for x in chain if x in left]
            assert mine == chain[:len(mine)]


def test_a_demotion_without_a_position_goes_after_the_owners_blocks_and_one_with_goes_in_place():
    d = TierDirectory(TierConfig(budget_bytes=16 * 1024), 1024, lambda owner: 0.0)
    d.demote("a", [("k5", 5), ("k6", 6)], 4)
    d.demote("a", [("k1", 1), ("k2", 2)], 0)
    d.demote("a", [("k3", 3), ("k4", 4)], 2)
    assert d.keys_of["a"] == _keys(1, 2, 3, 4, 5, 6)
    assert d.admit("a", ["k1", "k2", "k3", "k4", "k5", "k6", "k7"], 0) == [("k7", 6)]  # a fetch's run, held part first
    d.demote("a", [("k9", 9)])  # no position: the tail (the order of the demotions, as before positions)
    assert d.keys_of["a"] == _keys(1, 2, 3, 4, 5, 6, 7, 9) and d.position_of["a"]["k9"] == 7
    d.demote("b", [("k2", 2)], 5)  # a shared key: its place is per owner (a pin of several answers)
    assert d.position_of["b"] == {"k2": 5} and d.position_of["a"]["k2"] == 1


def test_a_dropped_evicted_or_ended_owners_positions_go_with_its_keys():
    d = TierDirectory(TierConfig(budget_bytes=4 * 1024), 1024, lambda owner: 0.0)
    d.demote("a", [("k3", 3), ("k4", 4)], 2)
    d.demote("a", [("k1", 1), ("k2", 2)], 0)
    d.forget(["k2"])
    assert d.keys_of["a"] == _keys(1, 3, 4) and d.position_of["a"] == {"k1": 0, "k3": 2, "k4": 3}
    d.demote("b", [("x1", 11), ("x2", 12)], 0)  # 4 slots: a's tail goes
    assert d.keys_of["a"] == _keys(1, 3) and d.position_of["a"] == {"k1": 0, "k3": 2}
    d.drop_owner("a")
    assert "a" not in d.position_of and set(d.position_of) == {"b"}
    d.clear()
    assert d.position_of == {}


def test_a_sessions_partial_last_block_is_listed_apart_and_yields_before_its_chain(clock):
    """The tier's partial last blocks are not in the owner's list (one per session, `tail_of`, after the chain's last
    full block): a demotion that needs a slot evicts another session's tail before any full block."""
    pins, d = _tiered(clock)
    turn(pins, A, [[1, 2, 3, 4, 5, 6]])
    pins.apply(pins.policy.release_for_pressure(2))
    d.put_tail(A, "k6", [7, 8], 99)
    clock.now += 1e6
    pins.expire()
    assert d.keys_of[A] == _keys(1, 2, 3, 4, 5, 6) and d.tail_of[A].parent == "k6" and d.used_slots == 7
    d.demote("other", [("x1", 11), ("x2", 12)])
    assert A not in d.tail_of and d.keys_of[A] == _keys(1, 2, 3, 4, 5, 6)
    d.demote("other", [("x3", 13)])
    assert d.keys_of[A] == _keys(1, 2, 3, 4, 5)


def test_an_end_drops_the_whole_chain(clock):
    pins, d = _tiered(clock)
    turn(pins, A, [[1, 2, 3, 4]])
    pins.apply(pins.policy.release_for_pressure(2))
    turn(pins, A, [[1, 2]], hints=TurnHints(end=True), cached=2 * BS)
    assert A not in d.keys_of and A not in d.position_of and d.used_slots == 0


def _budget_pass(clock, in_pass: bool):
    """Six sessions pin 6 blocks each over a 20-block budget; the full tier (10 slots) lists X's blocks (no pin's), all
    of B's pinned blocks (a restored copy) and A's first two. The budget's pass releases A, B, then 4 of C's blocks
    into it; the pool answers from the pins' references."""
    from kvsched.core import tier_reach

    pins = make(clock, capacity=60, pin_budget_fraction=1 / 3)
    d = TierDirectory(TierConfig(budget_bytes=10 * 1024), 1024, lambda owner: 0.0)
    pins.attach_tier(d, lambda key, blocks, *at: len(d.demote(key, blocks, *at)))
    asked: list[str] = []
    d.reach.pool_holds = lambda key: asked.append(str(key)) or pins.pool.ref[int(str(key)[1:])] > 0
    sessions = [SessionKey(SessionId(s)) for s in "abcdef"]
    for i, key in enumerate(sessions):
        turn(pins, key, [list(range(10 * i + 1, 10 * i + 7))])
        clock.now += 1
    d.demote("X", [("k1001", 1001), ("k1002", 1002)], 0)
    d.demote(sessions[1], [(f"k{b}", b) for b in range(11, 17)], 0)
    d.demote(sessions[0], [("k1", 1), ("k2", 2)], 0)
    batch = tier_reach.Reach.batch
    try:
        if not in_pass:
            tier_reach.Reach.batch = lambda self, releases: releases()  # type: ignore[method-assign]
        pins.enforce_budget()
    finally:
        tier_reach.Reach.batch = batch  # type: ignore[method-assign]
    return {str(k): v for k, v in d.keys_of.items()}, sorted(map(str, d.slot_of)), asked, pins.log


def test_the_budgets_pass_asks_the_pool_less_and_evicts_as_without_the_pass(clock):
    """A's release evicts B's held copies k16..k13 (the pool said B's pin holds them); B's release demotes them again
    and gives them back: C's release must not take B's copies for held: A's blocks go (the oldest session's). With the
    pool's answers about k13..k16 kept from A's release, C's took B's four deepest blocks."""
    kept, slots, asked, log = _budget_pass(clock, True)
    kept_without, slots_without, asked_without, log_without = _budget_pass(type(clock)(), False)
    assert [(a.session, a.blocks) for a in log if a.op == "release"] == [("a", 6), ("b", 6), ("c", 4)]
    assert log == log_without and kept == kept_without and slots == slots_without
    b, c = (str(SessionKey(SessionId(s))) for s in "bc")
    assert kept == {b: _keys(11, 12, 13, 14, 15, 16), c: _keys(23, 24, 25, 26)}
    assert len(asked) < len(asked_without)


@pytest.mark.parametrize("trigger", ["ttl", "pressure"])
def test_the_ttl_and_pressure_passes_keep_the_pools_answers_too(clock, trigger):
    """Three pins released at once (their TTL, or a request short of blocks) into a full tier: the pool is asked
    only within the pass, and about no key twice (nobody's deepest block is one of the released ones)."""
    pins = make(clock, capacity=24)
    d = TierDirectory(TierConfig(budget_bytes=6 * 1024), 1024, lambda owner: 0.0)
    pins.attach_tier(d, lambda key, blocks, *at: len(d.demote(key, blocks, *at)))
    asked: list[tuple[str, bool]] = []
    d.reach.pool_holds = lambda key: asked.append((str(key), d.reach._memo is not None)) or False
    d.demote("X", [(f"x{i}", 1000 + i) for i in range(6)], 0)
    for i, key in enumerate(SessionKey(SessionId(s)) for s in "abc"):
        turn(pins, key, [list(range(10 * i + 1, 10 * i + 7))])
    if trigger == "ttl":
        clock.now += 1e6
        pins.expire()
    else:
        assert pins.on_shortage(None, 24 * BS)
    assert sum(a.op == "release" for a in pins.log) >= 2 and asked
    assert all(in_pass for _, in_pass in asked) and len({k for k, _ in asked}) == len(asked)
