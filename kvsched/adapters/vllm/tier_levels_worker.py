"""The levels under the FP8 host tier, worker side: runs the disk and shared-store work the scheduler planned
(tier_levels) against this worker's host slots and KV cache.

In the engine step the worker only copies: a spill takes a host slot's bytes, a publish quantizes pool blocks into a
snapshot (the same kernels as a demotion). Framing, file writes and store puts run on a background thread
(tier_writer), which reports each disk write back to the scheduler, and each shared put that failed or was dropped
(`SHARED_PUT`, so the scheduler publishes it again next turn instead of counting it in the store).

Fetches run on a second background thread, never in the step: the step only marks their slots unsealed (failing the
host checksum) and queues them in chunks of at most `KVSCHED_TIER_FETCH_MB` (a disk read per block, or one MGET per
chunk of shared blocks). On the thread every block is checked (tier_blob: identity, rank, key, size, CRC) before it
enters its slot; one that fails leaves its slot failing the checksum, so it is never served. Each chunk's outcome
goes back to the scheduler with the next step's report (`fetch_landed`), after its slots were written: the
scheduler keeps those slots to their keys until then and restores them only after (tier_fetches), and keeps the disk
files they read (`DiskDirectory.claim`). Only a block that failed its checks or whose file is missing is reported bad
(`fetch_failures`: the scheduler forgets and deletes its file); a fetch dropped, shut down or given up leaves its
file, which is good (a full fetch queue, or a shutdown, used to have the scheduler delete good files).

A fetch is reported whatever happens to it, so its slot and its file's pin are released (tier_levels_fetch): a chunk
that raises reports its blocks unfilled; a fetch still queued when the scheduler stops counting on it is given up; a
fetch thread killed by a BaseException reports what it held and had queued, and another is started.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from kvsched.adapters.vllm import tier_blob
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_disk import DiskFiles
from kvsched.adapters.vllm.tier_layout import kernel_split
from kvsched.adapters.vllm.tier_levels import DISK, SHARED, SHARED_PUT, Fetch, LevelOps
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_fetch import FetchThread, WorkerFetches
from kvsched.adapters.vllm.tier_stats import WORKER_LEVEL_STATS
from kvsched.adapters.vllm.tier_writer import BackgroundWriter
from kvsched.core.shared_state import block_key

logger = logging.getLogger("vllm.kvsched.fp8_tier")
MAX_DEFERRED_DELETES = 100_000  # deletes a full writer queue put off (the start-up scan catches the rest)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class TierLevelsWorker:
    def __init__(self, cfg: LevelsConfig, identity: str, description: dict[str, Any], rank: int, world_size: int,
                 store: TierStore) -> None:
        self.cfg = cfg
        self.identity = identity
        self.frame = tier_blob.frame_identity(identity, kernel_split(store.views))  # in each block's header
        self.rank = rank
        self.tier = store
        self.files: DiskFiles | None = None
        if cfg.disk_dir:
            try:
                self.files = DiskFiles(cfg.disk_dir, identity, description, rank, world_size)
            except OSError as exc:  # its writes then fail and its reads miss: recomputed, never a failed step
                logger.error("kvsched disk tier: %s unusable on rank %d (%s)", cfg.disk_dir, rank, exc)
        self.shared: Any = None
        if cfg.store_url:
            from kvsched.adapters.store.redis_store import open_store

            self.shared = open_store(cfg.store_url)
        self.writer = BackgroundWriter(f"kvsched-tier-writer-{rank}")
        self.clock: Callable[[], float] = time.monotonic
        self.fetches = WorkerFetches(f"kvsched-tier-fetch-{rank}", self._fetch, store.invalidate, lambda: self.clock())
        self.counters: Counter[str] = Counter()
        self.landed: list[tuple[Fetch, bool]] = []  # fetches over since the last report: (fetch, slot filled)
        self._closed = False  # engine shutdown: queued fetches read and write nothing more
        self._bad: deque[tuple[bytes, str]] = deque()  # (key, source) that failed their checks (fetch thread)
        self.put_failures: deque[tuple[bytes, str]] = deque()  # (key, SHARED_PUT), appended by the writer thread
        self._deferred_deletes: list[bytes] = []
        self._write_errors_logged: set[int | None] = set()  # errno of the write failures logged
        self._reported: dict[str, int] = {}  # the counters as the last report sent them (counter_deltas)

    @property
    def fetcher(self) -> FetchThread:
        """The current fetch thread (another once one died: tier_levels_fetch)."""
        return self.fetches.thread

    # ---- in the step, before the tier's stores ------------------------------------------------------------------
    def before_stores(self, ops: LevelOps) -> None:
        """Queue the deletes, then copy what the spills and publishes write behind. A copy that raises (a pinned host
        buffer that cannot be allocated, say) fails its writes, never the engine's step (found by review: unguarded,
        unlike the tier's stores, it took the worker down). While the writer's queue holds its bound of bytes (a slow
        or hung disk), no copy is made: the writes are dropped as a full queue drops them."""
        # A key written again this step needs no delete (the write replaces its file whole); a delete put off to the
        # next step would remove the new file (found by review).
        rewritten = {sp.key for sp in ops.spills} | {p.key for p in ops.publishes if p.disk}
        keys = [k for k in (*self._deferred_deletes, *ops.deletes) if k not in rewritten]
        self._deferred_deletes = []
        if keys and self.files is not None:  # first: a key deleted and written again this step keeps its file
            files = self.files
            if not self.writer.submit(lambda: [files.delete(k) for k in keys] and None):
                self._deferred_deletes = keys[-MAX_DEFERRED_DELETES:]  # a full queue: next step (else left behind)
        for sp in ops.spills:
            if not self.writer.has_room():
                self._dropped([(sp.key, True, False)])
                continue
            try:
                payload = self.tier.slot_payload(sp.slot)
            except Exception:  # noqa: BLE001 - a cache never fails the step
                self._copy_failed([(sp.key, True, False)])
                continue
            if payload is None:  # the slot did not verify: nothing trustworthy to keep
                self.writer.results.append([(sp.key, False)])
                continue
            key = sp.key
            self._submit([(key, True, False)], lambda key=key, payload=payload: [(key, payload, True, False)],
                         len(payload))
        if ops.publishes:
            pubs = [(p.key, p.disk, p.shared) for p in ops.publishes]
            if not self.writer.has_room():
                self._dropped(pubs)
                return
            try:
                snap = self.tier.snapshot([p.block_id for p in ops.publishes])
            except Exception:  # noqa: BLE001 - a cache never fails the step
                self._copy_failed(pubs)
                return
            self._submit(pubs, lambda: [(k, snap.payload(i), d, s) for i, (k, d, s) in enumerate(pubs)],
                         len(pubs) * self.tier.payload_len)

    def _copy_failed(self, keys: list[tuple[bytes, bool, bool]]) -> None:
        """The step's copy for a write job of (key, to disk, to shared) raised: its disk writes and shared puts are
        reported failed (the scheduler waits for each disk write's report); counted, logged once."""
        self.counters["copy_failures"] += 1
        if self.counters["copy_failures"] == 1:
            logger.exception("kvsched disk/shared tier: copying %d blocks to write behind failed; not written (further "
                             "failures are counted, not logged)", len(keys))
        self.writer.results.append([(k, False) for k, to_disk, _ in keys if to_disk])
        self._put_failed([(k, SHARED_PUT) for k, _, to_shared in keys if to_shared and self.shared is not None])

    def _submit(self, keys: list[tuple[bytes, bool, bool]], items: Any, nbytes: int) -> None:
        """Queue a write job of (key, to disk, to shared) holding `nbytes` of copies; its disk writes and shared puts
        are reported failed if the queue drops it or it raises (the scheduler counts the disk writes pending until
        then, and the puts in the store)."""
        failed = [(k, False) for k, to_disk, _ in keys if to_disk]
        unput = [(k, SHARED_PUT) for k, _, to_shared in keys if to_shared and self.shared is not None]

        def job() -> list[tuple[bytes, bool]]:
            try:
                return self._write(items())
            except Exception:  # noqa: BLE001 - reported as failed writes, never a stuck pending key
                self.counters["failed_write_jobs"] += 1
                logger.exception("kvsched disk/shared tier: a write job failed")
                self._put_failed(unput)
                return failed

        if not self.writer.submit(job, nbytes):
            self._dropped(keys)

    def _dropped(self, keys: list[tuple[bytes, bool, bool]]) -> None:
        """A write job of (key, to disk, to shared) the writer's queue did not take (full in jobs or bytes): its disk
        writes are reported failed, its shared puts not landed; counted in `dropped_write_jobs`."""
        self.counters["dropped_write_jobs"] += 1
        failed = [(k, False) for k, to_disk, _ in keys if to_disk]
        unput = [(k, SHARED_PUT) for k, _, to_shared in keys if to_shared and self.shared is not None]
        if failed:
            self.writer.results.append(failed)
        self.counters["shared_put_dropped"] += len(unput)
        self._put_failed(unput)

    def _put_failed(self, unput: list[tuple[bytes, str]]) -> None:
        """Report shared puts that did not land (from the writer thread too: a deque, drained by `report`)."""
        self.put_failures.extend(unput)

    # ---- in the step, after the tier's stores: fetches start, and the step goes on ------------------------------------
    def start_fetch(self, ops: LevelOps) -> None:
        """Queue this step's fetches on the fetch thread, in chunks of at most `cfg.fetch_bytes` (at least one block),
        disk first. Their slots fail the host checksum until filled (a load of one would recompute it); a chunk the
        full queue drops lands at once, unfilled (its file stays). Still queued past their time, `report` gives them
        up."""
        if not ops.fetches:
            return
        self.tier.invalidate([f.slot for f in ops.fetches])
        per_chunk = max(1, self.cfg.fetch_bytes // tier_blob.framed_len(len(ops.fetches[0].key), self.tier.payload_len))
        for source in (DISK, SHARED):
            todo = [f for f in ops.fetches if f.source == source]
            for i in range(0, len(todo), per_chunk):
                self.landed += self.fetches.submit(todo[i:i + per_chunk])

    def close(self, flush_s: float = 10.0) -> None:
        """Engine shutdown: fetches still queued or reading write no slot; writes still queued for the disk and shared
        levels get `flush_s` seconds (a restart then finds them)."""
        self._closed = True
        if not self.writer.flush(timeout_s=flush_s):
            logger.warning("kvsched disk/shared tier: writes still queued at shutdown were dropped")

    def _fetch(self, chunk: list[Fetch], taken: list[Fetch]) -> list[tuple[Fetch, bool]]:
        """On the fetch thread: read one chunk (disk files one at a time, or one MGET), check each frame, fill its
        slot. Each disk block is taken just before its read: those still queued when a read hangs can be given up. An
        Exception is the caller's (WorkerFetches._job)."""
        source, n = chunk[0].source, self.tier.payload_len
        blobs: list[Any] = []
        try:
            if source == DISK:
                for f in chunk:
                    if self.fetches.take([f]):
                        taken.append(f)
                        blobs.append(self.files.read(f.key) if self.files is not None and not self._closed else None)
            else:
                taken += self.fetches.take(chunk)
                if taken and self.shared is not None and not self._closed:
                    got = list(self.shared.get_blocks([block_key(self.identity, f.key, self.rank) for f in taken]))
                    blobs = got if len(got) == len(taken) else []
        except Exception:  # noqa: BLE001 - never a failed step for a cache: each block is a miss, recomputed
            logger.exception("kvsched %s tier: reading %d blocks failed", source, len(chunk))
        blobs += [None] * (len(taken) - len(blobs))
        return [(f, self._fill_safely(f, blob, source, n)) for f, blob in zip(taken, blobs, strict=True)]

    def _fill_safely(self, f: Fetch, blob: bytes | None, source: str, payload_len: int) -> bool:
        """Every fetch of a chunk is reported, filled or not: an exception here (a host chunk that cannot be
        allocated, say) left the whole chunk unreported, its slots held for good and its request waiting to its
        deadline (found by review)."""
        try:
            return self._fill(f.key, f.slot, blob, source, payload_len)
        except Exception:  # noqa: BLE001 - the slot fails its checksum: recomputed, never served
            logger.exception("kvsched %s tier: filling a fetched block failed", source)
            try:
                self.tier.invalidate([f.slot])
            except Exception:  # noqa: BLE001 - reported unfilled either way
                pass
            return False

    def _fill(self, key: bytes, slot: int, blob: bytes | None, source: str, payload_len: int) -> bool:
        """Check the frame and fill the slot. A block that fails its checks, or whose file or value is missing, is
        reported bad (`_bad`); shut down, nothing is filled and nothing is bad."""
        if self._closed:
            return False
        try:
            if blob is None:
                raise tier_blob.BlobError("missing")
            payload = tier_blob.decode(blob, self.frame, self.rank, key, payload_len)
        except tier_blob.BlobError as exc:
            self.tier.invalidate([slot])
            self._bad.append((key, source))
            self.counters[f"{source}_read_failures"] += 1
            if self.counters[f"{source}_read_failures"] <= 3:
                logger.warning("kvsched %s tier: block %s not served (%s); recomputed", source, key.hex()[:16], exc)
            return False
        return not self._closed and self.tier.fill(slot, payload)

    # ---- background ---------------------------------------------------------------------------------------------
    def _write(self, items: list[tuple[bytes, bytes, bool, bool]]) -> list[tuple[bytes, bool]]:
        """Frame each (key, payload, to disk, to shared); returns the disk writes' outcomes."""
        done: list[tuple[bytes, bool]] = []
        puts: dict[str, bytes] = {}
        put_keys: list[bytes] = []
        for key, payload, to_disk, to_shared in items:
            blob = tier_blob.encode(self.frame, self.rank, key, payload)
            if to_disk and self.files is None:
                done.append((key, False))
            elif to_disk and self.files is not None:
                try:
                    self.files.write(key, blob)
                    done.append((key, True))
                    self.counters["disk_written_blocks"] += 1
                except OSError as exc:
                    done.append((key, False))
                    self.counters["disk_write_failures"] += 1
                    if exc.errno in FULL_ERRNOS:
                        self.counters["disk_full"] += 1
                    self._write_failed(exc)
            if to_shared and self.shared is not None:
                puts[block_key(self.identity, key, self.rank)] = blob
                put_keys.append(key)
        if puts:
            if self.shared.put_blocks(puts, self.cfg.kv_ttl_s):
                self.counters["shared_published_blocks"] += len(puts)
            else:  # failed, an error reply, or skipped while the store is down: published again next turn
                self.counters["shared_put_failures"] += len(puts)
                self._put_failed([(k, SHARED_PUT) for k in put_keys])
        return done

    def _write_failed(self, exc: OSError) -> None:
        """Logged once per kind (errno), full or not (found by review: a removed directory logged one WARNING per
        block); every failure is counted in `disk_write_failures`."""
        if exc.errno in self._write_errors_logged:
            return
        self._write_errors_logged.add(exc.errno)
        logger.warning("kvsched disk tier: write failed%s (%s); further failures of this kind are counted "
                       "(disk_write_failures), not logged", ", disk full" if exc.errno in FULL_ERRNOS else "", exc)

    def report(self) -> tuple[list[tuple[bytes, bool]], bool, list[tuple[bytes, str]]]:
        """(disk writes done since the last report, whether the disk filled up, blocks that failed their checks or
        whose shared put did not land (SHARED_PUT)). The fetches over since then go to `landed`."""
        done = [r for batch in self.writer.drain() for r in batch]
        full = self.counters.pop("disk_full", 0) > 0
        self.landed += self.fetches.collect()
        # not every unfilled fetch: its file may be good
        failures = [self._bad.popleft() for _ in range(len(self._bad))]
        puts = [self.put_failures.popleft() for _ in range(len(self.put_failures))]
        return done, full, failures + puts

    def fill(self, meta: Any) -> None:
        """This step's outcomes into the worker's report to the scheduler (`TierWorkerMeta`)."""
        meta.disk_done, meta.disk_full, meta.fetch_failures = self.report()
        landed, self.landed = self.landed, []
        meta.fetch_landed = [(f.key, f.slot, ok) for f, ok in landed]  # counted by the scheduler, once a block
        meta.counters = self.counter_deltas()

    def counter_deltas(self) -> dict[str, int]:
        """This worker's failure counters (tier_stats.WORKER_LEVEL_STATS) grown since the last call. Read failures
        are not among them: the scheduler counts each fetch that landed unfilled (`*_read_failures`)."""
        c, wc, fc, f = self.counters, self.writer.counters, self.fetches.thread_counters(), self.fetches.counters
        now = dict(zip(WORKER_LEVEL_STATS, (
            c["copy_failures"], c["dropped_write_jobs"], wc["dropped_for_bytes"],
            c["failed_write_jobs"] + wc["failed_jobs"], c["shared_put_dropped"],
            fc["dropped_jobs"] + f["refused_fetch_jobs"], fc["failed_jobs"] + f["failed_fetch_jobs"],
            f["fetches_given_up"], f["fetch_thread_deaths"]), strict=True))
        deltas = {k: v - self._reported.get(k, 0) for k, v in now.items() if v != self._reported.get(k, 0)}
        self._reported = now
        return deltas
