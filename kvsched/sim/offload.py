"""Stock vLLM with CPU offloading: the baseline a host tier has to beat on the same host memory.

vLLM's own `OffloadingConnector` (vllm/v1/kv_offload, CPU backend, LRU manager) stores every full block a request
computes into host memory and, on a request's prefix lookup, loads the run of blocks after the device prefix hit that
the host holds; host blocks are evicted least recently used (a store or a load makes a block most recent). Modelled
here on the simulator's LRU pool with a host of `slots` blocks, stored when a request finishes (the simulator's
stores all happen then; vLLM stores as blocks fill, which differs only for blocks evicted from the host while their
request still runs). Its pages are the device pool's dtype, so on an FP8 pool a slot is as large as an FP8 tier slot
and the same host bytes hold the same number of blocks; on a bf16 pool they hold about half as many (the replay sizes
the slots and each restore's copy by the pool's pages: `kvsched.sim.replay.host_block_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kvsched.sim.policies import SimPolicy
from kvsched.sim.pool import BlockPool
from kvsched.sim.trace import Trace


class OffloadLRUPolicy(SimPolicy):
    """LRU device pool + an LRU host cache of `slots` blocks that every finished request's full blocks are stored to."""

    name = "lru+offload"

    def __init__(self, trace: Trace, pool: BlockPool, slots: int) -> None:
        super().__init__(trace, pool)
        if slots < 0:
            raise ValueError("host slots must be >= 0")
        self.slots = slots
        self.host: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.stored = self.evicted = 0

    def match_external(self, i: int, prompt_ids: np.ndarray, start: int, limit: int) -> int:
        host = self.host
        n = 0
        for b in prompt_ids[start:start + max(limit, 0)].tolist():
            if b not in host:
                break
            n += 1
        for b in prompt_ids[start:start + n].tolist():  # a load is a use
            host.move_to_end(b)
        return n

    def on_finished(self, i: int, ids: np.ndarray) -> None:
        if not self.slots:
            return
        host = self.host
        for b in ids.tolist():
            if b in host:
                host.move_to_end(b)
            else:
                host[b] = None
                self.stored += 1
        while len(host) > self.slots:
            host.popitem(last=False)
            self.evicted += 1

    def stats(self) -> dict[str, float]:
        return {"host_slots": self.slots, "host_stored_blocks": self.stored, "host_evicted_blocks": self.evicted}
