"""The FP8 tier's step metadata: its stores travel as three lists of ints (no object per block) and reach the worker's
store as they were planned."""

from __future__ import annotations

import pickle

from kvsched.core.tier import Store


def test_stores_round_trip_as_lists_of_ints_and_pickle():
    from kvsched.adapters.vllm.tier_meta import TierStepMeta

    meta = TierStepMeta()
    meta.add_stores([Store(7, 0), Store(8, 1)])
    meta.add_stores((Store(9, 2, tokens=5),))
    assert (meta.store_blocks, meta.store_slots, meta.store_tokens) == ([7, 8, 9], [0, 1, 2], [0, 0, 5])
    assert meta.stores == [Store(7, 0), Store(8, 1), Store(9, 2, tokens=5)]
    back = pickle.loads(pickle.dumps(meta))
    assert back.stores == meta.stores and TierStepMeta().stores == []


class _Store:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls, self.invalid = fail, [], []

    def store(self, block_ids, slots, tokens=None):
        self.calls.append((list(block_ids), list(slots), list(tokens or ())))
        if self.fail:
            raise RuntimeError("copy failed")

    def invalidate(self, slots):
        self.invalid += list(slots)


def _worker(store: _Store):
    from kvsched.adapters.vllm import fp8_tier_connector as fc
    from kvsched.adapters.vllm.tier_meta import TierWorkerMeta

    conn = object.__new__(fc.KVSchedFP8TierConnector)  # the worker side only: no vLLM config needed
    conn.store, conn._errors, conn._worker_meta, conn.levels_worker = store, set(), TierWorkerMeta(), None
    return conn


def test_the_worker_stores_the_planned_blocks_and_invalidates_them_if_the_copy_fails():
    from kvsched.adapters.vllm.tier_meta import TierStepMeta

    meta = TierStepMeta()
    meta.add_stores([Store(7, 3), Store(8, 4, tokens=9)])
    ok = _Store()
    _worker(ok)._before_step(meta)
    assert ok.calls == [([7, 8], [3, 4], [0, 9])] and not ok.invalid
    bad = _Store(fail=True)
    _worker(bad)._before_step(meta)
    assert bad.invalid == [3, 4]  # they fail their checksum: recomputed, never read
    empty = _Store()
    _worker(empty)._before_step(TierStepMeta())
    assert empty.calls == []
