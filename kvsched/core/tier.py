"""The FP8 demotion tier's directory: which released KV blocks live in the host-memory tier, in which slot, for whom.

When memory pressure releases a session's pinned blocks, the adapter demotes them here instead of dropping them; the
session's next turn restores the longest run of its prefix the tier still holds. The tier is content-addressed: a block
is keyed by vLLM's prefix hash of its tokens (covering every token before it and the `cache_salt`), so a restore only
ever hands a request KV vLLM's own prefix cache would have let it share, and a block sessions share is stored once.

The tier also keeps each live session's partial last block (`TailKey`: the tokens past its last full block, keyed by the
full block before them and the tokens): vLLM shares full blocks only, so without it every turn recomputes up to a block
of the previous turn's tokens (LMCache keeps such "unfull chunks" too). A tail costs a slot for under a block: tails
yield first (a full block's demotion evicts tails before other sessions' blocks; a tail never evicts one).

This module is the bookkeeping only (slots, owners, byte budget, eviction order); the workers hold the bytes and run
the stores and loads it plans. A full tier gives up first its copies of blocks the KV pool holds (`tier_reach`), then
whole sessions, deepest blocks first (`TierConfig.eviction`): by default the session that wrote into the tier longest
ago (its last demotion or restore from a lower level; tails in the order written), or by the pins' retention value
(`value_of`, lowest first, only for a session worth more than the victim): the first design, which kept less of what
came back on the Mooncake and fleet traces (it refused sessions that looked cheap and then returned).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

from kvsched.core.tier_chain import list_in_order, unlist
from kvsched.core.tier_config import TierConfig, TierConfigError
from kvsched.core.tier_fills import FillingSlots
from kvsched.core.tier_ops import Key, Load, Owner, Store, TailKey
from kvsched.core.tier_owners import KeyOwners
from kvsched.core.tier_reach import Reach
from kvsched.core.tier_sample import tails, victims

__all__ = ["Key", "Load", "Owner", "Store", "TailKey", "TierConfig", "TierDirectory"]


class TierDirectory:
    """Slots of `block_bytes` bytes within `config.budget_bytes`; content keys -> slots; sessions -> their keys.

    Eviction ranks the `EVICTION_SAMPLE` sessions that have held tier blocks longest (owners in demotion order), not
    every session, as Redis samples keys for its approximated LRU: exact below that many sessions, O(sample) per
    demotion at fleet scale (a full scan of 1,000 owners per demotion made the fleet replay crawl)."""

    EVICTION_SAMPLE = 64

    def __init__(self, config: TierConfig, block_bytes: int, value_of: Callable[[Owner], float]) -> None:
        if block_bytes <= 0:
            raise TierConfigError(f"block_bytes must be positive, got {block_bytes}")
        self.config = config
        self.block_bytes = block_bytes
        self.num_slots = config.budget_bytes // block_bytes
        self.value_of = value_of
        self._by_value = config.eviction == "value"  # else recency: `keys_of` and `tail_of` are in the order of writes
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.slot_of: dict[Key, int] = {}
        self.owners = KeyOwners()  # a key's sole owner unboxed: no set per block for the garbage collector
        self.keys_of: dict[Owner, list[Key]] = {}  # the order of the pins that released them (`tier_chain`)
        self.position_of: dict[Owner, dict[Key, int]] = {}  # ... each key's place there
        self._locked: set[int] = set()  # slots a planned load reads this step
        self._orphans: list[Key] = []  # evicted while a load reads them: spilled and freed at unlock_all
        self._held: list[int] = []  # slots a load reads whose key left the tier: free at unlock_all
        self._inflight = FillingSlots()  # slots a lower level's fetch fills in the background, until `landed`
        self._evicted: OrderedDict[Key, None] = OrderedDict()
        self.tail_of: dict[Owner, TailKey] = {}  # one partial last block per session
        self._tails: dict[Key, set[TailKey]] = {}  # parent key -> tails stored after it
        self.counters: Counter[str] = Counter()
        # (key, slot, owner, the key's place in its chain) when pressure evicts a full block, before its slot is reused:
        # a lower level (core.disk_tier) may keep it; False: it declines, and the block stays while another can go
        # instead (`_evict_one`). Not for blocks dropped as their session ended.
        self.on_evict: Callable[[Key, int, Owner | None, int | None], bool | None] | None = None
        self.reach = Reach()  # `pool_holds`: which keys the KV pool holds (copies that go first: tier_reach)

    # ---- demotion ---------------------------------------------------------------------------------------------
    def demote(self, owner: Owner, blocks: Sequence[tuple[Key, int]], start: int | None = None) -> list[Store]:
        """`owner` released `blocks` ((key, block id), prefix order, the first at `start` in its pin; None: after the
        owner's others): the stores that put them in the tier (`admit`: held keys only gain the owner)."""
        ids = dict(blocks)
        stores = [Store(ids[key], slot) for key, slot in self.admit(owner, [key for key, _ in blocks], start)]
        self.reach.released(ids)  # the pool gives these blocks back now: what it said of them may change
        if stores:
            self.counters["demotions"] += 1
            self.counters["demoted_blocks"] += len(stores)
        return stores

    def admit(self, owner: Owner, keys: Sequence[Key], start: int | None = None) -> list[tuple[Key, int]]:
        """Slots for `owner`'s `keys` (prefix order, the first at `start` in its chain) the tier does not hold yet:
        (key, slot) of each new one, for the caller's bytes (a demotion, a lower level's fetch). Held keys only gain the
        owner; a key that finds no slot ends the run. The held run before the first new key is the owner's before room
        is made: only other sessions' (a shared prompt), its eviction for the room would leave the new keys orphaned."""
        placed: list[tuple[Key, int]] = []
        if not keys or self.num_slots == 0:
            return placed
        mine = self.keys_of.pop(owner, [])
        self.keys_of[owner] = mine  # most recently admitted last: the eviction sample takes the others first
        n0 = len(mine)
        own, slot_of = self.owners.own, self.slot_of  # `own`: False for a key `mine` lists already (O(1), not a set
        held = 0  # of `mine` per call: that was O(the session's tier blocks) per demotion)
        for key in itertools.takewhile(slot_of.__contains__, keys):  # the owner's before room is made
            held += 1
            if own(key, owner):
                mine.append(key)
        self._make_room(sum(1 for key in keys if key not in slot_of), owner)
        for key in keys[held:]:
            if key in slot_of:
                if own(key, owner):
                    mine.append(key)
                continue
            slot = self._take_slot(owner)
            if slot is None:
                self.counters["demotions_cut_short"] += 1
                break
            slot_of[key] = slot
            self.owners.add(key, owner)
            mine.append(key)
            self._evicted.pop(key, None)
            placed.append((key, slot))
        if mine:
            list_in_order(self.position_of.setdefault(owner, {}), mine, n0, keys, start)
        else:
            del self.keys_of[owner]
        return placed

    def put_tail(self, owner: Owner, parent: Key, tokens: Sequence[int], block_id: int) -> Store | None:
        """`owner`'s turn ended in `tokens` (under a block) after full block `parent`, in pool block `block_id`: the
        store keeping them, or None (held, or no slot short of a full block or a tail worth more). Its old tail goes."""
        key = TailKey(parent, tuple(tokens))
        old = self.tail_of.get(owner)
        if old == key or self.num_slots == 0 or not key.tokens:
            return None
        if old is not None:
            self._disown_tail(owner, old)
        if key in self.slot_of:  # another session finished on the very same tokens
            self.owners.own(key, owner)
            self.tail_of[owner] = key
            return None
        self.tail_of[owner] = key  # counted in the owner's value while it competes for a slot
        # Not a write of the owner's full blocks: they keep their place in the recency order (a turn's end pins its
        # prefix in the pool; the fleet trace: refreshing them on every tail cost 2% more prefill, BENCHMARKS.md).
        if not self._free and not self._evict_tail(exclude=owner, below=self._rank_of_writer(owner)):
            del self.tail_of[owner]
            self.counters["tails_refused"] += 1
            return None
        slot = self._free.pop()
        self.slot_of[key] = slot
        self.owners.add(key, owner)
        self._tails.setdefault(parent, set()).add(key)
        self.counters["tails_stored"] += 1
        return Store(block_id, slot, tokens=len(key.tokens))

    def share_tail(self, owner: Owner, to: Owner) -> bool:
        """`to` holds `owner`'s stored tail too, so `owner`'s next `put_tail` leaves it (`core.shared_tails`)."""
        if (key := self.tail_of.get(owner)) is None or key not in self.slot_of or key == self.tail_of.get(to):
            return False
        self.tail_of[to] = key
        self.owners.own(key, to)
        return True

    def match_tail(self, parent: Key, tokens: Sequence[int]) -> tuple[int, int, TailKey] | None:
        """The stored tail after `parent` sharing the longest prefix with `tokens`: (slot, matched tokens, key), or
        None. A partial match is still exact: a token's KV depends only on the tokens before it."""
        best: tuple[int, int, TailKey] | None = None
        for key in self._tails.get(parent, ()):
            n = 0
            for a, b in zip(key.tokens, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n and (best is None or n > best[1]):
                best = (self.slot_of[key], n, key)
        return best

    def tail_tokens(self, owner: Owner) -> int:
        return len(key.tokens) if (key := self.tail_of.get(owner)) is not None else 0

    # ---- restore ----------------------------------------------------------------------------------------------
    def match(self, keys: Sequence[Key], start: int, limit: int) -> list[int]:
        """Slots of the unbroken run `keys[start:]` the tier holds, at most `limit` of them (side-effect free). It
        ends before a block whose fetch has not landed: its slot's bytes are not there yet."""
        slots: list[int] = []
        for key in keys[start:start + max(limit, 0)]:
            slot = self.slot_of.get(key)
            if slot is None or slot in self._inflight:
                break
            slots.append(slot)
        return slots

    # ---- fills from a lower level (disk, shared store) that land a step or more later -------------------------------
    def hold(self, slots: Sequence[int]) -> None:
        """A background fetch fills `slots` (just `admit`ted): until it `landed`, no restore reads them and none goes to
        another key, even once its key left the tier (the slot then waits, keyless, until the fetch cannot write it)."""
        self._inflight.hold(slots)

    def landed(self, slot: int, key: Key, ok: bool) -> None:
        """The fetch of `key` into `slot` is over on every worker (`ok`: every one filled it). A failed one drops the
        key if the slot is still its home; a slot whose key left meanwhile is free from the next `unlock_all`."""
        self._inflight.landed(slot)
        if not ok and self.slot_of.get(key) == slot:
            self._drop_key(key)

    def fetching(self, keys: Sequence[Key], start: int, limit: int) -> bool:
        """True if the run of `keys[start:]` the tier holds or is filling (at most `limit`) has a block in flight."""
        return self._inflight.in_run(self.slot_of.get(k) for k in keys[start:start + max(limit, 0)])

    def overdue(self, slots: Sequence[int]) -> None:
        """Fetches filling `slots` are long overdue: their sessions may lose blocks (`FillingSlots.give_up`)."""
        self._inflight.give_up(slots)

    @property
    def inflight(self) -> AbstractSet[int]:
        """The slots being filled (read only)."""
        return self._inflight.slots

    def was_evicted(self, key: Key) -> bool:
        """True if the full block `key` was in the tier and was evicted since (a restore miss, not a cold block)."""
        return key in self._evicted

    def lock(self, slots: Sequence[int]) -> None:
        """Keep `slots` from being reused until `unlock_all` (a planned load reads them later this step)."""
        self._locked.update(slots)

    def unlock_all(self) -> None:
        """The step's metadata is built: its locks end (a slot a fetch may still write stays held)."""
        self._locked.clear()
        held, self._held = self._held, [s for s in self._held if s in self._inflight]
        self._free.extend(s for s in held if s not in self._inflight)
        for key in self._orphans:  # full blocks (tails are never evicted while locked): the lower levels may keep them
            if key in self.slot_of and not self.owners.owned(key):
                if self.on_evict is not None:
                    self.on_evict(key, self.slot_of[key], None, None)
                self._free_key(key)
                self.counters["evicted_blocks"] += 1
        self._orphans.clear()

    def forget(self, keys: Sequence[Key]) -> int:
        """Drop `keys` (a worker found a slot corrupt): recomputed from now on (a slot read this step is reused after
        it). Returns how many."""
        n = 0
        for key in keys:
            if key in self.slot_of:
                self._drop_key(key)
                n += 1
        return n

    def clear(self) -> int:
        """Drop every block and tail (vLLM reset its caches: stale KV; a slot read this step waits); how many."""
        n = len(self.slot_of)
        for key in list(self.slot_of):
            self._free_key(key)
        self.keys_of.clear()
        self.position_of.clear()
        self._orphans.clear()
        self._evicted.clear()
        return n

    # ---- sessions ---------------------------------------------------------------------------------------------
    def drop_owner(self, owner: Owner) -> int:
        """The session ended: its blocks no other session shares leave the tier (the slot of one a load reads this step
        is reused only after it: the worker runs a step's stores before its loads). Returns how many left."""
        keys, freed = self.keys_of.pop(owner, []), 0
        self.position_of.pop(owner, None)
        tail = self.tail_of.get(owner)
        if tail is not None:
            freed += self._disown_tail(owner, tail)
        for key in reversed(keys):
            if self.owners.leave(key, owner) is not False:  # not held, or others still own it
                continue
            self._free_key(key)  # a slot a load reads this step is held until unlock_all
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
    def _ranker(self) -> Callable[[Owner, int], float] | None:
        """Eviction rank of an owner at a place in the sample, lowest first: its retention value; None by recency (the
        place itself: `tier_sample` keeps the sample's order)."""
        return (lambda owner, _: self.value_of(owner)) if self._by_value else None

    def _rank_of_writer(self, owner: Owner) -> float:
        """The rank a victim must be below to give way to `owner`, writing now (recency: any, it is the newest)."""
        return self.value_of(owner) if self._by_value else float("inf")

    def _make_room(self, slots: int, owner: Owner) -> None:
        """Free up to `slots` slots for `owner`, tails first, one scan of the owners per victim (not per block)."""
        while len(self._free) < slots:
            if self._evict_tail(exclude=owner, below=float("inf"), want=slots - len(self._free)):
                continue
            if not self._evict_one(exclude=owner, want=slots - len(self._free)):
                return

    def _take_slot(self, owner: Owner) -> int | None:
        while not self._free:
            if not self._evict_tail(exclude=owner, below=float("inf")) and not self._evict_one(exclude=owner):
                return None
        return self._free.pop()

    def _evict_tail(self, exclude: Owner, below: float, want: int = 1) -> bool:
        """Free the slots of up to `want` other sessions' tails, lowest value first, each worth less than `below` and
        read by no load this step (from the `EVICTION_SAMPLE` oldest tails). False if none could go."""
        keys, any_cand = tails(self.tail_of, exclude, self.EVICTION_SAMPLE, self._ranker(), below, self._locked,
                               self.slot_of, want)
        for key in keys:
            if key in self.slot_of:  # sessions that finished on the same tokens share one tail: freed once
                self._free_key(key)
                self.counters["evicted_tails"] += 1
        return any_cand

    def _disown_tail(self, owner: Owner, key: TailKey) -> int:
        """`owner` no longer needs `key`: freed when nobody else does (after this step if a load reads it)."""
        if self.tail_of.get(owner) == key:
            del self.tail_of[owner]
        if self.owners.leave(key, owner) is not False:  # not held, or others still own it
            return 0
        self._free_key(key)  # a slot a load reads this step is held until unlock_all
        return 1

    def _evict_one(self, exclude: Owner, want: int = 1) -> bool:
        """Free up to `want` slots from the other sessions worth less than `exclude`: copies of blocks the pool holds
        first (`tier_reach`), then lowest value first, tail blocks first (one scan of the owners per call). A block
        `on_evict` declines stays, with the blocks before it, while another victim's can go; else it goes, lost as with
        no lower level (`declined_evictions`). False if no session may lose blocks."""
        # Not a session being fetched: its request waits for them, and an in-flight key frees no slot (found by review)
        ranked = victims(self.keys_of, exclude, self.EVICTION_SAMPLE, self._ranker(), self._rank_of_writer(exclude),
                         self._inflight, self.slot_of)
        order, kept = list(ranked), dict[Owner, None]()  # kept: a lower level declined its tail block
        for keep in (True, False):  # a declined block stays while another victim's can go (`on_evict`)
            for victim, held_only in self.reach.passes(order, self.keys_of):
                keys, at = self.keys_of.get(victim, []), self.position_of.get(victim, {})
                while keys and want > 0 and (not held_only or self.reach.redundant(keys)) and victim not in kept:
                    pos = at.pop(key := keys.pop(), None)  # tail first
                    if self.owners.leave(key, victim) is not False:
                        continue  # not held, or shared with another session: stays
                    if self.slot_of[key] in self._locked:  # a load reads it this step: freed once the metadata is built
                        self._orphans.append(key)
                        continue
                    if (self.on_evict is not None and self.slot_of[key] not in self._inflight  # a copy may spill
                            and self.on_evict(key, self.slot_of[key], victim, pos) is False):
                        if keep and not held_only:  # back in place; the victim's blocks before it stay too (a prefix)
                            keys.append(key)
                            self.owners.own(key, victim)
                            if pos is not None:
                                at[key] = pos
                            kept[victim] = None
                            break
                        self.counters["declined_evictions"] += not held_only  # lost, as with no lower level
                    self._free_key(key)
                    self.counters["evicted_blocks"] += 1
                    want -= 1
                if not keys and victim in self.keys_of:
                    del self.keys_of[victim]
                    self.position_of.pop(victim, None)
                if want <= 0:
                    break
            if want <= 0 or not kept:
                break
            order, kept = list(kept), {}
        return bool(ranked)

    def _free_key(self, key: Key) -> None:
        slot = self.slot_of.pop(key)
        if isinstance(key, TailKey):
            for owner in self.owners.pop(key):
                if self.tail_of.get(owner) == key:
                    del self.tail_of[owner]
            siblings = self._tails.get(key.parent)
            if siblings is not None:
                siblings.discard(key)
                if not siblings:
                    del self._tails[key.parent]
        else:
            self.owners.discard(key)
        # A slot a load planned this step reads is handed out again only after the step (the load runs after this
        # step's stores): its key leaves the tier now, the slot waits in `_held`.
        (self._held if slot in self._locked or slot in self._inflight else self._free).append(slot)
        if self.config.remember_evicted and not isinstance(key, TailKey):  # asked of block hashes only: a tail there
            self._evicted[key] = None  # was an object per turn for the garbage collector, and pushed blocks out
            if len(self._evicted) > self.config.remember_evicted:
                self._evicted.popitem(last=False)

    def _drop_key(self, key: Key) -> None:
        if isinstance(key, TailKey):
            self._free_key(key)
            return
        for owner in self.owners.get(key) or ():
            unlist(self.keys_of, self.position_of, owner, key)
        self._free_key(key)
