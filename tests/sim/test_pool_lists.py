"""The pool's list path for a pin change's few blocks (`BlockPool.touch_list`, `free_list`) leaves the pool exactly as
`touch` and `free` do: the same references, stamps, counts and evictor batches, on short and long lists alike."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvsched.sim.evictors import LRUEvictor
from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import ID_DTYPE


def pool(n_ids: int) -> BlockPool:
    p = BlockPool(n_ids, capacity=n_ids)
    p.evictor = LRUEvictor(p)
    p.admit(np.arange(n_ids, dtype=ID_DTYPE), 0)  # every block cached and held once
    return p


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_list_path_leaves_the_pool_as_the_array_path_does(seed: int) -> None:
    rng = random.Random(seed)
    n = 400
    lists, arrays = pool(n), pool(n)
    held = [1] * n  # references per block beyond none (both pools alike)
    for _ in range(3000):
        k = rng.choice([1, 3, 12, BlockPool.FEW, BlockPool.FEW + 1, 60])
        if rng.random() < 0.5:
            ids = rng.sample(range(n), k)
            for b in ids:
                held[b] += 1
            lists.touch_list(ids)
            arrays.touch(np.array(ids, dtype=ID_DTYPE))
        else:
            candidates = [b for b in range(n) if held[b] > 0]
            ids = rng.sample(candidates, min(k, len(candidates)))
            for b in ids:
                held[b] -= 1
            lists.free_list(ids)
            arrays.free(np.array(ids, dtype=ID_DTYPE))
        assert (lists.n_evictable, lists.next_stamp) == (arrays.n_evictable, arrays.next_stamp)
    assert np.array_equal(lists.ref, arrays.ref) and np.array_equal(lists.stamp, arrays.stamp)
    assert lists.ref.tolist() == held
    a, b = lists.evictor.batches, arrays.evictor.batches  # type: ignore[union-attr]
    assert len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    lists.check()
    assert lists.evictor.pop(lists.n_evictable).tolist() == arrays.evictor.pop(arrays.n_evictable).tolist()
