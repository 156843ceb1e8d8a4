"""The payback tracker on the engine's keys: vLLM's block hashes (bytes digests) are sampled by their first byte,
filtered in C, and the ghost keeps the same books on them as on the simulator's integer ids."""

from __future__ import annotations

import hashlib
import random

from kvsched.core.pin_payback import MIN_GHOST_BLOCKS, PaybackConfig, PinPayback


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def test_block_hashes_are_sampled_by_their_first_byte_at_the_configured_rate() -> None:
    p = PinPayback(PaybackConfig(sampling=8), total_blocks=8 * MIN_GHOST_BLOCKS * 4)
    keys = [digest(i) for i in range(8000)]
    picked = list(p._sampled(keys))
    assert picked == [(i, k) for i, k in enumerate(keys) if k[0] < 32]  # positions kept, prefix order
    assert 0.115 < len(picked) / len(keys) < 0.135  # 1 in 8
    ints = list(p._sampled(list(range(8000))))  # the simulator's ids: the mixed hash, as before
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
    assert [digest(k) for k in a.ghost] == list(b.ghost)  # the same blocks, in the same LRU order
