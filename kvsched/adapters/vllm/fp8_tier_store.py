"""The FP8 tier's bytes, on the worker: slots of KV blocks in host memory, filled and read with kvsched.ops.

One slot holds one KV block of every attention layer (`tier_layout.LayerView`s): float8_e4m3fn pages plus one float32
scale per (block, head) (`kvsched.ops.gather_quantize_blocks`: Triton on a CUDA cache, C++ on a CPU one), or the
block's bytes as they are when vLLM already quantized the cache. Host memory is taken in chunks when a slot in them is
first written (pinned for a CUDA cache), so a large tier costs nothing at start-up.

Integrity: every slot carries a CRC32 of its bytes, computed on the host copy once the copy has completed (the store's
event; at once on the CPU), and checked before a load. A slot whose store has not completed, or was never sealed, or
whose bytes changed since, fails the check: the load skips it, reports its block, and vLLM recomputes those tokens.
A CRC rather than a cheaper check (a generation number, a flag) because it also catches bytes that changed in host
memory, not only stores that did not finish. It costs the engine thread ~0.47 ms per MiB (zlib.crc32, 2.1 GiB/s on a
Xeon model 167), at the seal and again before a restore's copies start: on a GPU, where a restore's PCIe copy runs at
25-50 GB/s, the check before it, not the copy, sets a large restore's time (found by review; not changed here).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.adapters.vllm.tier_layout import QUANTIZE, LayerView, view_bytes
from kvsched.adapters.vllm.tier_link import Event, SyncLink, host_empty
from kvsched.adapters.vllm.tier_slots import CHUNK_BYTES, HostSlots
from kvsched.ops.fp8 import FP8, dequantize_kv_fp8, gather_quantize_blocks, scatter_dequantize_blocks

STAGE_BYTES = 256 << 20  # device bytes a store quantizes before it copies them to the host
UNSEALED = -1  # a CRC32 is never negative: a slot with this CRC fails every check


@dataclass(eq=False)
class PendingStore:
    """A store whose device-to-host copy may still be running: sealed into its slots once `event` completes."""

    event: Event
    slots: list[int]
    staged: list[tuple[torch.Tensor, torch.Tensor | None]]  # per view: host rows (+ scales)
    error: torch.Tensor | None = None  # sampled (|x - x'|^2, |x|^2) of the first block, on the host


@dataclass(eq=False)
class Snapshot:
    """Blocks copied out of the KV cache for a lower level: payload(i) once `event` has completed."""

    event: Event
    staged: list[tuple[torch.Tensor, torch.Tensor | None]]

    def payload(self, i: int) -> bytes:
        self.event.synchronize()
        parts: list[bytes] = []
        for q, s in self.staged:
            if s is not None:
                parts.append(s[i].contiguous().numpy().tobytes())
            parts.append(q[i].contiguous().numpy().tobytes())
        return b"".join(parts)


def _error_sample(page: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(|x - x'|^2, |x|^2) of one quantized block against the original, on the cache's device (no host sync)."""
    x = page.float()
    x_hat = dequantize_kv_fp8(q, s, torch.float32)
    return torch.stack(((x - x_hat).pow(2).sum(), x.pow(2).sum()))


