"""A paged KV block pool with prefix caching, modelled on vLLM's BlockPool, over arrays.

`capacity` blocks of `block_size` tokens. A cached block is identified by its chained-prefix id (one copy per id);
`ref[id]` counts the requests and pins holding it. A block whose count drops to zero stays cached and becomes
*evictable*: it is handed to an `Evictor`, which decides which evictable block is reused first. "Anonymous" blocks
are held by running requests but not (yet) cacheable: the partial last block and the blocks decode will fill.

Simplifications against vLLM (the same for every policy): free blocks that were never cached are used before any cached
block is evicted; a request whose prompt contains a cached block after its first miss takes that block (vLLM computes
a second copy); allocation happens once, for prompt and output, when the request is admitted.

Every operation is vectorised over a request's block list, so a 50k-token turn costs a handful of numpy calls.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kvsched.sim.trace import ID_DTYPE


class Evictor(Protocol):
    """Order in which evictable (cached, unreferenced) blocks are reused."""

    def push(self, ids: np.ndarray, stamps: np.ndarray) -> None:
        """Blocks `ids` became evictable, in this order (the first is the first to go, all else equal)."""

    def pop(self, k: int) -> np.ndarray:
        """Choose `k` evictable blocks to evict (the pool checks that `k` exist)."""


class BlockPool:
    def __init__(self, n_ids: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.ref = np.zeros(n_ids, dtype=np.int32)
        self.resident = np.zeros(n_ids, dtype=bool)
        # Free-queue stamp of an evictable block; -1 while referenced or not cached. An evictor's entry for a block
        # is valid only while the stamps match, so touching or re-freeing a block invalidates old entries lazily.
        self.stamp = np.full(n_ids, -1, dtype=np.int64)
        self.next_stamp = 0
        self.n_resident = 0  # cached blocks (referenced or evictable)
        self.n_evictable = 0
        self.n_anon = 0  # held, uncached
        self.evictions = 0
        self.evictor: Evictor | None = None

    # ---- counts -------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used + evictable (vLLM's `get_num_free_blocks`)."""
        return self.capacity - self.n_resident - self.n_anon + self.n_evictable

    @property
    def cache_full(self) -> bool:
        """The next allocation evicts a cached block: no never-cached block is free (vLLM's free queue starts with a
        cached block)."""
        return self.n_resident + self.n_anon >= self.capacity and self.n_evictable > 0

    @property
    def num_held(self) -> int:
        """Blocks referenced by a request or a pin."""
        return self.n_resident - self.n_evictable + self.n_anon

    def hit_blocks(self, ids: np.ndarray) -> int:
        """Length of the leading run of cached blocks."""
        res = self.resident[ids]
        miss = np.flatnonzero(~res)
        return int(miss[0]) if len(miss) else len(ids)

    # ---- requests -----------------------------------------------------------------------------------------------
    def can_admit(self, ids: np.ndarray, anon: int) -> bool:
        """Could a request holding cached blocks `ids` (all of its prompt's full blocks) plus `anon` uncached blocks
        be allocated now? Its own evictable blocks do not count as free (it is about to take them)."""
        res = self.resident[ids]
        own_evictable = int(np.count_nonzero(self.ref[ids[res]] == 0))
        need = len(ids) - int(np.count_nonzero(res)) + anon
        return need <= self.num_free - own_evictable

    def own_evictable(self, ids: np.ndarray) -> int:
        """How many of `ids` are cached with no holder (in the free list): a request hitting them takes them out."""
        res = self.resident[ids]
        return int(np.count_nonzero(self.ref[ids[res]] == 0))

    def admit(self, ids: np.ndarray, anon: int) -> None:
        """Take `ids` (cached ones are touched, the rest allocated, evicting as needed) and `anon` uncached blocks."""
        res = self.resident[ids]
        self.touch(ids[res])
        new = ids[~res]
        need = len(new) + anon
        empty = self.capacity - self.n_resident - self.n_anon
        if need > empty:
            self.evict(need - empty)
        self.resident[new] = True
        self.ref[new] = 1
        self.n_resident += len(new)
        self.n_anon += anon

    def register(self, ids: np.ndarray) -> None:
        """Anonymous blocks of a running request became full (decode finished them): cache them as `ids`.
        An id cached meanwhile by another request is shared and the anonymous copy is returned."""
        res = self.resident[ids]
        self.touch(ids[res])
        new = ids[~res]
        self.resident[new] = True
        self.ref[new] = 1
        self.n_resident += len(new)
        self.n_anon -= len(ids)

    def touch(self, ids: np.ndarray) -> None:
        """Take one more reference on cached blocks (distinct ids); evictable ones stop being evictable."""
        if not len(ids):
            return
        r = self.ref[ids]
        self.n_evictable -= int(np.count_nonzero(r == 0))
        self.ref[ids] = r + 1
        self.stamp[ids] = -1

    def free(self, ids: np.ndarray, anon: int = 0) -> None:
        """Drop one reference on `ids` (distinct), given in free order: the first to become evictable is the first
        evicted among them (vLLM frees a request's blocks tail first). `anon` uncached blocks are returned too."""
        self.n_anon -= anon
        if not len(ids):
            return
        r = self.ref[ids] - 1
        self.ref[ids] = r
        zero = ids[r == 0]
        if len(zero):
            self._became_evictable(zero)

    def _became_evictable(self, ids: np.ndarray) -> None:
        """`ids` lost their last reference, in this order: stamped, counted and handed to the evictor."""
        stamps = np.arange(self.next_stamp, self.next_stamp + len(ids), dtype=np.int64)
        self.next_stamp += len(ids)
        self.stamp[ids] = stamps
        self.n_evictable += len(ids)
        assert self.evictor is not None
        self.evictor.push(ids, stamps)

    # ---- a pin change's few blocks --------------------------------------------------------------------------------
    # The same as `touch` and `free` on a Python list of distinct ids, block by block: a pin change is a few blocks
    # (median 8-14 on the Mooncake traces), where numpy's per-call cost outweighs a loop (~2.8 against ~4.2 us for a
    # touch and a free of 12 blocks). Longer lists take the vectorised path.
    FEW = 32

    def touch_list(self, ids: list[int]) -> None:
        if len(ids) > self.FEW:
            self.touch(np.array(ids, dtype=ID_DTYPE))
            return
        ref, stamp, item = self.ref, self.stamp, self.ref.item
        became_held = 0
        for b in ids:
            r = item(b)
            became_held += not r
            ref[b] = r + 1
            stamp[b] = -1
        self.n_evictable -= became_held

    def free_list(self, ids: list[int]) -> None:
        if len(ids) > self.FEW:
            self.free(np.array(ids, dtype=ID_DTYPE))
            return
        ref, item = self.ref, self.ref.item
        zero = []
        for b in ids:
            r = item(b) - 1
            ref[b] = r
            if not r:
                zero.append(b)
        if zero:
            self._became_evictable(np.array(zero, dtype=ID_DTYPE))

    def evict(self, k: int) -> None:
        if k > self.n_evictable:
            raise RuntimeError(f"asked to evict {k} blocks, {self.n_evictable} evictable")
        assert self.evictor is not None
        victims = self.evictor.pop(k)
        self.resident[victims] = False
        self.stamp[victims] = -1
        self.n_resident -= len(victims)
        self.n_evictable -= len(victims)
        self.evictions += len(victims)

    def check(self) -> None:
        """Invariants (tests): counts agree with the arrays and stay within capacity."""
        assert self.n_resident == int(np.count_nonzero(self.resident))
        assert self.n_evictable == int(np.count_nonzero(self.resident & (self.ref == 0)))
        assert not np.any(self.ref[~self.resident]), "a referenced block is not cached"
        assert np.all(self.ref >= 0)
        assert 0 <= self.n_anon and self.n_resident + self.n_anon <= self.capacity
