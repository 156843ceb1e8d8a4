"""The FP8 tier's bytes, on the worker: slots of KV blocks in host memory, filled and read with kvsched.ops.

One slot holds one KV block of every attention layer (`tier_layout.LayerView`s): float8_e4m3fn pages plus one float32
scale per (block, head) (`kvsched.ops.gather_quantize_blocks`: Triton on a CUDA cache, C++ on a CPU one), or the
block's bytes as they are when vLLM already quantized the cache. Host memory is taken in chunks when a slot in them is
first written (pinned for a CUDA cache), so a large tier costs nothing at start-up.

Memory: the slots' chunks, and the copies' staging (tier_link.StagePool): a store, restore or snapshot moves its blocks
in groups through a fixed set of host buffers (one pinned allocation on a GPU, counted in the tier's host budget) with
at most one group's device buffers (`StagePool.device_bytes`, bounded at registration: vLLM has profiled its memory by
then). A slot larger than a buffer goes in pieces of its views (tier_pieces); a snapshot is copied out of its buffer to
pageable memory (tier_snapshot).

Integrity: every slot carries a checksum of its bytes (tier_slots.SlotCrc: CRC32C, or zlib.crc32 without the C++
extension), computed on the host copy once the copy has completed (the store's event; at once on the CPU), and
checked before a load. A slot whose store has not completed, or was never sealed, or
whose bytes changed since, fails the check: the load skips it, reports its block, and vLLM recomputes those tokens.
A CRC rather than a cheaper check (a generation number, a flag) because it also catches bytes that changed in host
memory, not only stores that did not finish. It runs on the engine thread, at the seal and again before a restore's
copies start: with zlib.crc32 (~1-2 GiB/s on a Xeon model 167) the check, not a GPU's 25-50 GB/s PCIe copy, set a
large restore's time (found by review), hence CRC32C on the SSE4.2 instruction, all of a seal's or a restore's slots in
one call (benchmarks/tier_checksum.py: 4-5x less on the tier's own path here).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.adapters.vllm.tier_layout import QUANTIZE, LayerView, view_bytes
from kvsched.adapters.vllm.tier_link import (
    DEFAULT_STAGE_BYTES,
    LOAD_BUFFERS,
    STAGE_BUFFERS,
    STORE_BUFFERS,
    Event,
    StagePool,
    SyncLink,
    host_empty,
    stage_plan,
)
from kvsched.adapters.vllm.tier_pieces import copy_plan, refuse_unless_fits
from kvsched.adapters.vllm.tier_slots import CHUNK_BYTES, HostSlots, carve, chunk_layout
from kvsched.adapters.vllm.tier_snapshot import SnapPiece, Snapshot, Staged
from kvsched.ops.fp8 import FP8, dequantize_kv_fp8, gather_quantize_blocks, scatter_dequantize_blocks

UNSEALED = -1  # a CRC32 is never negative: a slot with this CRC fails every check


@dataclass(eq=False)
class PendingStore:
    """A piece of a store (or of a snapshot: `out`) whose device-to-host copy may still be running: sealed into its
    slots (or copied out) once `event` completes. A group's pieces share `group`; its `last` piece takes the CRCs."""

    event: Event
    slots: list[int]
    staged: Staged  # per view of `views`: host rows (+ scales)
    error: torch.Tensor | None = None  # sampled (|x - x'|^2, |x|^2) of the first block, on the host
    buffer: int | None = None  # the staging buffer it holds until sealed
    views: tuple[int, int] = (0, 0)
    group: object = None  # only the newest group storing a slot may seal it (TierStore.latest)
    last: bool = True
    out: SnapPiece | None = None


