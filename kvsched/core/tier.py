"""The FP8 demotion tier's directory: which released KV blocks live in the host-memory tier, in which slot, for whom.

When memory pressure releases a session's pinned blocks, the adapter demotes them here instead of dropping them; the
session's next turn restores the longest run of its prefix the tier still holds instead of recomputing it. The tier
is content-addressed: a block is keyed by vLLM's prefix hash of its tokens (which covers every token before it and the
`cache_salt`), so a restore can only ever hand a request KV that vLLM's own prefix cache would have let it share, and
a block shared by several sessions (a system prompt) is stored once.

This module is the bookkeeping only (slots, owners, byte budget, eviction order); the bytes live with the workers, which
execute the stores and loads the directory plans. When the tier is full, whole sessions go first in the order of the
same retention value the pins use (`value_of`, lowest first, tail blocks before head blocks), and only for a session
worth more than the victim.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

Key = Hashable  # a block's content hash
Owner = Hashable  # a session key


class TierConfigError(ValueError):
    """The tier was configured with an impossible size (raised at start-up, with the offending value)."""


@dataclass(frozen=True, slots=True)
class TierConfig:
    """budget_bytes: host memory the tier may hold (slots x bytes per block); 0 disables the tier.
    remember_evicted: how many evicted block keys are remembered to count restore misses (bounded)."""

    budget_bytes: int
    remember_evicted: int = 100_000

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise TierConfigError(f"tier budget must be >= 0 bytes, got {self.budget_bytes}")
        if self.remember_evicted < 0:
            raise TierConfigError("remember_evicted must be >= 0")

    @classmethod
    def from_gib(cls, gib: object) -> TierConfig:
        try:
            value = float(gib)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TierConfigError(f"tier size must be a number of GiB, got {gib!r}") from None
        if not value >= 0 or value == float("inf"):
            raise TierConfigError(f"tier size must be a finite number of GiB >= 0, got {gib!r}")
        return cls(budget_bytes=int(value * 2**30))


@dataclass(frozen=True, slots=True)
class Store:
    """Copy (quantize) the block now in KV-pool block `block_id` into tier slot `slot`."""

    block_id: int
    slot: int


@dataclass(frozen=True, slots=True)
class Load:
    """Copy (dequantize) tier slot `slot` into KV-pool block `block_id`."""

    slot: int
    block_id: int


class TierDirectory:
    """Slots of `block_bytes` bytes within `config.budget_bytes`; content keys -> slots; sessions -> their keys."""

    def __init__(self, config: TierConfig, block_bytes: int, value_of: Callable[[Owner], float]) -> None:
        if block_bytes <= 0:
            raise TierConfigError(f"block_bytes must be positive, got {block_bytes}")
        self.config = config
        self.block_bytes = block_bytes
        self.num_slots = config.budget_bytes // block_bytes
        self.value_of = value_of
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.slot_of: dict[Key, int] = {}
        self.owners: dict[Key, set[Owner]] = {}
        self.keys_of: dict[Owner, list[Key]] = {}  # prefix order
        self._locked: set[int] = set()  # slots a planned load reads this step
        self._orphans: list[Key] = []  # evicted while locked: freed at unlock_all
        self._evicted: OrderedDict[Key, None] = OrderedDict()
        self.counters: Counter[str] = Counter()

    # ---- demotion ---------------------------------------------------------------------------------------------
    def demote(self, owner: Owner, blocks: Sequence[tuple[Key, int]]) -> list[Store]:
        """`owner` released `blocks` ((key, block id), in prefix order): the stores that put them in the tier.

        Keys already held only gain the owner (no copy). A key that finds no slot ends the demotion: a restore needs
        an unbroken run of the prefix, so a later block without its predecessor would be useless."""
        stores: list[Store] = []
        if not blocks or self.num_slots == 0:
            return stores
        mine = self.keys_of.setdefault(owner, [])
        mine_set = set(mine)
        for key, block_id in blocks:
            if key in self.slot_of:
                if key not in mine_set:
                    self.owners[key].add(owner)
                    mine.append(key)
                    mine_set.add(key)
                continue
            slot = self._take_slot(owner)
            if slot is None:
                self.counters["demotions_cut_short"] += 1
                break
            self.slot_of[key] = slot
            self.owners[key] = {owner}
            mine.append(key)
            mine_set.add(key)
            self._evicted.pop(key, None)
            stores.append(Store(block_id, slot))
        if not mine:
            del self.keys_of[owner]
        if stores:
            self.counters["demotions"] += 1
            self.counters["demoted_blocks"] += len(stores)
        return stores

    # ---- restore ----------------------------------------------------------------------------------------------
    def match(self, keys: Sequence[Key], start: int, limit: int) -> list[int]:
        """Slots of the unbroken run `keys[start:]` the tier holds, at most `limit` of them (side-effect free)."""
        slots: list[int] = []
        for key in keys[start:start + max(limit, 0)]:
            slot = self.slot_of.get(key)
            if slot is None:
                break
            slots.append(slot)
        return slots

    def was_evicted(self, key: Key) -> bool:
        """True if `key` was in the tier and has been evicted since (a restore miss, not a cold block)."""
        return key in self._evicted

    def lock(self, slots: Sequence[int]) -> None:
        """Keep `slots` from being reused until `unlock_all` (a planned load reads them later this step)."""
        self._locked.update(slots)

    def unlock_all(self) -> None:
        self._locked.clear()
        for key in self._orphans:
            if key in self.slot_of and not self.owners.get(key):
                self._free_key(key)
                self.counters["evicted_blocks"] += 1
        self._orphans.clear()

    def forget(self, keys: Sequence[Key]) -> int:
        """Drop `keys` (e.g. the worker found a slot corrupt): they are recomputed from now on. Returns how many."""
        n = 0
        for key in keys:
            if key in self.slot_of:
                self._drop_key(key)
                n += 1
        return n

    # ---- sessions ---------------------------------------------------------------------------------------------
    def drop_owner(self, owner: Owner) -> int:
        """The session ended: its blocks no other session shares leave the tier. Returns the blocks freed."""
        keys = self.keys_of.pop(owner, [])
        freed = 0
        for key in reversed(keys):
            owners = self.owners.get(key)
            if owners is None:
                continue
            owners.discard(owner)
            if not owners:
                self._free_key(key)
                freed += 1
        return freed

    # ---- views --------------------------------------------------------------------------------------------------
    @property
    def used_slots(self) -> int:
        return len(self.slot_of)

    @property
    def used_bytes(self) -> int:
        return self.used_slots * self.block_bytes

    def blocks_of(self, owner: Owner) -> int:
        return len(self.keys_of.get(owner, ()))

    # ---- internals ----------------------------------------------------------------------------------------------
    def _take_slot(self, owner: Owner) -> int | None:
        while not self._free:
            if not self._evict_one(exclude=owner):
                return None
        return self._free.pop()

    def _evict_one(self, exclude: Owner) -> bool:
        """Free at least one slot: the lowest-value other session loses its tail block(s). False if none may go."""
        mine = self.value_of(exclude)
        best: tuple[float, int, Owner] | None = None
        for i, (owner, keys) in enumerate(self.keys_of.items()):
            if owner == exclude or not keys:
                continue
            value = self.value_of(owner)
            if value >= mine:
                continue
            if best is None or (value, i) < best[:2]:
                best = (value, i, owner)
        if best is None:
            return False
        victim = best[2]
        keys = self.keys_of[victim]
        while keys:
            key = keys.pop()  # tail first
            owners = self.owners.get(key)
            if owners is None:
                continue
            owners.discard(victim)
            if not owners and self.slot_of[key] not in self._locked:
                self._free_key(key)
                self.counters["evicted_blocks"] += 1
                if not keys:
                    del self.keys_of[victim]
                return True
            if not owners:  # a load reads it this step: freed once the step's metadata is built
                self._orphans.append(key)
        del self.keys_of[victim]
        return True  # the victim's keys were all shared or locked; it no longer holds any, try the next one

    def _free_key(self, key: Key) -> None:
        slot = self.slot_of.pop(key)
        self.owners.pop(key, None)
        self._free.append(slot)
        if self.config.remember_evicted:
            self._evicted[key] = None
            if len(self._evicted) > self.config.remember_evicted:
                self._evicted.popitem(last=False)

    def _drop_key(self, key: Key) -> None:
        for owner in self.owners.get(key, ()):
            keys = self.keys_of.get(owner)
            if keys is not None and key in keys:
                keys.remove(key)
                if not keys:
                    del self.keys_of[owner]
        self._free_key(key)
