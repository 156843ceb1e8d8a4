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
from kvsched.adapters.vllm.pin_pool import VllmPinPool
from kvsched.core.config import RetentionConfig
from kvsched.core.sessions import SessionKey

FLOOR_SCHEDULER = "kvsched.bench.sched_floor.FloorScheduler"
FLOOR_NO_YIELD_SCHEDULER = "kvsched.bench.sched_floor.FloorNoYieldScheduler"
FLOOR_INC_SCHEDULER = "kvsched.bench.sched_floor.FloorIncScheduler"


class FloorScheduler(AsyncScheduler):
    """vLLM's AsyncScheduler (stock's and kvsched's base) plus the least pin retention there is (module docstring)."""

    YIELDS = True  # pins give way to a live request's allocation

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # kvsched's own pool of pins over vLLM's: `touch` / `free_blocks` and a count of the pins' references per
        # block id in an array (its `refs` a read-only view: len() is the distinct blocks pinned)
        self.pool = VllmPinPool(self)
        self._hold, self._give_back = self.pool.hold, self.pool.give_back
        self._prefix = compat.reusable_prefix(self, int(self.cache_config.block_size))
        self.budget = int(RetentionConfig.from_env().pin_budget_fraction * compat.num_total_blocks(self))
        self.pins: OrderedDict[SessionKey, list[Any]] = OrderedDict()  # least recently pinned first
        self.refs = self.pool.refs  # block id -> pins holding it (those held only)
        self.session_of: dict[str, SessionKey] = {}  # request id -> its named session, while the request lives
        self.released = {"turn": 0, "budget": 0, "shortage": 0}  # pins given back, by reason
        compat.before_each_free(self, self._finished)  # pins before vLLM frees: no private vLLM name used here
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
                    self._turn_started(key, new)
        return output

    def _turn_started(self, key: SessionKey, new: Any) -> None:
        """The session's next request is scheduled, holding its hits: the whole old pin goes back."""
        self._release(self.pins.pop(key), "turn")

    def _finished(self, request: Any) -> None:
        """vLLM is about to free a finished (or aborted) request's blocks: pin its hashed prefix first (vLLM's free runs
        even if the pin fails: `compat.before_each_free`, so no block of the request stays held)."""
        key = self.session_of.pop(request.request_id, None)
        if key is not None:
            self._pin(key, request)

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """A reset needs every block free: the pins go first."""
        while self.pins:
            self._release(self.pins.popitem(last=False)[1], "budget")
        return bool(super().reset_prefix_cache(*args, **kwargs))

    # ---- pins ---------------------------------------------------------------------------------------------------
    @property
    def pinned_blocks(self) -> int:
        return self.pool.distinct

    def _pin(self, key: SessionKey, request: Any) -> None:
        groups, tokens = self._prefix(request)
        old = self.pins.pop(key, None)
        if old is not None:  # another request of the session finished meanwhile: the newer prefix replaces it
            self._release(old, "turn")
        if not tokens:
            return
        blocks = groups[0] if len(groups) == 1 else [b for g in groups for b in g]  # a new list, ours to keep
        self._hold(blocks)
        self.pins[key] = blocks
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        pool, budget, pins = self.pool, self.budget, self.pins
        while pool.distinct > budget and pins:
            self._release(pins.popitem(last=False)[1], "budget")

    def _release(self, blocks: list[Any], reason: str) -> None:
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


class FloorIncScheduler(FloorScheduler):
    """The floor with incremental pins, as kvsched's (`PinApplier.unpin` of the unhit tail, `repin`): at the session's
    next turn start only the old pin's blocks the new request did not hit go back (tail first) and the hit ones stay
    pinned; at the finish only the blocks past those kept are held (the pin's list extended in place) and the session
    becomes the most recently pinned. The same budget, LRU order and shortage hook as the floor. Several KV-cache
    groups (a hybrid model): the whole pin goes at the start and comes back at the finish, as the floor's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # request id -> the blocks it holds, with one KV-cache group (what compat.reusable_prefix reads); else None
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self._held: dict[str, list[Any]] | None = managers[0].req_to_blocks if len(managers) == 1 else None

    def _turn_started(self, key: SessionKey, new: Any) -> None:
        """Keep the pin's leading blocks the request holds (those it hit: a pinned block is never allocated anew), give
        the rest back. Not a count of its hit tokens: a branch (a turn that shares the session's older prefix but not
        the pin's last blocks) hits as many tokens without hitting the pin's tail."""
        pin = self.pins[key]
        held = self._held.get(new.req_id) if self._held is not None else None
        n = len(pin)
        if held is not None and len(held) >= n and (held if len(held) == n else held[:n]) == pin:  # identity-first
            return
        kept = 0
        if held is not None:
            for a, b in zip(pin, held, strict=False):
                if a is not b:
                    break
                kept += 1
        if not kept:
            del self.pins[key]
            self._release(pin, "turn")
            return
        tail = pin[kept:]
        del pin[kept:]  # the pin's list, cut in place
        self._release(tail, "turn")

    def _pin(self, key: SessionKey, request: Any) -> None:
        groups, tokens = self._prefix(request)
        blocks: list[Any] | None = groups[0] if len(groups) == 1 else None
        if not tokens:
            blocks = []
        elif blocks is None:
            blocks = [b for g in groups for b in g]
        pins = self.pins
        old = pins.pop(key, None)
        common = 0
        if old is not None:  # the blocks its turn hit (or another request of the session's pin)
            n = len(old)
            if len(blocks) >= n and (blocks if len(blocks) == n else blocks[:n]) == old:  # identity-first, in C
                common = n
            else:
                for a, b in zip(old, blocks, strict=False):
                    if a is not b:
                        break
                    common += 1
                self._release(old[common:], "turn")
                del old[common:]
        if not blocks:
            return
        tail = blocks[common:]
        self._hold(tail)
        if old is None:
            old = tail
        else:
            old.extend(tail)
        pins[key] = old
        self._enforce_budget()
