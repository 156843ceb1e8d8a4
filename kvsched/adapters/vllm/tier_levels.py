"""The levels under the FP8 host tier, scheduler side: a local-disk level and a shared store every replica of a pool
reads and writes (Redis). Both hold framed FP8 blocks (tier_blob) keyed by the model's identity and vLLM's content
hash; the bytes move on the workers (tier_levels_worker), this side plans and keeps the books.

Writes (written behind by the worker's background thread, never in the engine step):
- at the end of each turn, the turn's new full blocks go to the disk level (within its budget, kvsched.core.disk_tier)
  and to the shared store (with a TTL), so a restarted engine, or the replica a session moves to, finds them;
- a block the host tier evicts that the disk does not hold yet is spilled from its host slot.
Restores go through the host tier: when a session's request arrives (before vLLM schedules anything) and its prefix
continues past what the pool and the host tier hold, the run the disk level holds, then the run the shared store
holds, get host slots (`TierDirectory.admit`, then `hold`); the workers fill them on a background thread, never in
the engine step (disk reads or MGETs in chunks of `KVSCHED_TIER_FETCH_MB`, each block's frame and CRC checked), and
report each block over; meanwhile the request waits and every other request runs (tier_fetches). Once the blocks
landed, kvsched's prefetch restores them into the pool as for any tier block. A block that fails its checks leaves its
slot failing the host checksum and its key leaves the tier: vLLM recomputes it, it is never served.

Session metadata (role, TTL, turns, the replica that served the last turn) goes to the store at each turn's end; a
request of a session whose metadata names another replica counts as a moved session.

The store's reads at an arrival (the session's metadata, which blocks it holds) run on the scheduler thread while
they are fast, else off it (tier_lookups: the request waits for the answer as for a fetch, within a deadline).
Nothing the store holds or does raises into the engine core: a malformed value or a read that raises is counted
(`store_bad_values`), logged once, treated as absent (found by review).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from kvsched.adapters.vllm.tier_arrival_reads import SEEN_SESSIONS_MEMORY, ArrivalReads  # noqa: F401 - re-exported
from kvsched.adapters.vllm.tier_disk import open_level
from kvsched.adapters.vllm.tier_level_ops import (  # noqa: F401 - re-exported
    DISK,
    SHARED,
    SHARED_PUT,
    Fetch,
    LevelOps,
    Publish,
    Spill,
)
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_lookups import StoreLookups
from kvsched.adapters.vllm.tier_writer import BackgroundWriter
from kvsched.core.disk_tier import DiskDirectory
from kvsched.core.rank_shares import RankShares
from kvsched.core.shared_state import SessionMeta, session_key
from kvsched.core.store_health import ReadCost

logger = logging.getLogger("vllm.kvsched.fp8_tier")
DISK_RETRY_S = 30.0  # while another engine holds the disk directory (a rolling update): how often to try it again
# LRU bounds, sized by review's measurements (~170 B an entry here, ~250 B in the next; 1,000,000 took 171 + 252 MiB).
# Keys known to be in the store: forgetting one costs one redundant put at its session's next turn, never a wrong or
# lost block; 200,000 (~34 MiB) is several times the blocks one engine holds in pool and host tier at once (an 80 GB
# GPU: ~40,000 blocks of an 8B model). The sessions whose metadata was read: tier_arrival_reads.
PUBLISHED_MEMORY = 200_000
_T = TypeVar("_T")


class TierLevels(ArrivalReads):
    """Scheduler side of the disk and shared levels (owned by the FP8 tier connector)."""

    def __init__(self, cfg: LevelsConfig, identity: str, description: dict[str, Any], block_bytes: int,
                 world_size: int, shares: RankShares | None = None) -> None:
        self.cfg = cfg
        self.shares = shares or RankShares(world_size)  # each rank writes a file of its own layers' bytes
        self.identity = identity
        self.world_size = world_size
        self.ops = LevelOps()
        self.counters: Counter[str] = Counter()
        self.disk: DiskDirectory | None = None
        self._acks: Counter[bytes] = Counter()  # key -> ranks that reported its write (ok or not)
        self._failed: set[bytes] = set()  # keys whose write failed on some rank (reports of the others pending)
        self._busy_slots: Callable[[], set[int]] = set  # slots this step's stores/fetches write (set by the connector)
        self._declined: set[bytes] = set()  # spills declined this step
        # the connector's books (tier_fetches.FetchBook.started): how long a worker keeps them (`Fetch.keep_s`)
        self.on_fetch: Callable[[list[Fetch]], float | None] = lambda fetches: None
        if (cfg.disk_dir or cfg.store_url) and description.get("unshareable"):
            # Its files would be read by no restart (each leaving another directory of them), its store entries by no
            # other replica; and the identity that keeps them this engine's own is only as unique as vLLM's short
            # instance id, and names the host, which the workers of a multi-node engine do not share (found by review).
            logger.warning("kvsched disk and shared levels: off, the model's weights cannot be identified (%s): no "
                           "restart or other replica could restore their blocks", description["unshareable"])
        self.clock: Callable[[], float] = time.monotonic
        self._disk_retry_at: float | None = None  # while another engine holds the directory: when to try again
        self._disk_args = (cfg, identity, description, block_bytes, world_size, self.shares)
        if cfg.disk_dir and not description.get("unshareable"):
            self._try_disk(first=True)
        self.store: Any = None
        self.meta_writer: BackgroundWriter | None = None
        self._published: OrderedDict[bytes, float] = OrderedDict()  # key -> when it was last sent to the store
        self._seen_sessions: OrderedDict[Any, None] = OrderedDict()
        self._bad_logged = False
        self.lookups: StoreLookups | None = None  # the store's reads at arrivals, off the scheduler thread
        self.read_cost = ReadCost()  # ... once they are slow (while fast: inline)
        self._answers: dict[str, tuple[bool, dict[bytes, bool]]] = {}  # polled this step: request -> (moved, held)
        if cfg.store_url and not description.get("unshareable"):
            from kvsched.adapters.store.redis_store import open_store, redacted

            self.store = open_store(cfg.store_url)
            self.meta_writer = BackgroundWriter("kvsched-session-meta", keep_results=False)
            self.lookups = StoreLookups(self.store)
            logger.info("kvsched shared store: %s (replica %s; blocks kept %.0f s, session state %.0f s)",
                        redacted(cfg.store_url), cfg.replica, cfg.kv_ttl_s, cfg.state_ttl_s)

    def _try_disk(self, first: bool = False) -> None:
        """Open the disk level (tier_disk.open_level: its start-up deletes, past the budget, are queued); while
        another engine holds its directory, try again every DISK_RETRY_S (found by review: tried once, at start, so in
        a rolling update, the old engine draining while this one starts, this one never had the level). Said once,
        not at each try."""
        cfg = self._disk_args[0]
        try:
            opened = open_level(*self._disk_args, quiet=not first)
        except OSError as exc:  # full, read-only, not permitted: the engine serves without the level
            logger.error("kvsched disk tier: %s unusable (%s); running without the disk level", cfg.disk_dir, exc)
            self._disk_retry_at = None
            return
        if opened is not None:  # the files hold the directory's lock while the engine runs
            self.disk_files, self.disk, excess = opened
            self.ops.deletes.extend(excess)
            self.counters["disk_partial_blocks_removed"] += self.disk_files.partial_removed
        self._disk_retry_at = None if opened is not None else self.clock() + DISK_RETRY_S

    # ---- writes -------------------------------------------------------------------------------------------------
    def turn_finished(self, owner: Any, blocks: Sequence[tuple[bytes, int]], rec: Any) -> None:
        """`owner`'s turn ended holding `blocks` ((content key, pool block id), prefix order from the chain's first
        block): write the new ones behind, and its metadata to the store."""
        to_disk: set[bytes] = set()
        if blocks:
            keys = [k for k, _ in blocks]  # from the chain's first block: place 0
            plan = self._disk_call("planning a turn's writes", lambda d: d.plan_writes(owner, keys, 0))
            if plan is not None:
                to_disk.update(plan.write)
                self.ops.deletes.extend(plan.delete)
        shared = self.store is not None and self.store.up
        now = self.clock()
        for key, block_id in blocks:
            # Sent again once half its TTL is gone: the store may have dropped it (expired, evicted, a failed put)
            s = shared and now - self._published.get(key, -math.inf) > self.cfg.kv_ttl_s / 2
            if s:
                self._remember_published(key, now)
            if s or key in to_disk:
                self.ops.publishes.append(Publish(key, block_id, key in to_disk, s))
        if self.store is not None and self.meta_writer is not None:
            meta = SessionMeta(role=getattr(rec, "role", None), ttl_s=getattr(rec, "ttl_s", None),
                               turns=int(getattr(rec, "turns", 0)), replica=self.cfg.replica, blocks=len(blocks))
            key = self._session_key(owner)
            self.meta_writer.submit(lambda: self.store.put_state(key, meta.encode(), self.cfg.state_ttl_s) and None)

    def on_host_evict(self, key: Any, slot: int, owner: Any, at: int | None = None) -> bool | None:
        """The host tier evicts `key` (at place `at` in `owner`'s chain) from `slot`: spill it to disk unless the disk
        holds it. The host tier evicts a session's tail first, so its spills come deepest first: the disk lists them by
        `at`. False (declined: the host tier keeps the block while another can go, `TierDirectory._evict_one`) when the
        disk has no room for it now (its other blocks pinned by reads, pending or the session's own), or the slot's
        bytes are not this key's yet (stored or fetched this very step, before the worker ran)."""
        if self.disk is None or not isinstance(key, bytes) or self.disk.holds(key):
            return None
        if slot in self._busy_slots():
            self.counters["spills_skipped"] += 1
            return False
        plan = self._disk_call("planning a spill", lambda d: d.plan_writes(owner, [key], at))
        if plan is None:
            return None
        self.ops.deletes.extend(plan.delete)
        if not plan.write:  # counted once a block: the host tier offers it twice when nothing else can go
            self.counters["spills_declined"] += key not in self._declined
            self._declined.add(key)
            return False
        self.ops.spills.append(Spill(key, slot))
        return None

    def session_ended(self, owner: Any) -> None:
        self._seen_sessions.pop(owner, None)  # found by review: ended sessions stayed until the LRU bound pushed them
        dropped = self._disk_call("dropping an ended session", lambda d: d.drop_owner(owner))
        self.ops.deletes.extend(dropped or [])
        # A branch's end leaves the id's metadata (the id lives on); another replica's is never deleted (found by review)
        if self.store is not None and self.meta_writer is not None and not getattr(owner, "branch", 0):
            key = self._session_key(owner)
            self.meta_writer.submit(lambda: self._forget_meta(key))

    def keeps(self, owner: Any) -> bool:
        """The disk level holds (or writes) blocks for `owner`: its in-memory books, no I/O. The store keeps nothing
        under a branch's key (its metadata is the id's: `_session_key`), nor in-run under an inferred one (numbered
        per engine run, keyed with this replica)."""
        return self.disk is not None and owner in self.disk.keys_of

    # ---- restores ---------------------------------------------------------------------------------------------------
    def promote(self, owner: Any, chain: Sequence[Any], start: int, limit: int, host: Any,
                request_id: str | None = None) -> int:
        """A request of `owner` arrived whose prefix `chain` (vLLM block hashes) is cached up to block `start`: give
        host slots to the run past what the host tier holds that the disk, then the shared store, hold (at most
        `limit` blocks in all). Returns the blocks planned. The run the host tier holds becomes `owner`'s too: else
        when only other sessions own it (a shared system prompt, a moved session's prefix), the room made for the
        fetch, or a demotion while the request waits for it, could evict it and leave the fetched blocks unreachable
        (found by review). The store is read inline while its reads are fast (`ReadCost`); else it is asked off the
        scheduler thread (tier_lookups): the disk's run is planned at once, the store's lookup queued (request
        `request_id` waits for it); once `poll` has its answer, the request is promoted again and the run the store
        holds is planned."""
        end = start + max(limit, 0)
        held = [bytes(k) for k in chain[start:start + len(host.match(chain, start, end - start))]]
        pos = start + len(held)
        meta_key = self._first_arrival(owner)
        answer = self._answers.pop(request_id, None) if request_id is not None else None
        inline = (answer is None and self.store is not None and self.store.up
                  and (self.lookups is None or self.read_cost.inline()))
        moved = answer is not None and answer[0]
        if inline and meta_key is not None:
            raw, read = self._read(lambda: self.store.get_state(meta_key))
            if not read:  # the session's next request asks again (else a moved session went uncounted)
                self._seen_sessions.pop(owner, None)
            moved = self._moved(raw)
            meta_key = None  # asked
            # found slow by this GET: the EXISTS goes to the lookup thread (found by review: both ran inline)
            inline = self.lookups is None or self.read_cost.inline()
        if pos >= end:
            self._look_up(owner, meta_key, None, [])
            return 0
        keys: list[tuple[bytes, str]] = []
        if self.disk is not None:
            n = self.disk.match(chain, pos, end - pos)
            keys += [(bytes(k), DISK) for k in chain[pos:pos + n]]
            pos += n
        want: list[bytes] = []
        if self.store is not None and pos < end:
            rest = [bytes(k) for k in chain[pos:end]]
            if answer is not None:
                run = 0
                while run < len(rest) and answer[1].get(rest[run], False):
                    run += 1
                keys += [(k, SHARED) for k in rest[:run]]
            elif inline:
                keys += [(k, SHARED) for k in self._held_run(rest)]
            elif request_id is not None and self.store.up:
                # From where the pool's hit ends, not past the host's and the disk's runs: those can lose blocks while
                # the lookup is out, and an answer starting later than the run then ends would plan nothing.
                want = [bytes(k) for k in chain[start:end]]
        self._look_up(owner, meta_key, request_id, want, moved)
        if not keys:
            return 0
        source, on_disk = dict(keys), [k for k, src in keys if src == DISK]
        if self.disk is not None:  # its run, at `start + len(held)` in the chain, is `owner`'s, `owner` the most
            # recent, and the run pinned until read (`fetches_over`), before the host makes room: neither a spill that
            # makes room on a full disk nor a later step's eviction deletes a file about to be read (found by helpers)
            self.disk.claim(owner, on_disk, start + len(held))
        placed: list[tuple[bytes, int]] = []
        try:
            placed = host.admit(owner, held + [k for k, _ in keys], start)  # (`held` starts at block `start`)
        finally:  # a block given no slot is not read (none is if admit raised): unpinned now, the others when over
            self._unpin(set(on_disk).difference(k for k, _ in placed))
        host.hold([slot for _, slot in placed])  # no other key gets these slots until the workers' fetches landed
        fetches = [Fetch(k, slot, source[k]) for k, slot in placed]
        # One deadline for the step's fetches: one rule (tier_fetches).
        if (keep_s := self.on_fetch(fetches)) is not None:
            fetches = [Fetch(f.key, f.slot, f.source, keep_s) for f in fetches]
        self.ops.fetches.extend(fetches)
        for _, src in ((k, source[k]) for k, _ in placed):
            self.counters[f"{src}_planned_fetches"] += 1
        if moved and any(source[k] == SHARED for k, _ in placed):
            self.counters["moved_sessions_restored"] += 1
        return len(placed)

    def close(self) -> list[Fetch]:
        """The levels go off (a prefix-cache reset): no request waits for a lookup; returns the fetches planned since
        the last step, which no worker will ever run."""
        if self.lookups is not None:
            self.lookups.close()
        fetches = self.take_ops().fetches
        self._unpin(f.key for f in fetches if f.source == DISK)
        return fetches

    # ---- worker reports -----------------------------------------------------------------------------------------
    def written(self, results: Sequence[tuple[bytes, bool]], disk_full: bool) -> None:
        """Each rank reports each planned write once (a failure too: a dropped or failed job). A block is written
        when every rank's write succeeded; else the ranks' files that were written are deleted (none is ever read
        alone), and a failure never counts towards a later write of the same key."""
        if self.disk is None:
            return
        for key, ok in results:
            self._acks[key] += 1
            if not ok:
                self._failed.add(key)
            if self._acks[key] >= self.world_size:
                del self._acks[key]
                good = key not in self._failed
                self._failed.discard(key)
                if self.disk.done(key, good):  # failed, or no session wants it any more
                    self.ops.deletes.append(key)
        if disk_full:
            cap = self.disk.shrink_to_size()
            logger.warning("kvsched disk tier: the disk is full; the budget is now what it holds (%d blocks, "
                           "%.2f GiB): older blocks make room from now on", cap, self.disk.used_bytes / 2**30)

    def fetch_failed(self, failures: Sequence[tuple[bytes, str]]) -> None:
        """Blocks a worker could not read (DISK, SHARED) or put (SHARED_PUT: failed or dropped; found by review: a
        failed put hid the session from other replicas until half the block TTL had gone). Each rank reports its
        own; a read failure is counted once, in `fetches_over`."""
        for key, source in failures:
            if source == SHARED_PUT:
                self.counters["shared_put_failures"] += 1  # each rank puts its own frame
            if source == DISK and self.disk is not None:
                self.ops.deletes.extend(self.disk.forget([key]))
            elif source in (SHARED, SHARED_PUT):  # not in the store: the session's next turn publishes it again
                self._published.pop(key, None)

    def fetches_over(self, over: Sequence[tuple[bytes, str, bool]]) -> None:
        """Fetches over on every worker (FetchBook.reported: key, source, filled everywhere): each block counts once,
        restored or not served (found by review: each rank's counts were summed, world_size times the blocks)."""
        for _, source, ok in over:
            self.counters[f"{source}_restored_blocks" if ok else f"{source}_read_failures"] += 1
        self._unpin(key for key, source, _ in over if source == DISK)  # on every rank: its file may go now

    def take_ops(self) -> LevelOps:
        if self._disk_retry_at is not None and self.clock() >= self._disk_retry_at:
            self._try_disk()
        ops, self.ops = self.ops, LevelOps()
        self._declined.clear()
        return ops

    def stats(self) -> dict[str, float]:
        c = self.counters
        out: dict[str, float] = {}
        if self.disk is not None:
            d = self.disk
            out.update(disk_tier_capacity_bytes=d.capacity * d.block_bytes, disk_tier_bytes=d.used_bytes,
                       disk_tier_blocks=len(d.written), disk_tier_reading_blocks=len(d.reading),
                       disk_tier_written_blocks=d.counters["written_blocks"],
                       disk_tier_write_failures=d.counters["failed_writes"],
                       disk_tier_evicted_blocks=d.counters["evicted_blocks"],
                       disk_tier_spills_declined=c["spills_declined"],
                       disk_tier_indexed_blocks=d.counters["indexed_blocks"],
                       disk_tier_partial_blocks_removed=c["disk_partial_blocks_removed"],
                       disk_tier_read_failures=c["disk_read_failures"],
                       disk_tier_restored_blocks=c["disk_restored_blocks"])
        if self.store is not None:
            out.update(self.store.stats())
            out.update(shared_tier_read_failures=c["shared_read_failures"], moved_sessions=c["moved_sessions"],
                       shared_tier_restored_blocks=c["shared_restored_blocks"],
                       moved_sessions_restored=c["moved_sessions_restored"],
                       shared_tier_put_failures=c["shared_put_failures"],
                       store_bad_values=out.get("store_bad_values", 0.0) + c["store_bad_values"])
            if self.lookups is not None:
                lc = self.lookups.counters
                out.update(store_lookup_waits=lc["waits"], store_lookup_overdue=lc["overdue"],
                           store_lookups_dropped=lc["dropped"])
        return out

    # ---- internals ----------------------------------------------------------------------------------------------
    def _disk_call(self, what: str, call: Callable[[DiskDirectory], _T]) -> _T | None:
        """The disk's bookkeeping called from the engine step (a turn's end, a host-tier eviction inside a demotion,
        a session's end): an exception there is logged and switches the disk level off (None) instead of taking the
        engine down (found by review: a RecursionError in the eviction reached vLLM's step). Its files stay on disk
        for the next start-up's scan; its writes in flight are reported to nobody."""
        if self.disk is None:
            return None
        try:
            return call(self.disk)
        except Exception:  # noqa: BLE001 - a cache's bookkeeping never fails the step
            logger.exception("kvsched disk tier: %s failed; running without the disk level from now on", what)
            self.counters["disk_level_errors"] += 1
            self.disk = None
            return None

    def _unpin(self, keys: Iterable[bytes]) -> None:
        """Reads of `keys` from disk are over or will never run (a failure too): the blocks may be evicted again."""
        dead: list[Any] | None = self._disk_call("ending a read", lambda d: d.unpin(keys))
        self.ops.deletes.extend(dead or [])

    def _session_key(self, owner: Any) -> str:
        """The id's key whatever the branch: branch numbers are this engine's (kvsched.core.lineage), so another
        replica could never find a branch's key, and a session compacted into a new branch here would not count as
        moved there. An inferred id (`inferred-N`, this engine's counter) is keyed with this replica."""
        return session_key(self.identity, str(getattr(owner, "session_id", owner)), getattr(owner, "cache_salt", None),
                           getattr(owner, "tenant", None), self.cfg.replica if getattr(owner, "inferred", False) else None)

    def _forget_meta(self, key: str) -> None:  # on the metadata writer's thread
        meta = SessionMeta.decode(self.store.get_state(key))
        if meta is None or meta.replica == self.cfg.replica:
            self.store.delete_state(key)

    def _bad_value(self, what: str) -> None:
        self.counters["store_bad_values"] += 1
        if not self._bad_logged:
            self._bad_logged = True
            logger.warning("kvsched shared store: %s; served as if absent (further ones are counted in "
                           "store_bad_values, not logged)", what[:300])

    def _remember_published(self, key: bytes, now: float) -> None:
        self._published[key] = now
        self._published.move_to_end(key)
        if len(self._published) > PUBLISHED_MEMORY:
            self._published.popitem(last=False)
