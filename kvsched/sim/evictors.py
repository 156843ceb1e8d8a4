"""Which evictable block a full pool reuses first: vLLM's LRU free queue, or the clairvoyant (Belady) choice.

Both keep lazy entries: a block that is touched or re-freed gets a new stamp in the pool, and an entry whose stamp no
longer matches is skipped (and never looked at again), so each freed block costs O(1) amortised, vectorised per batch.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Any

import numpy as np

from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import Trace

NEVER = np.iinfo(np.int64).max  # next use of a block no later request hits


def _take(pool: BlockPool, entry: list[Any], need: int) -> tuple[np.ndarray, int]:
    """Up to `need` valid blocks from the front of `entry` = [ids, stamps, pos]; returns them and how many remain
    to be taken. Advances `pos` past everything looked at."""
    ids, stamps, pos = entry
    out: list[np.ndarray] = []
    while need and pos < len(ids):
        end = min(len(ids), pos + max(4 * need, 256))
        chunk = ids[pos:end]
        valid = np.flatnonzero(pool.stamp[chunk] == stamps[pos:end])
        if len(valid) >= need:
            out.append(chunk[valid[:need]])
            pos += int(valid[need - 1]) + 1
            need = 0
        else:
            out.append(chunk[valid])
            need -= len(valid)
            pos = end
    entry[2] = pos
    return (np.concatenate(out) if out else np.empty(0, dtype=ids.dtype)), need


class LRUEvictor:
    """vLLM's free queue: blocks are reused in the order they became free (least recently freed first); a request's
    blocks are freed tail first, so its deepest blocks go first."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.batches: deque[list[Any]] = deque()  # [ids, stamps, position of the next to look at]

    def push(self, ids: np.ndarray, stamps: np.ndarray) -> None:
        self.batches.append([ids, stamps, 0])

    def pop(self, k: int) -> np.ndarray:
        out = []
        while k:
            got, k = _take(self.pool, self.batches[0], k)
            out.append(got)
            if self.batches[0][2] >= len(self.batches[0][0]):
                self.batches.popleft()
        return np.concatenate(out)


class NextUse:
    """Clairvoyance over a trace: the arrival index of the next request that could hit each block.

    A reverse pass stores, per request, the next use of each of its blocks as runs (a session's blocks share their
    next use, so there are a few runs per request). At free time a block's next use is looked up in the run of the
    latest (highest-index) request that held it: requests are admitted in arrival order, so every request up to that
    one has started and the next use comes after it (ids are chained, so a block's position is the same in every
    request). Requests larger than `capacity` blocks are rejected by the replay and never use a block: the pass skips
    them (Belady would keep a block for them)."""

    def __init__(self, trace: Trace, capacity: int | None = None) -> None:
        self.depth = trace.depth
        self.last_user = np.full(trace.n_ids, -1, dtype=np.int64)
        n = len(trace)
        self.starts: list[np.ndarray] = [np.empty(0, np.int64)] * n
        self.values: list[np.ndarray] = [np.empty(0, np.int64)] * n
        last_seen = np.full(trace.n_ids, NEVER, dtype=np.int64)
        bs = trace.block_size
        held = -(-(trace.prompt_tokens.astype(np.int64) + trace.output_tokens) // bs)
        for r in range(n - 1, -1, -1):
            ids = trace.blocks(r)
            if not len(ids) or (capacity is not None and held[r] > capacity):  # rejected: never runs
                continue
            nu = last_seen[ids]
            starts = np.concatenate(([0], np.flatnonzero(nu[1:] != nu[:-1]) + 1))
            self.starts[r], self.values[r] = starts, nu[starts]
            hittable = min((int(trace.prompt_tokens[r]) - 1) // bs, len(ids))
            last_seen[ids[:hittable]] = r

    def used(self, r: int, ids: np.ndarray) -> None:
        """Request r was admitted holding, or finished holding, `ids`. A request can finish after a later-arriving
        one that shares its blocks: the latest user stays the later one (its next use is the one still ahead; setting
        r back made Belady keep blocks whose looked-up next use had already passed)."""
        self.last_user[ids] = np.maximum(self.last_user[ids], r)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        users = self.last_user[ids]
        pos = self.depth[ids]
        u0 = int(users[0])
        if np.all(users == u0):
            return self._lookup(u0, pos)
        out = np.empty(len(ids), dtype=np.int64)
        for u in np.unique(users):
            sel = users == u
            out[sel] = self._lookup(int(u), pos[sel])
        return out

    def _lookup(self, r: int, pos: np.ndarray) -> np.ndarray:
        starts = self.starts[r]
        return self.values[r][np.searchsorted(starts, pos, side="right") - 1]


class BeladyEvictor:
    """Evict the block whose next use is farthest in the future (never used again first); among equals the deepest
    block first (a block yields a hit only while its whole prefix is cached, so a prefix should shrink from its
    tail), then the least recently freed."""

    def __init__(self, pool: BlockPool, next_use: NextUse) -> None:
        self.pool = pool
        self.next_use = next_use
        self.heap: list[tuple[int, int, list[Any]]] = []
        self.seq = itertools.count()

    def push(self, ids: np.ndarray, stamps: np.ndarray) -> None:
        nu = self.next_use(ids)
        order = np.lexsort((-self.next_use.depth[ids], -nu))  # farthest next use first, then deepest
        ids, stamps, nu = ids[order], stamps[order], nu[order]
        cuts = np.flatnonzero(nu[1:] != nu[:-1]) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(ids)])), strict=True):
            heapq.heappush(self.heap, (-int(nu[lo]), next(self.seq), [ids[lo:hi], stamps[lo:hi], 0]))

    def pop(self, k: int) -> np.ndarray:
        out = []
        while k:
            key, seq, entry = self.heap[0]
            got, k = _take(self.pool, entry, k)
            out.append(got)
            if entry[2] >= len(entry[0]):
                heapq.heappop(self.heap)
        return np.concatenate(out)
