"""The payback tracker on the engine's keys: vLLM's block hashes (bytes digests) are sampled by their first byte,
filtered in C, and the ghost keeps the same books on them as on the simulator's integer ids."""

from __future__ import annotations

import hashlib
import random

from kvsched.core.ghost_lru import MEMO_LIMIT, LruGhost
from kvsched.core.pin_payback import MIN_GHOST_BLOCKS, PaybackConfig, PinPayback


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def ghost(p: PinPayback) -> LruGhost:
    assert isinstance(p.ghost, LruGhost)  # the reference (tests/ops/test_ghost.py: the compiled one decides the same)
    return p.ghost


def test_block_hashes_are_sampled_by_their_first_byte_at_the_configured_rate() -> None:
    p = PinPayback(PaybackConfig(sampling=8), total_blocks=8 * MIN_GHOST_BLOCKS * 4)
    keys = [digest(i) for i in range(8000)]
    picked = list(ghost(p)._sampled(keys))
    assert picked == [(i, k) for i, k in enumerate(keys) if k[0] < 32]  # positions kept, prefix order
    assert 0.115 < len(picked) / len(keys) < 0.135  # 1 in 8
    ints = list(ghost(p)._sampled(list(range(8000))))  # the simulator's ids: the mixed hash, as before
    assert ints and all(type(k) is int for _, k in ints) and 0.115 < len(ints) / 8000 < 0.135


def test_the_ghost_keeps_the_same_books_on_digests_as_on_ids() -> None:
    """The same requests, once as integer ids and once as their digests, every key sampled: the same hits."""
    rng = random.Random(7)
    sides = [PinPayback(PaybackConfig(sampling=1, window=10, cooldown=10), total_blocks=40) for _ in range(2)]
    for _ in range(300):
        start = rng.randrange(0, 60)
        ids = list(range(start, start + rng.randint(1, 12)))
        cached = rng.randint(0, len(ids))
        for side, keys in zip(sides, (ids, [digest(i) for i in ids]), strict=True):
            side.observe(keys, cached)
            side.cached(keys)
    a, b = sides
    assert (a.real_hits, a.lru_hits) == (b.real_hits, b.lru_hits)
    assert a.lru_hits > 0 and a.real_hits > 0
    assert [digest(k) for k in a.ghost.keys()] == b.ghost.keys()  # the same blocks, in the same LRU order


def test_a_request_list_grown_by_its_output_keeps_the_same_books_as_fresh_copies() -> None:
    """The engine passes a request's own block-hash list at its start and again, grown by its output's blocks, at its
    end; the tracker reuses the start's sampling for the grown list. The books must equal those kept on fresh copies
    (which never hit the reuse), and a list whose head changed in between must not reuse it."""
    rng = random.Random(11)
    sides = [PinPayback(PaybackConfig(sampling=4, window=10, cooldown=10), total_blocks=4 * MIN_GHOST_BLOCKS * 2)
             for _ in range(2)]
    for step in range(400):
        start = rng.randrange(0, 300)
        prompt = [digest(i) for i in range(start, start + rng.randint(1, 40))]
        output = [digest(10_000 + step * 10 + j) for j in range(rng.randint(0, 3))]
        cached = rng.randint(0, len(prompt))
        same = list(prompt)
        sides[0].observe(same, cached)
        same.extend(output)
        if step % 7 == 0:  # the list was rewritten under the tracker (not vLLM's way, but it must not reuse then)
            same[len(prompt) - 1] = digest(99_999)
            sides[1].observe(list(prompt), cached)
            sides[1].cached(list(same))
            sides[0].cached(same)
            continue
        sides[0].cached(same)
        sides[1].observe(list(prompt), cached)
        sides[1].cached(list(prompt) + output)
    a, b = sides
    assert (a.real_hits, a.lru_hits) == (b.real_hits, b.lru_hits) and a.lru_hits > 0
    assert a.ghost.keys() == b.ghost.keys() and a.ghost.running() == b.ghost.running()
    assert not ghost(a)._memo  # every list that started also ended: nothing remembered
    assert 0 < len(ghost(b)._memo) <= MEMO_LIMIT  # copies are never passed again: remembered until the limit drops them


def test_keys_of_mixed_lengths_or_types_take_the_generic_path() -> None:
    p = PinPayback(PaybackConfig(sampling=8), total_blocks=8 * MIN_GHOST_BLOCKS * 4)
    keys: list[object] = [digest(i) for i in range(100)]
    assert ghost(p)._flags(keys) is not None  # type: ignore[arg-type]
    assert ghost(p)._flags(keys[:50] + [b"short"] + keys[50:]) is None  # type: ignore[arg-type]
    assert ghost(p)._flags(keys[:50] + [12345] + keys[50:]) is None  # type: ignore[arg-type]
    p.observe(keys[:50] + [12345] + keys[50:], 10)  # no crash, books kept by the hash path
    assert p.ghost.held()
