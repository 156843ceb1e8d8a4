"""The disk level's directory: which KV blocks a local directory holds under the FP8 host tier, for whom, within its
byte budget.

Blocks reach the disk two ways, both written behind by the worker (never in the engine step): each finished turn's
new full blocks (so a restarted engine finds its sessions' KV), and blocks the host tier evicts that the disk does
not hold yet. A block is `pending` from the moment its write is planned until the worker reports it written; only
written blocks are matched, so a restore never asks for a file that is not complete. Keys are vLLM's content hashes
(they cover every earlier token and the `cache_salt`), the same keys as the host tier's.

When the budget is full, blocks go by recency: blocks nobody claims (found on disk at start-up, not yet asked for
again) oldest first, then the tail blocks of the session whose blocks were written or claimed longest ago (a turn's
end, a spill, a restore make a session recent). Not the host tier's value, which the disk was first ranked by (found
by review): a session with nothing in the host tier, the normal case at a turn's end, is worth 0 there, so once live
sessions filled the disk no later turn was ever written. A write that fails (disk full) shrinks the budget to what is
on disk, so the next writes evict instead of failing again.

A session's list is kept in chain order (`kvsched.core.tier_chain`, as the host tier's), whatever order its blocks
came in: eviction takes its tail, so what stays must be a prefix a restore can reach. Spills come one block at a time,
deepest first (the host tier evicts its own tail first), and a turn's end writes may land between them: listed as they
came (k0, k1, k3, k2), a full disk evicted k2 and kept k3, which no restore reaches (found by a helper's probe,
tests/core/test_disk_tier_order.py). So each write, spill and restore says where its first key sits in the owner's
chain (`start`; None: just past the owner's last listed key, the order of arrival).

A block a restore reads is pinned (`claim`, from before the host tier makes room for it until its fetch is over or
never runs: `unpin`): no eviction or session's end deletes its file meanwhile. Found by a helper's tests: the room the
restore made in the host tier spilled to the full disk, whose only other session was the restoring one, and its tail,
the block being read, went; and a later step's writes evicted a block whose read was still queued. Either fetch read a
deleted file (the block then recomputed: a lost hit). A pinned block stops its session's eviction there (what stays is
a prefix); with no other block to evict, the write or spill finds no room (a declined spill: the host tier keeps
that block while another can go, kvsched.core.tier). A read that hangs keeps its pin, as it keeps its host slot,
until reported; the fetches queued behind it are given up by the worker and unpinned (tier_levels_worker).

A declined write costs O(1) once the disk knows it is full of blocks that cannot go (the host tier offers a declined
block twice, from the engine step): 2.8 s a decline at 100,000 blocks in 10,000 sessions, each tail pinned
(benchmarks/disk_decline.py), when each search restarted from the least recent session for each one it gave up on. A
failed search is remembered (`_stuck`) until something that could free a block happens (a pin released, a write
reported, a session's end, a block claimed or forgotten), and a search visits only the sessions whose peel can change
something (`_victims`: the tail-most written block not pinned, or marked since), not every session (the first decline
after a change walked all 10,000: 5.3 ms). Blocks found at start-up and never claimed have their own list (`_found`).

Bookkeeping only: the adapter writes, reads and deletes the files (kvsched/adapters/vllm/tier_disk.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from kvsched.core.live_queue import LiveQueue
from kvsched.core.tier_chain import list_in_order, unlist

Key = Hashable
Owner = Hashable
_UNKNOWN, _NOBODY = object(), object()  # `DiskDirectory._stuck`: a search is needed; no block may go, for anyone


class DiskConfigError(ValueError):
    """The disk level was configured with an impossible size or no directory (raised at start-up)."""


def parse_disk_gib(value: object, name: str = "disk tier size") -> float:
    """A disk budget in GiB (> 0); `name` is where it came from (the flag or the variable), for the message."""
    try:
        if isinstance(value, bool):  # JSON true is not a size (float() made it 1 GiB)
            raise TypeError
        gib = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DiskConfigError(f"{name} must be a number of GiB, got {value!r}") from None
    if not gib > 0 or gib == float("inf"):
        raise DiskConfigError(f"{name} must be a finite number of GiB > 0, got {value!r}")
    return gib


@dataclass(frozen=True, slots=True)
class WritePlan:
    """Blocks to write (each now `pending`) and blocks evicted to make room (their files are to be deleted)."""

    write: list[Key] = field(default_factory=list)
    delete: list[Key] = field(default_factory=list)


class DiskDirectory:
    """`capacity` blocks of `block_bytes` each; written and pending keys; owners per key; keys per owner, least
    recently written or claimed owner first."""

    def __init__(self, budget_bytes: int, block_bytes: int) -> None:
        if block_bytes <= 0 or budget_bytes < 0:
            raise DiskConfigError(f"need block_bytes > 0 and budget_bytes >= 0, got {block_bytes}, {budget_bytes}")
        self.block_bytes = block_bytes
        self.capacity = budget_bytes // block_bytes
        self.written: dict[Key, None] = {}  # insertion order = age (oldest first)
        self.pending: set[Key] = set()
        self.owners: dict[Key, set[Owner]] = {}
        self.keys_of: dict[Owner, list[Key]] = {}  # chain order; insertion order = recency (least recent first)
        self.position_of: dict[Owner, dict[Key, int]] = {}  # each listed key's place in its owner's chain
        self.reading: Counter[Key] = Counter()  # pinned: written keys a fetch reads (never deleted meanwhile)
        self.counters: Counter[str] = Counter()
        self._found: dict[Key, None] = {}  # found at start-up and never claimed yet, oldest first (some may be stale)
        # Since the last change that could free a block: _UNKNOWN; _NOBODY (no block may go); or the one owner whose
        # blocks might (a search that spared it found nothing else).
        self._stuck: object = _UNKNOWN
        self._victims = LiveQueue()  # in `keys_of`'s order, those whose `_peel` may change something (`_search`)

    # ---- start-up ---------------------------------------------------------------------------------------------------
    def load_index(self, keys: Iterable[Key]) -> list[Key]:
        """Blocks found on disk at start-up (oldest first), unclaimed until a session asks for them. Returns those past
        the budget (oldest go), whose files are to be deleted."""
        for key in keys:
            self.written[key] = None
            self._found[key] = None
        self._stuck = _UNKNOWN
        for owner in self.keys_of:
            self._mark(owner)
        excess: list[Key] = []
        while len(self.written) > self.capacity:
            key = next(iter(self.written))
            del self.written[key]
            excess.append(key)
        self.counters["indexed_blocks"] += len(self.written)
        return excess

    # ---- writes -------------------------------------------------------------------------------------------------
    def plan_writes(self, owner: Owner, keys: Sequence[Key], start: int | None = None) -> WritePlan:
        """`owner`'s blocks (prefix order, the first at `start` in its chain) should be on disk: the writes of those
        not there yet. A block that finds no room ends the plan (a restore needs an unbroken run; a later block alone
        is of no use)."""
        plan = WritePlan()
        if keys and self.size >= self.capacity and not self.holds(keys[0]) and self._known_full(owner):
            if owner in self.keys_of:  # as below: `owner` is the most recent session, nothing else changes
                self._touch(owner)
            self.counters["writes_cut_short"] += 1
            self.counters["declined_unsearched"] += 1
            return plan
        mine = self._touch(owner)
        mine_set, n0, settle = set(mine), len(mine), False
        for key in keys:
            if key in self.written or key in self.pending:
                settle = settle or key in self.written  # (pending blocks change no peel: `_settle`)
                self._claim(owner, key, mine, mine_set)
                continue
            if self.size >= self.capacity and not self._evict(owner, plan.delete):
                self.counters["writes_cut_short"] += 1
                break
            self.pending.add(key)
            self._claim(owner, key, mine, mine_set)
            plan.write.append(key)
        self._listed(owner, mine, n0, keys, start)
        if settle:
            self._settle(owner)
        self.counters["planned_writes"] += len(plan.write)
        return plan

    def done(self, key: Key, ok: bool) -> bool:
        """The worker reports a planned write: on disk, or failed (then the key is dropped). True if its file is to
        be deleted: the write failed, or every session that wanted it ended while it was in flight (found by review:
        such a block stayed on disk, indexed, with no owner, until evicted)."""
        if key not in self.pending:
            return False
        self.pending.discard(key)
        self._stuck = _UNKNOWN  # a block written (it may go now) or a failed one's room
        if ok and self.owners.get(key):
            self.written[key] = None
            for owner in self.owners[key]:
                self._mark(owner)
            self.counters["written_blocks"] += 1
            return False
        self._unlink(key)
        self.counters["failed_writes" if not ok else "orphaned_writes"] += 1
        return True

    def shrink_to_size(self) -> int:
        """The disk ran out of space before the budget did: the budget becomes what is on disk now. Returns it."""
        self.capacity = max(0, len(self.written))
        self._stuck = _UNKNOWN
        self.counters["budget_shrinks"] += 1
        return self.capacity

    # ---- restores ---------------------------------------------------------------------------------------------------
    def match(self, keys: Sequence[Key], start: int, limit: int) -> int:
        """Length of the unbroken run of written blocks `keys[start:]` (at most `limit`)."""
        n = 0
        for key in keys[start:start + max(limit, 0)]:
            if key not in self.written:
                break
            n += 1
        return n

    def claim(self, owner: Owner, keys: Sequence[Key], start: int | None = None) -> None:
        """`owner` restores `keys` (the first at `start` in its chain) from disk: they are its blocks now (an index
        entry found at start-up gains an owner), `owner` is the most recent session, and they are pinned until their
        fetches are over or will never run (`unpin`)."""
        mine = self._touch(owner)
        mine_set, n0 = set(mine), len(mine)
        for key in keys:
            if key in self.written:
                self._claim(owner, key, mine, mine_set)
                self.reading[key] += 1
        self._listed(owner, mine, n0, keys, start)
        self._settle(owner)

    def unpin(self, keys: Iterable[Key]) -> list[Key]:
        """The fetches of `keys` are over (filled or not) or will never run: they may go again. Returns those whose
        files are to be deleted now: every session holding one ended while it was read (`drop_owner` kept it)."""
        out: list[Key] = []
        for key in keys:
            if key not in self.reading:  # never pinned (or already unpinned): nothing to release
                continue
            self.reading[key] -= 1
            if self.reading[key] > 0:
                continue
            del self.reading[key]
            self._stuck = _UNKNOWN  # it may go now
            for owner in self.owners.get(key, ()):
                self._mark(owner)
            if key in self.written and not self.owners.get(key):
                del self.written[key]
                self.owners.pop(key, None)
                out.append(key)
                self.counters["orphaned_reads"] += 1
        return out

    def forget(self, keys: Iterable[Key]) -> list[Key]:
        """The worker found these files bad (torn, wrong checksum, missing): never matched again; returns the keys
        whose files are to be deleted."""
        out: list[Key] = []
        for key in keys:
            if key in self.written:
                del self.written[key]
                self._unlink(key)
                out.append(key)
        self.counters["forgotten_blocks"] += len(out)
        if out:
            self._stuck = _UNKNOWN
        return out

    def drop_owner(self, owner: Owner) -> list[Key]:
        """The session ended: its blocks no other session shares go. Returns the keys whose files are to be deleted."""
        out: list[Key] = []
        self._stuck = _UNKNOWN  # its blocks go, or may go for another session now
        self.position_of.pop(owner, None)
        self._victims.gone(owner)
        for key in self.keys_of.pop(owner, []):
            owners = self.owners.get(key)
            if owners is None:
                continue
            owners.discard(owner)
            if not owners and key in self.written and key not in self.reading:
                del self.written[key]
                del self.owners[key]
                out.append(key)
            elif not owners:  # a write or a read in flight: its file goes when it is reported (`done`, `unpin`)
                del self.owners[key]
        return out

    # ---- views --------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.written) + len(self.pending)

    @property
    def used_bytes(self) -> int:
        return len(self.written) * self.block_bytes

    def holds(self, key: Key) -> bool:
        return key in self.written or key in self.pending

    # ---- internals ----------------------------------------------------------------------------------------------
    def _touch(self, owner: Owner) -> list[Key]:
        """`owner`'s keys, `owner` now the most recent session (the last to lose blocks)."""
        mine = self.keys_of.pop(owner, [])
        self.keys_of[owner] = mine
        self._victims.touch(owner)
        return mine

    def _listed(self, owner: Owner, mine: list[Key], n0: int, keys: Sequence[Key], start: int | None) -> None:
        """`mine[n0:]` were just listed for `owner` out of `keys` (the first at `start`): into chain order."""
        if mine:
            list_in_order(self.position_of.setdefault(owner, {}), mine, n0, keys, start)
        else:
            del self.keys_of[owner]
            self.position_of.pop(owner, None)
            self._victims.gone(owner)

    def _claim(self, owner: Owner, key: Key, mine: list[Key], mine_set: set[Key]) -> None:
        owners = self.owners.setdefault(key, set())
        if owner not in owners:
            owners.add(owner)
            self._stuck = _UNKNOWN  # another session's list changed: what its eviction may take too
        if key not in mine_set:
            mine.append(key)
            mine_set.add(key)
            self._stuck = _UNKNOWN

    def _known_full(self, owner: Owner) -> bool:
        """A search since the last change found no block that may go for `owner` (`_stuck`)."""
        stuck = self._stuck
        return stuck is _NOBODY or (stuck is not _UNKNOWN and stuck == owner)

    def _evict(self, exclude: Owner, deleted: list[Key]) -> bool:
        """Free one written block, never a pinned one: an unclaimed one (oldest first), else the tail block of the
        least recent session other than `exclude`. False if nothing may go (remembered: `_stuck`). A loop, not a
        recursion per shared block peeled off a victim (found by review: sessions sharing a long system prompt
        exceeded Python's recursion limit, and the RecursionError reached the engine step); one pass over the sessions
        (it restarted from the least recent one for each it gave up on: O(sessions^2), seconds a decline at 10,000)."""
        if self._known_full(exclude):
            self.counters["declined_unsearched"] += 1
            return False
        self.counters["eviction_searches"] += 1
        while self._found:  # never claimed: never pinned; one claimed since stays claimed or goes (`unpin`, `_peel`)
            key = next(iter(self._found))
            del self._found[key]
            if key in self.written and not self.owners.get(key) and key not in self.reading:
                del self.written[key]
                self.owners.pop(key, None)
                deleted.append(key)
                self.counters["evicted_blocks"] += 1
                return self._freed()
        if self._search(exclude, deleted):
            return self._freed()
        self._stuck = exclude if self._stuck is _UNKNOWN else _NOBODY  # a second owner spared: both searched
        return False

    def _search(self, exclude: Owner, deleted: list[Key]) -> bool:
        """The least recent session but `exclude` that frees a block (`_peel`), visiting only the live ones (`_victims`;
        the others: tail-most written block pinned, or none written, their peel changes nothing). One that frees nothing
        is not live any more: O(log sessions) per session made live since the last search, not a walk of them all."""
        spared = False
        try:
            while (victim := self._victims.first()) is not None:
                if victim == exclude:
                    self._victims.pop_first()
                    spared = True
                    continue
                keys = self.keys_of[victim]
                freed = self._peel(victim, deleted)
                if freed and keys:  # it stays first, live
                    return True
                self._victims.pop_first()  # not live: its peel changes nothing now
                if not keys:
                    del self.keys_of[victim]
                    self.position_of.pop(victim, None)
                    self._victims.gone(victim)
                if freed:
                    return True
            return False
        finally:
            if spared:
                self._victims.mark(exclude)

    def _mark(self, owner: Owner) -> None:  # a block of its list written, forgotten or unpinned: its peel may act
        if owner in self.keys_of:
            self._victims.mark(owner)

    def _settle(self, owner: Owner) -> None:
        """`owner` live or not, from its tail: live if its tail-most written block is not pinned."""
        for key in reversed(self.keys_of.get(owner, ())):
            if key in self.written:
                if key not in self.reading:
                    self._mark(owner)
                    return
                break
        self._victims.drop(owner)

    def _freed(self) -> bool:
        self._stuck = _UNKNOWN
        return True

    def _peel(self, victim: Owner, deleted: list[Key]) -> bool:
        """`victim` gives up its written blocks tail first until one nobody else holds goes (True: its file is to be
        deleted); a block another session shares stays, the victim no longer holds it. False once it holds none, or
        at a pinned block (it stays, and so does every block before it: a prefix)."""
        keys, at = self.keys_of[victim], self.position_of.get(victim, {})
        freed = False
        for j in range(len(keys) - 1, -1, -1):
            key = keys[j]
            if key not in self.written:
                continue
            if key in self.reading:
                break
            del keys[j]
            at.pop(key, None)
            owners = self.owners.get(key, set())
            owners.discard(victim)
            if not owners:  # shared with nobody else: the file goes
                del self.written[key]
                self.owners.pop(key, None)
                deleted.append(key)
                self.counters["evicted_blocks"] += 1
                freed = True
                break
        return freed

    def _unlink(self, key: Key) -> None:
        for owner in self.owners.pop(key, set()):
            unlist(self.keys_of, self.position_of, owner, key)
            if owner in self.keys_of:
                self._mark(owner)
            else:
                self._victims.gone(owner)
