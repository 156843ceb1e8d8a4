"""The order of a companion's blocks when it keeps several answers (`kvsched.core.shared_answers`): why it is right.

One list cannot be one prefix in position order when it holds several answers (index i is not position i: the
block-pool invariants' position check failed on such pins, tests/adapters/vllm/pool_invariants.py). The companion's
pin is the union pin's order filtered: the shared prompt, then each answer's own blocks in the order the answers
came, each answer's blocks a prefix of its chain in position order. Every consumer of the order takes the list's
tail first (a pressure or budget release, the pool's free order, the tier's demotion run and its eviction), so what a
release leaves of each answer is a prefix of it: never a hole (a block given back while a later block of the same
answer stays pinned, unusable, as a hit runs from block 0). Checked here for every release size, with answers that
share a block past the prompt, and across a user's return (`leave`)."""

from __future__ import annotations

import pytest

from kvsched.core.tier import TierConfig, TierDirectory
from tests.core.test_shared_turns import A_ANSWER, B_ANSWER, FIRST, Engine

C_ANSWER = [90, 91, *range(80, 88)]  # B's first two tokens: C's first answer block is B's (the same content)
D_ANSWER = list(range(120, 130))


def _companion(clock):
    """A, B, C and D answered one prompt; A's next turn continued A's: the companion keeps B's, C's and D's."""
    e = Engine(clock)
    directory = TierDirectory(TierConfig(budget_bytes=64 * 1024), 1024, lambda owner: 0.0)
    e.pins.attach_tier(directory, lambda key, blocks, start: len(directory.demote(key, blocks, start)))
    a1 = e.arrive(FIRST)
    e.finish(a1, A_ANSWER)
    chains = {n: e.finish(e.arrive(FIRST), answer) for n, answer in (("b", B_ANSWER), ("c", C_ANSWER),
                                                                       ("d", D_ANSWER))}
    e.finish(e.arrive([*FIRST, *A_ANSWER, 70, 71, 72]), [73, 74])
    other = a1[0]._replace(branch=-1)
    b, c, d = chains["b"], chains["c"], chains["d"]
    assert c[:4] == b[:4] and e.pins.pinned[other] == [[*b, c[4], *d[3:]]]  # prompt, B's, C's own, D's
    return e, a1[0], other, directory, chains


def _holes(pin: list[int], chains: dict[str, list[int]]) -> list[str]:
    """The answers whose blocks in `pin` are not a prefix of their chain in the pin's order."""
    return [n for n, chain in chains.items() if [x for x in pin if x in chain] != chain[:len(set(pin) & set(chain))]]


@pytest.mark.parametrize("k", range(1, 8))
def test_a_release_of_any_size_leaves_each_answer_a_prefix_and_demotes_its_blocks_in_order(clock, k):
    """Pressure releases `k` of the companion's 8 blocks: each answer keeps a prefix of its chain; the pool gets them
    back each answer's later blocks first (the first evicted first), and the tier stores them each answer's earlier
    blocks first (a run a restore can use). The newest answer goes first, whole (D's 2 blocks), then C's own, then
    B's: the answers' users came back in the order they asked, as far as anything tells (`OtherAnswers`)."""
    e, key, other, directory, chains = _companion(clock)
    before = list(e.pins.pinned[other][0])
    e.pins.apply(e.policy.release_for_pressure(k, exclude=[key]))
    pin = e.pins.pinned[other][0]
    assert pin == before[:8 - k] and not _holes(pin, chains)
    freed = e.pins.pool.freed[-1]
    assert freed == before[8 - k:][::-1] and not _holes(freed[::-1], {n: [x for x in ch if x in freed]
                                                                     for n, ch in chains.items()})
    demoted = [int(s[1:]) for s in directory.keys_of[other]]
    for chain in chains.values():
        mine = [x for x in demoted if x in chain]
        assert mine == sorted(mine, key=chain.index) and (not mine or chain[chain.index(mine[0]) - 1] in pin)
    assert e.policy.sessions[other].pinned_blocks == len(pin)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_a_users_return_after_a_release_leaves_the_others_a_prefix_each(clock, k):
    """B comes back after pressure took `k` blocks of the companion: B's answer leaves it, and what stays of C's and
    D's answers is still a prefix of each, in order (C's block shared with B stays: C's chain holds it)."""
    e, key, other, _, chains = _companion(clock)
    e.pins.apply(e.policy.release_for_pressure(k, exclude=[key]) if k else [])
    kept = list(e.pins.pinned[other][0])
    e.finish(e.arrive([*FIRST, *B_ANSWER, 110, 111, 112]), [113, 114])
    pin = e.pins.pinned[other][0]
    b = set(chains["b"]) - set(chains["c"]) - set(chains["d"])
    assert pin == [x for x in kept if x not in b] and not _holes(pin, {n: chains[n] for n in "cd"})
    assert e.policy.sessions[other].pinned_blocks == len(pin)
