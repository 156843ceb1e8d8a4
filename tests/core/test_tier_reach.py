"""A full FP8 tier gives up its copies of blocks the KV pool holds before any block only the tier has (`tier_reach`).

A session that restored its prefix from the tier pins it again, and its tier copies stay listed: while the pin holds
them they save nothing, and its release demotes them again. Evicting the oldest session's deepest blocks instead threw
away the only copies of blocks a restore would load (`kvsched simulate --generate --quick --fp8-tier-gib 4`: 1,351,139
prefill tokens at fba001e, 1,269,038 with this order; BENCHMARKS.md)."""

from __future__ import annotations

from kvsched.core.tier import TierConfig, TierDirectory


def _tier(slots: int, held: set[str] | None = None, eviction: str = "recency",
          values: dict[str, float] | None = None) -> TierDirectory:
    d = TierDirectory(TierConfig(budget_bytes=slots * 1024, eviction=eviction), 1024,
                      lambda owner: (values or {}).get(str(owner), 0.0))
    if held is not None:
        d.reach.pool_holds = held.__contains__
    return d


def _blocks(*keys: str) -> list[tuple[str, int]]:
    return [(k, i) for i, k in enumerate(keys)]


def test_a_copy_the_pool_holds_goes_before_the_oldest_sessions_only_copy():
    """A (oldest) holds a1..a3 only here; B re-pinned b1..b3 after restoring them. C's demotion needs 2 slots: B's
    deepest copies go, A's chain stays whole (before: a3, a2 went, and A's restore reached 1 block of 3)."""
    held = {"b1", "b2", "b3"}
    d = _tier(6, held)
    d.demote("A", _blocks("a1", "a2", "a3"), 0)
    d.demote("B", _blocks("b1", "b2", "b3"), 0)
    d.demote("C", _blocks("c1", "c2"), 0)
    assert d.keys_of["A"] == ["a1", "a2", "a3"] and d.keys_of["B"] == ["b1"]
    assert len(d.match(["a1", "a2", "a3"], 0, 3)) == 3
    assert {"c1", "c2"} <= d.slot_of.keys()


def test_only_the_held_blocks_go_first_then_the_usual_order():
    """B's pin holds b1, b2 only (its b3 was released and only the tier has it): b2, b1 cannot go first while b3 is
    listed after them, so B's held pass stops at once and the oldest session, A, loses its deepest block."""
    d = _tier(6, {"b1", "b2"})
    d.demote("A", _blocks("a1", "a2", "a3"), 0)
    d.demote("B", _blocks("b1", "b2", "b3"), 0)
    d.demote("C", _blocks("c1"), 0)
    assert d.keys_of["A"] == ["a1", "a2"] and d.keys_of["B"] == ["b1", "b2", "b3"]


def test_the_held_pass_takes_what_the_pool_holds_and_the_rest_follows_the_usual_order():
    """B's copies (all held) go first, deepest first; a demotion needing more then takes A's deepest blocks."""
    d = _tier(6, {"b1", "b2"})
    d.demote("A", _blocks("a1", "a2", "a3", "a4"), 0)
    d.demote("B", _blocks("b1", "b2"), 0)
    d.demote("C", _blocks("c1", "c2", "c3"), 0)
    assert "B" not in d.keys_of and d.keys_of["A"] == ["a1", "a2", "a3"]
    assert d.counters["evicted_blocks"] == 3


def test_a_shared_held_block_only_loses_an_owner():
    """A system prompt both sessions list and the pool holds: B's held pass disowns it (no slot freed), the next
    victims give the slot."""
    d = _tier(4, {"s1"})
    d.demote("A", _blocks("s1", "a2"), 0)
    d.demote("B", _blocks("s1"), 0)
    d.demote("D", _blocks("d1", "d2"), 0)
    d.demote("C", _blocks("c1"), 0)
    assert "s1" in d.slot_of and d.owners["s1"] == frozenset({"A"})
    assert "B" not in d.keys_of and d.keys_of["A"] == ["s1"]