class TierStore:
    """Slots for `views` (the tier's host memory) and the copies in and out of the KV cache."""

    def __init__(self, views: Sequence[LayerView], mode: str, link: object | None = None, measure_error: bool = True,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.views = list(views)
        self.quantize = mode == QUANTIZE
        self.device = self.views[0].cache.device
        self.link = link if link is not None else SyncLink(self.device)
        self.slot_bytes = view_bytes(self.views, mode)
        self.slots = HostSlots(self.views, self.quantize, self.link.pin, self.slot_bytes, chunk_bytes)
        self.crc: dict[int, int] = {}
        self.pending: list[PendingStore] = []
        self.latest: dict[int, PendingStore] = {}  # slot -> the newest store writing it (only that one may seal it)
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
        read, event, staged, error = self._gather(block_ids, partial)
        self.link.fence_compute(read)  # the blocks may be reused by this very step: not before they have been read
        pending = PendingStore(event, list(slots), staged, error)
        for slot in slots:
            self.crc[slot] = UNSEALED  # until its copy has completed and been checked in
            self.latest[slot] = pending
        self.pending.append(pending)
        self.counters["stored_blocks"] += len(block_ids)
        self.seal_ready()

    def snapshot(self, block_ids: Sequence[int]) -> Snapshot:
        """Copy (quantize) blocks out of the KV cache for the disk or shared level, without taking tier slots: the
        returned `Snapshot` yields each block's payload (as `HostSlots.payload` lays it out) once its copy completed,
        on any thread (the worker's background writer serializes it, off the engine step)."""
        read, event, staged, _ = self._gather(block_ids, False, measure=False)
        self.link.fence_compute(read)
        self.counters["snapshot_blocks"] += len(block_ids)
        return Snapshot(event, staged)

    def _gather(self, block_ids: Sequence[int], partial: bool, measure: bool = True,
                ) -> tuple[Event, Event, list[tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor | None]:
        """Quantize (or copy) the blocks into private buffers on the cache's device, then copy those to the host.
        Returns (read: the blocks have been read, so the compute stream may overwrite them; done: the host copies
        completed), the host tensors per view, and the error sample. The compute stream waits for `read` only, not for
        the transfer to the host (found by review: the next forward stalled for the PCIe copy of every stored block).
        The device buffers of views are staged in groups of at most STAGE_BYTES; a store larger than that has its
        earlier groups' host copies before `read` (the side stream runs in order)."""
        link = self.link
        staged: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        errors: list[torch.Tensor] = []
        host_ids = self._host_ids(block_ids)  # the kernels check host ids: no wait on the device per layer
        local = self._host_ids(range(len(block_ids))) if partial else None
        groups = self._stage_groups(len(block_ids))
        with link.side():
            ids = host_ids.to(self.device, non_blocking=True)  # for torch's own indexing, on the device
            local_dev = local.to(self.device, non_blocking=True) if local is not None else None
            for g, group in enumerate(groups):
                outs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
                for view in group:
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
                if g == len(groups) - 1:
                    read = link.record()
                staged.extend((self._to_host(r), self._to_host(s) if s is not None else None) for r, s in outs)
            error = self._to_host(torch.stack(errors).sum(0)) if errors else None
            event = link.record()
        return read, event, staged, error

    def _stage_groups(self, blocks: int) -> list[list[LayerView]]:
        """The views in consecutive groups whose device buffers for `blocks` blocks stay within STAGE_BYTES (at least
        one view each)."""
        groups: list[list[LayerView]] = [[]]
        held = 0
        for view, per_block in zip(self.views, self.slots.view_bytes, strict=True):
            need = blocks * per_block
            if groups[-1] and held + need > STAGE_BYTES:
                groups.append([])
                held = 0
            groups[-1].append(view)
            held += need
        return groups

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
        """Check in the stores whose copies have completed (and, first, wait for those writing `wait_for` slots):
        their rows go into their slots and their CRCs are computed. Returns how many stores were sealed."""
        if not self.pending:
            return 0
        keep: list[PendingStore] = []
        sealed = 0
        for p in self.pending:
            if wait_for and wait_for.intersection(p.slots):
                p.event.synchronize()
            if not p.event.query():
                keep.append(p)
                continue
            # a slot stored again (or invalidated) while this copy was in flight is not this store's to seal
            mine = [i for i, slot in enumerate(p.slots) if self.latest.get(slot) is p]
            if mine:
                rows = torch.tensor(mine)
                slots = [p.slots[i] for i in mine]
                for v, (q, s) in enumerate(p.staged):
                    self.slots.write(v, slots, q.index_select(0, rows), s.index_select(0, rows) if s is not None else None)
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
        bad_set = set(bad)
        good = [i for i in range(len(slots)) if i not in bad_set]
        if good:
            src = [slots[i] for i in good]
            n = len(src)
            link = self.link
            host_ids = self._host_ids([block_ids[i] for i in good])
            with link.side():
                ids = host_ids.to(self.device, non_blocking=True)
                for v, view in enumerate(self.views):
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
                    self.layer_events[view.name] = link.record()
        self.counters["loaded_blocks"] += len(good)
        self.counters["checksum_failures"] += len(bad)
        return [block_ids[i] for i in bad]

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
