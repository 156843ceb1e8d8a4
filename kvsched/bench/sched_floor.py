"""The floor of session-pin retention on vLLM's Python block pool: a benchmark baseline, never a policy to ship.

`FloorScheduler` keeps each named session's prefix in vLLM's pool between turns with the least any such scheme does,
through the same vLLM calls kvsched's pins make (`BlockPool.touch` to hold, `BlockPool.free_blocks` to give back, a
count of the pins' references per block to know the distinct blocks they hold; `kvsched.adapters.vllm.pin_pool`):

- at a request's finish (just before vLLM frees its blocks) it pins the request's hashed prefix, the blocks a later
  prompt can hit (`compat.reusable_prefix`, what kvsched pins), under the request's session as kvsched reads it
  (`compat.request_session`: named sessions only, no lineage, no inference);
- at the session's next turn start (the request's first schedule, when it already holds its hits) it gives the old pin
  back: the blocks the new request did not hit go to vLLM's free queue, tail first;
- past the pin budget (`KVSCHED_PIN_BUDGET_FRACTION` of the pool's blocks, as kvsched reads it) it releases whole pins,
  least recently pinned first (an OrderedDict: no scoring, no TTL, no return model, no payback tracker);
- when vLLM cannot allocate for a live request it releases pins the same way until it can (`YIELDS`; the same
  `compat.wrap_allocate_slots` kvsched's pins yield through), so pins never cost a live request its blocks.

Used by `tools/sched_sides.py` (stock, this floor and kvsched in one lockstep run): what any pin policy costs on
`kvsched bench sched`'s load, against what kvsched's costs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from kvsched.adapters.vllm import compat
from kvsched.core.config import RetentionConfig
from kvsched.core.sessions import SessionKey

FLOOR_SCHEDULER = "kvsched.bench.sched_floor.FloorScheduler"
FLOOR_NO_YIELD_SCHEDULER = "kvsched.bench.sched_floor.FloorNoYieldScheduler"


class FloorScheduler(AsyncScheduler):
    """vLLM's AsyncScheduler (stock's and kvsched's base) plus the least pin retention there is (module docstring)."""

    YIELDS = True  # pins give way to a live request's allocation

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = compat.block_pool(self)
        self._hold, self._give_back, _ = compat.block_pool_calls(self)
        self._prefix = compat.reusable_prefix(self, int(self.cache_config.block_size))
        self.budget = int(RetentionConfig.from_env().pin_budget_fraction * (int(pool.num_gpu_blocks) - 1))
        self.pins: OrderedDict[SessionKey, list[Any]] = OrderedDict()  # least recently pinned first
        self.refs: dict[int, int] = {}  # block id -> pins holding it: len() is the distinct blocks pinned
        self.session_of: dict[str, SessionKey] = {}  # request id -> its named session, while the request lives
        self.released = {"turn": 0, "budget": 0, "shortage": 0}  # pins given back, by reason
        if self.YIELDS:
            compat.wrap_allocate_slots(self, self._on_shortage)

    # ---- vLLM's scheduler ---------------------------------------------------------------------------------------
    def add_request(self, request: Any) -> None:
        super().add_request(request)
        key = compat.request_session(request)[0]
        if key is not None:
            self.session_of[request.request_id] = key

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)
        if self.pins:
            session_of, pins = self.session_of, self.pins
            for new in output.scheduled_new_reqs:  # the request holds its hits now: the old pin can go
                key = session_of.get(new.req_id)
                if key is not None and key in pins:
                    self._release(pins.pop(key), "turn")
        return output

    def _free_blocks(self, request: Any) -> None:
        """vLLM frees a finished (or aborted) request's blocks here: pin its hashed prefix first (vLLM's free runs even
        if the pin fails: no block of the request stays held)."""
        key = self.session_of.pop(request.request_id, None)
        try:
            if key is not None:
                self._pin(key, request)
        finally:
            super()._free_blocks(request)

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """A reset needs every block free: the pins go first."""
        while self.pins:
            self._release(self.pins.popitem(last=False)[1], "budget")
        return bool(super().reset_prefix_cache(*args, **kwargs))

    # ---- pins ---------------------------------------------------------------------------------------------------
    @property
    def pinned_blocks(self) -> int:
        return len(self.refs)

    def _pin(self, key: SessionKey, request: Any) -> None:
        groups, tokens = self._prefix(request)
        old = self.pins.pop(key, None)
        if old is not None:  # another request of the session finished meanwhile: the newer prefix replaces it
            self._release(old, "turn")
        if not tokens:
            return
        blocks = groups[0] if len(groups) == 1 else [b for g in groups for b in g]  # a new list, ours to keep
        self._hold(blocks)
        refs = self.refs
        for b in blocks:
            i = b.block_id
            refs[i] = refs.get(i, 0) + 1
        self.pins[key] = blocks
        budget = self.budget
        while len(refs) > budget and self.pins:
            self._release(self.pins.popitem(last=False)[1], "budget")

    def _release(self, blocks: list[Any], reason: str) -> None:
        refs = self.refs
        for b in blocks:
            i = b.block_id
            n = refs[i] - 1
            if n:
                refs[i] = n
            else:
                del refs[i]
        self._give_back(blocks[::-1])  # the tail is evicted first, as vLLM frees a request's blocks
        self.released[reason] += 1

    def _on_shortage(self, request: Any, num_new_tokens: int = 0, own_free_hits: int = 0) -> bool:
        """vLLM could not allocate for a live request: release the least recently pinned session (True: retry)."""
        if not self.pins:
            return False
        self._release(self.pins.popitem(last=False)[1], "shortage")
        return True

    def stats(self) -> dict[str, int]:
        return {"pinned_sessions": len(self.pins), "pinned_blocks": self.pinned_blocks, "budget_blocks": self.budget,
                **{f"released_{k}": v for k, v in self.released.items()}}


class FloorNoYieldScheduler(FloorScheduler):
    """The floor without the shortage hook (no wrapper around vLLM's `allocate_slots`): what that wrapper costs. Only
    safe where pins cannot crowd out live requests (a budget well below the pool)."""

    YIELDS = False