def test_the_value_order_still_spares_a_session_worth_more_than_the_writer():
    """By value, B (worth more than the writer C) keeps its held copies; A (worth less) gives way as before."""
    d = _tier(5, {"b1", "b2"}, eviction="value", values={"A": 1.0, "B": 9.0, "C": 5.0})
    d.demote("A", _blocks("a1", "a2", "a3"), 0)
    d.demote("B", _blocks("b1", "b2"), 0)
    d.demote("C", _blocks("c1"), 0)
    assert d.keys_of["B"] == ["b1", "b2"] and d.keys_of["A"] == ["a1", "a2"]


def test_without_the_pool_query_the_oldest_sessions_deepest_block_goes():
    d = _tier(6)
    d.demote("A", _blocks("a1", "a2", "a3"), 0)
    d.demote("B", _blocks("b1", "b2", "b3"), 0)
    d.demote("C", _blocks("c1", "c2"), 0)
    assert d.keys_of["A"] == ["a1"] and d.keys_of["B"] == ["b1", "b2", "b3"]


# ---- the pool's answers within a pass of releases (`Reach.batch`) ----------------------------------------------------
class _Pool:
    """A pool whose pins hold keys: `pool_holds` counts its calls; `release` demotes a pin's keys, then gives them back
    (as `PinApplier.unpin` does)."""

    def __init__(self, d: TierDirectory) -> None:
        self.held: set[str] = set()
        self.asked: list[str] = []
        self.d = d
        d.reach.pool_holds = self.holds

    def holds(self, key: object) -> bool:
        self.asked.append(str(key))
        return key in self.held

    def release(self, owner: str, *keys: str) -> None:
        self.d.demote(owner, _blocks(*keys), 0)
        self.held.difference_update(keys)


def test_within_a_pass_an_answer_about_a_block_given_back_is_asked_again():
    """B's pin holds b1, b2 (listed in the tier too). D's release evicts B's b2 (held: the pool said so); B's own
    release then demotes b1, b2 and gives them back; E's release must not take B's b2 for held any more: A's deepest
    block, the oldest session's, goes. With the answer about b2 kept from D's release (no `released`), E evicted b2,
    a copy only the tier then had."""
    d = _tier(4)
    pool = _Pool(d)
    d.demote("A", _blocks("a1", "a2"), 0)
    d.demote("B", _blocks("b1", "b2"), 0)
    pool.held.update({"b1", "b2"})

    def releases() -> None:
        pool.release("D", "d1")  # evicts B's held b2
        assert "b2" not in d.slot_of and d.keys_of["A"] == ["a1", "a2"]
        pool.release("B", "b1", "b2")  # b2 back in the tier (A's a2 goes for it); b1, b2 given back
        assert d.keys_of["B"] == ["b1", "b2"] and d.keys_of["A"] == ["a1"]
        pool.release("E", "e1")  # nobody's deepest block is held: the oldest, A, gives a1
        assert "A" not in d.keys_of and d.keys_of["B"] == ["b1", "b2"]

    d.reach.batch(releases)
    assert set(d.slot_of) == {"d1", "b1", "b2", "e1"}


def test_within_a_pass_the_pool_is_asked_once_per_key_and_the_decisions_are_the_same():
    """Six releases into a full tier, in a pass and not: the same evictions; in the pass the pool is asked about each
    key once (a released key's answer is forgotten, but nobody's deepest block is one here), outside it every time."""
    runs = []
    for in_pass in (True, False):
        d = _tier(6)
        pool = _Pool(d)
        for owner in "ABC":
            d.demote(owner, _blocks(f"{owner}1", f"{owner}2"), 0)
        pool.held.update({"C1", "C2"})

        def releases(d: TierDirectory = d, pool: _Pool = pool) -> None:
            for owner in "DEFGHI":
                pool.release(owner, f"{owner}1")

        d.reach.batch(releases) if in_pass else releases()
        runs.append((dict(d.keys_of), sorted(d.slot_of), pool.asked))
    (kept, slots, asked), (kept_without, slots_without, asked_without) = runs
    assert kept == kept_without and slots == slots_without
    assert len(asked) == len(set(asked)) < len(asked_without)