def _error_sample(page: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(|x - x'|^2, |x|^2) of one quantized block against the original, on the cache's device (no host sync)."""
    x = page.float()
    x_hat = dequantize_kv_fp8(q, s, torch.float32)
    return torch.stack(((x - x_hat).pow(2).sum(), x.pow(2).sum()))


class TierStore:
    """Slots for `views` (the tier's host memory) and the copies in and out of the KV cache."""

    def __init__(self, views: Sequence[LayerView], mode: str, link: object | None = None, measure_error: bool = True,
                 chunk_bytes: int = CHUNK_BYTES, stage: StagePool | None = None) -> None:
        self.views = list(views)
        self.quantize = mode == QUANTIZE
        self.device = self.views[0].cache.device
        self.link = link if link is not None else SyncLink(self.device)
        self.slot_bytes = view_bytes(self.views, mode)
        self.slots = HostSlots(self.views, self.quantize, self.link.pin, self.slot_bytes, chunk_bytes)
        self.crc: dict[int, int] = {}
        self.stage = stage or StagePool(stage_plan(DEFAULT_STAGE_BYTES), self.link.pin, allocate=self.link.pin)
        buffer = self.stage.plan.buffer_bytes  # never grown: a slot larger than a buffer goes in pieces
        self.plan = copy_plan(self.slots.shapes, self.slots.row_bytes, self.quantize, buffer, self.stage.device_bytes)
        if self.stage.allocate:
            refuse_unless_fits(self.plan.fits, buffer, self.plan.piece_bytes, STAGE_BUFFERS)
        self.group_blocks = self.plan.blocks
        self._load_events: dict[int, Event] = {}  # restore buffer -> its last copy (oldest first)
        self.pending: list[PendingStore] = []
        self.latest: dict[int, object] = {}  # slot -> the newest store group writing it (only that one may seal it)
        self.layer_events: dict[str, Event] = {}
        self.measure_error = measure_error and self.quantize
        self.counters: Counter[str] = Counter()
        self.err_sq = 0.0  # sum over sampled blocks of |x - x'|^2 and |x|^2 (relative RMS = sqrt(err_sq / ref_sq))
        self.ref_sq = 0.0
        self.corrupt_every = 0  # fault injection (tests): flip a byte of every n-th slot after it is sealed

    # ---- store (demotion) ---------------------------------------------------------------------------------------
    def store(self, block_ids: Sequence[int], slots: Sequence[int], tokens: Sequence[int] | None = None) -> None:
        """Copy blocks into slots. `tokens[i]` > 0: block i is a session's partial last block, whose positions past
        `tokens[i]` hold whatever the block held before (never-written memory included). Where those positions sit in
        the block's bytes is the attention backend's business, so the block is stored whole; only non-finite values
        are zeroed, in a gathered copy, so garbage cannot poison the scale of the (block, head) the real tokens share.
        A restore writes the stale positions back, where the next prefill overwrites them or attention never reads
        them."""
        if not block_ids:
            return
        if len(set(slots)) < len(slots):  # a slot evicted and given again within the step: its last store counts
            keep = sorted({slot: i for i, slot in enumerate(slots)}.values())
            block_ids, slots = [block_ids[i] for i in keep], [slots[i] for i in keep]
            tokens = [tokens[i] for i in keep] if tokens else None
        self.seal_ready()
        partial = self.quantize and any(t > 0 for t in tokens or ())
        k, spans = self.group_blocks, self.plan.spans
        for lo in range(0, len(block_ids), k):
            group, ids, group_slots = object(), block_ids[lo:lo + k], list(slots[lo:lo + k])
            for slot in group_slots:
                self.crc[slot] = UNSEALED  # until its copies have completed and been checked in
                self.latest[slot] = group
            for j, span in enumerate(spans):
                buf = self._store_buffer()  # may wait for an earlier piece's copy (only a store above two buffers)
                read, event, staged, error = self._gather(ids, partial, span, buffer=buf)
                self.pending.append(PendingStore(event, group_slots, staged, error, buf, span, group,
                                                 j == len(spans) - 1))
        self.link.fence_compute(read)  # the blocks may be reused by this very step: not before they have been read
        self.counters["stored_blocks"] += len(block_ids)
        self.seal_ready()

    def snapshot(self, block_ids: Sequence[int]) -> Snapshot:
        """Copy (quantize) blocks out of the KV cache for the disk or shared level, without taking tier slots: the
        returned `Snapshot` yields each block's payload (as `HostSlots.payload` lays it out) once its copy completed,
        on any thread (the worker's background writer serializes it, off the engine step). Its pieces go through the
        store buffers, copied out to pageable memory once their copy completed (tier_snapshot): nothing more pinned."""
        k, spans, pieces = self.group_blocks, self.plan.spans, []
        for lo in range(0, len(block_ids), k):
            for span in spans:
                buf = self._store_buffer() if self.stage.allocate else None
                read, event, staged, _ = self._gather(block_ids[lo:lo + k], False, span, measure=False, buffer=buf)
                piece = SnapPiece(event, staged, span, in_buffer=buf is not None)
                pieces.append(piece)
                if buf is not None:  # holds the buffer until copied out (`seal_ready`, or the writer thread)
                    self.pending.append(PendingStore(event, [], staged, None, buf, span, piece, out=piece))
        self.link.fence_compute(read)
        self.counters["snapshot_blocks"] += len(block_ids)
        return Snapshot(pieces, k, len(spans))

    def _gather(self, block_ids: Sequence[int], partial: bool, span: tuple[int, int], measure: bool = True,
                buffer: int | None = None) -> tuple[Event, Event, Staged, torch.Tensor | None]:
        """Quantize (or copy) one piece's blocks (views `span`) into private buffers on the cache's device, then copy
        those to the host: into staging buffer `buffer` when the pool has one (pinned, on a GPU), else to tensors of
        their own.
        Returns (read: the blocks have been read, so the compute stream may overwrite them; done: the host copies
        completed), the host tensors per view, and the error sample. The compute stream waits for `read` only, not for
        the transfer to the host (found by review: the next forward stalled for the PCIe copy of every stored block)."""
        link = self.link
        errors: list[torch.Tensor] = []
        host_ids = self._host_ids(block_ids)  # the kernels check host ids: no wait on the device per layer
        local = self._host_ids(range(len(block_ids))) if partial else None
        dest = self._staging(len(block_ids), buffer, span)
        with link.side():
            ids = host_ids.to(self.device, non_blocking=True)  # for torch's own indexing, on the device
            local_dev = local.to(self.device, non_blocking=True) if local is not None else None
            outs: Staged = []
            for view in self.views[span[0]:span[1]]:
                cache, sel, dev_sel = view.cache, host_ids, ids
                if partial:
                    cache = torch.nan_to_num(cache.index_select(0, ids), 0.0, 0.0, 0.0)
                    assert local is not None and local_dev is not None
                    sel, dev_sel = local, local_dev
                if self.quantize:
                    q, s = gather_quantize_blocks(cache, sel)
                    rows: torch.Tensor = q.view(torch.uint8)
                    if self.measure_error and measure:
                        errors.append(_error_sample(cache.index_select(0, dev_sel[:1]), q[:1], s[:1]))
                else:  # as bytes: index ops know uint8 everywhere, not float8 (found by review, see `load`)
                    rows, s = cache.view(torch.uint8).index_select(0, dev_sel), None
                outs.append((rows, s))
            read = link.record()
            if dest is None:
                staged = [(self._to_host(r), self._to_host(s) if s is not None else None) for r, s in outs]
            else:
                for (r, s), (dq, ds) in zip(outs, dest, strict=True):
                    dq.copy_(r, non_blocking=True)
                    if s is not None and ds is not None:
                        ds.copy_(s, non_blocking=True)
                staged = dest
            error = self._to_host(torch.stack(errors).sum(0)) if errors else None
            event = link.record()
        return read, event, staged, error

    def _staging(self, blocks: int, buffer: int | None, span: tuple[int, int]) -> Staged | None:
        """Per view of `span`, host rows (and scales) for `blocks` blocks in staging buffer `buffer`; None without."""
        buf = self.stage.buffer(buffer) if buffer is not None else None
        if buf is None:
            return None
        shapes, rows = self.slots.shapes[span[0]:span[1]], self.slots.row_bytes[span[0]:span[1]]
        return carve(buf, shapes, rows, chunk_layout(shapes, rows, self.quantize, blocks))

    def _store_buffer(self) -> int:
        """A store buffer no pending store holds: the oldest holder's copy is waited for and sealed if need be."""
        while True:
            held = {p.buffer for p in self.pending}
            free = [b for b in STORE_BUFFERS if b not in held]
            if free:
                return free[0]
            self.pending[0].event.synchronize()
            self.seal_ready()

    def _load_buffer(self) -> int:
        """A restore buffer whose last host-to-device copy has completed (the oldest waited for if none has)."""
        for b in LOAD_BUFFERS:
            event = self._load_events.get(b)
            if event is None or event.query():
                return b
        b = next(iter(self._load_events))
        self._load_events[b].synchronize()
        return b

    def _host_ids(self, block_ids: Sequence[int] | range) -> torch.Tensor:
        """Block ids as a host tensor (pinned on a GPU: its copy to the device does not block). The kernels check ids
        on the host; checking device ids costs the host a wait on the GPU for every layer (found by review)."""
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        return ids.pin_memory() if self.link.pin else ids

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        out = host_empty(tuple(t.shape), t.dtype, self.link.pin)
        out.copy_(t, non_blocking=True)
        return out

    def seal_ready(self, wait_for: set[int] | None = None) -> int:
        """Check in the store pieces whose copies have completed (and, first, wait for those writing `wait_for`
        slots): their rows go into their slots, and a group's last piece takes the slots' CRCs, once its earlier
        pieces are in. A snapshot's piece is copied out of its buffer. Returns how many pieces were sealed."""
        if not self.pending:
            return 0
        keep: list[PendingStore] = []
        waiting: set[int] = set()  # groups with a piece not in yet: their later pieces wait (the CRC covers them all)
        sealed = 0
        for p in self.pending:
            if wait_for and wait_for.intersection(p.slots):
                p.event.synchronize()
            if id(p.group) in waiting or not p.event.query():
                keep.append(p)
                waiting.add(id(p.group))
                continue
            if p.out is not None:
                p.out.copy_out()  # unless the writer thread already did
                continue
            # a slot stored again (or invalidated) while this copy was in flight is not this store's to seal
            mine = [i for i, slot in enumerate(p.slots) if self.latest.get(slot) is p.group]
            if mine:
                rows = torch.tensor(mine)
                slots = [p.slots[i] for i in mine]
                for v, (q, s) in enumerate(p.staged, p.views[0]):
                    self.slots.write(v, slots, q.index_select(0, rows),
                                     s.index_select(0, rows) if s is not None else None)
                if p.last:
                    for slot, crc in zip(slots, self.slots.checksums(slots), strict=True):
                        del self.latest[slot]
                        self.crc[slot] = crc
                        self._maybe_corrupt(slot)
            if p.error is not None:
                self.err_sq += float(p.error[0])
                self.ref_sq += float(p.error[1])
            sealed += 1
        self.pending = keep
        return sealed

    # ---- load (restore) -----------------------------------------------------------------------------------------
    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> list[int]:
        """Restore `slots` into `block_ids`; returns the block ids whose slot failed its checksum (not written).
        Each layer's copies are ordered before that layer's attention (`fence_layer`); call `fence_all` when the
        forward pass must find every block written before it starts."""
        if not slots:
            return []
        if len(set(block_ids)) < len(block_ids):  # the connector keeps only a block's last load; never scatter twice
            last = {b: i for i, b in enumerate(block_ids)}
            keep = sorted(last.values())
            slots, block_ids = [slots[i] for i in keep], [block_ids[i] for i in keep]
        self.seal_ready(wait_for=set(slots))
        sealed = [i for i, s in enumerate(slots) if self.crc.get(s, UNSEALED) not in (UNSEALED, None)]
        now = self.slots.checksums([slots[i] for i in sealed])  # one call for the whole restore
        ok = {i for i, crc in zip(sealed, now, strict=True) if self.crc[slots[i]] == crc}
        bad = [i for i in range(len(slots)) if i not in ok]
        good = sorted(ok)
        if good:
            src, dst = [slots[i] for i in good], [block_ids[i] for i in good]
            k = self.group_blocks
            for lo in range(0, len(src), k):  # the side stream runs in order: the last piece's event follows them all
                for span in self.plan.spans:
                    done = self._load_group(src[lo:lo + k], dst[lo:lo + k], span)
            self.layer_events.update((view.name, done) for view in self.views)
        self.counters["loaded_blocks"] += len(good)
        self.counters["checksum_failures"] += len(bad)
        return [block_ids[i] for i in bad]

    def _load_group(self, src: list[int], dst: list[int], span: tuple[int, int]) -> Event:
        """One piece of a restore (views `span` of a group's blocks): the slots' bytes into a staging buffer (or
        tensors of their own), to the device, dequantized (or copied as bytes) into the blocks."""
        link, n = self.link, len(src)
        buf = self._load_buffer()
        dest = self._staging(n, buf, span)
        host_ids = self._host_ids(dst)
        with link.side():
            ids = host_ids.to(self.device, non_blocking=True)
            for v, view in enumerate(self.views[span[0]:span[1]], span[0]):
                if dest is not None:
                    q, s = dest[v - span[0]]
                else:
                    heads, rows, row_bytes = self.slots.shapes[v][0], self.slots.shapes[v][1], self.slots.row_bytes[v]
                    q = host_empty((n, heads, rows, row_bytes), torch.uint8, link.pin)
                    s = host_empty((n, heads), torch.float32, link.pin) if self.quantize else None
                self.slots.read(v, src, q, s)
                q_dev = q.to(self.device, non_blocking=True)
                if self.quantize:
                    assert s is not None
                    scatter_dequantize_blocks(q_dev.view(FP8), s.to(self.device, non_blocking=True), view.cache,
                                              host_ids)
                else:  # bytes into the cache viewed as bytes: torch has no index_copy_ for float8 dtypes
                    view.cache.view(torch.uint8).index_copy_(0, ids, q_dev)
            self._load_events.pop(buf, None)
            done = self._load_events[buf] = link.record()  # the buffer is free again once this piece's copies ran
        return done

    # ---- lower levels (disk, shared store) -------------------------------------------------------------------
    @property
    def payload_len(self) -> int:
        """Bytes of one slot's payload (`HostSlots.payload`)."""
        return sum(h * r * b + (h * 4 if self.quantize else 0)
                   for (h, r, _), b in zip(self.slots.shapes, self.slots.row_bytes, strict=True))

    def slot_payload(self, slot: int) -> bytes | None:
        """The bytes of a sealed slot that still passes its checksum (for a lower level), else None."""
        self.seal_ready(wait_for={slot})
        crc = self.crc.get(slot, UNSEALED)
        if crc == UNSEALED or crc != self.slots.checksum(slot):
            return None
        return self.slots.payload(slot)

    def fill(self, slot: int, payload: bytes) -> bool:
        """Put a payload a lower level returned (already verified there) into `slot` and seal it; a payload of the
        wrong size leaves the slot failing its checksum (the load then recomputes). Called on the levels' fetch
        thread: the scheduler keeps `slot` from every other copy until the fetch has landed."""
        self.latest.pop(slot, None)
        if len(payload) != self.payload_len:
            self.crc[slot] = UNSEALED
            return False
        self.slots.put_payload(slot, payload)
        self.crc[slot] = self.slots.checksum(slot)
        self.counters["filled_slots"] += 1
        return True

    def fence_layer(self, name: str) -> None:
        """The compute stream waits for the restores into layer `name` (the connector fences them all, `fence_all`)."""
        event = self.layer_events.pop(name, None)
        if event is not None:
            self.link.fence_compute(event)

    def fence_all(self) -> None:
        for name in list(self.layer_events):
            self.fence_layer(name)

    def invalidate(self, slots: Sequence[int]) -> None:
        """Make `slots` fail their checksum (a store that did not complete must never be read)."""
        for slot in slots:
            self.crc[slot] = UNSEALED
            self.latest.pop(slot, None)

    @property
    def relative_rms_error(self) -> float | None:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else None


    def _maybe_corrupt(self, slot: int) -> None:
        """Fault injection for tests (`KVSCHED_TIER_FAULT_EVERY=n`): the n-th sealed slot's bytes change afterwards,
        as a torn or overwritten host copy would."""
        if not self.corrupt_every:
            return
        self.counters["sealed_slots"] += 1
        if self.counters["sealed_slots"] % self.corrupt_every == 0:
            cq, _ = self.slots._chunk(slot // self.slots.per_chunk)[0]
            cq[slot % self.slots.per_chunk].view(-1)[0] ^= 0x5A
            self.counters["corrupted_slots"] += 1
