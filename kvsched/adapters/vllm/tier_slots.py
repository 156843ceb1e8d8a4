"""The FP8 tier's host memory: slots of KV blocks (every attention layer's page, and its scales when quantized), taken
in chunks when a slot in them is first written, so a large tier costs nothing at start-up.

A chunk is one host allocation sliced into each layer's rows and scales (`chunk_layout`). For a CUDA cache it is
pinned, and torch's pinned-memory allocator rounds every request up to a power of two
(`CachingHostAllocator`): one pinned tensor per layer, as before, took up to ~1.75x the bytes counted (found by review:
Qwen2.5-7B's pages), and pinned memory cannot be swapped out. So a pinned chunk asks for a power of two and holds as
many slots as fit in it: what is allocated is what is counted (`HostSlots.allocated_bytes`).

A slot's checksum (`SlotCrc`) is CRC32C through kvsched._C (the SSE4.2 crc32 instruction, ~10 GiB/s) when the extension
is built, else zlib.crc32 (~0.7-2 GiB/s): chosen once per process (`slot_crc`), and each `HostSlots` keeps the one it
was made with, so a slot is always checked with the function that sealed it. The slots live in this process's memory
only (the disk and shared levels carry their own zlib.crc32, tier_blob), so the two functions never meet.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvsched.adapters.vllm.tier_layout import LayerView
from kvsched.adapters.vllm.tier_link import host_empty, normal_tensors
from kvsched.ops import checksum

CHUNK_BYTES = 64 << 20  # host memory is taken this much at a time
ALIGN = 64  # bytes: each layer's rows and scales start on a cache line (the scales' float32 view needs 4)


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    slots: int  # slots per chunk
    nbytes: int  # bytes one chunk allocates
    offsets: list[tuple[int, int | None]]  # per layer view: where its rows and its scales (None: raw) start


def view_slot_bytes(shapes: Sequence[tuple[int, ...]], row_bytes: Sequence[int], quantize: bool) -> list[int]:
    """Bytes one slot takes of each view: its rows, and its float32 scales when quantized."""
    return [h * r * rb + (4 * h if quantize else 0) for (h, r, *_), rb in zip(shapes, row_bytes, strict=True)]


def chunk_layout(shapes: Sequence[tuple[int, ...]], row_bytes: Sequence[int], quantize: bool, slots: int,
                 whole_power_of_two: bool = False) -> ChunkLayout:
    """Where each view's `[slots, heads, rows, row_bytes]` rows and `[slots, heads]` float32 scales sit in a chunk of
    `slots` slots. `whole_power_of_two`: the chunk's bytes are rounded up to a power of two (what a pinned allocation
    takes anyway) and the chunk holds as many slots as fit in them."""

    def place(n: int) -> tuple[int, list[tuple[int, int | None]]]:
        end, offsets = 0, []
        for (heads, rows, *_), rb in zip(shapes, row_bytes, strict=True):
            at_q = -(-end // ALIGN) * ALIGN
            end = at_q + n * heads * rows * rb
            at_s = None
            if quantize:
                at_s = -(-end // ALIGN) * ALIGN
                end = at_s + n * heads * 4
            offsets.append((at_q, at_s))
        return end, offsets

    nbytes, offsets = place(slots)
    if not whole_power_of_two:
        return ChunkLayout(slots, nbytes, offsets)
    size = 1 << max(nbytes - 1, 0).bit_length()
    per_slot = sum(view_slot_bytes(shapes, row_bytes, quantize))
    n = max(size // max(per_slot, 1), slots)  # the most that fit without padding; padding costs at most a few
    while n > slots and place(n)[0] > size:
        n -= 1
    nbytes, offsets = place(n)
    return ChunkLayout(n, max(nbytes, size), offsets)


@dataclass(frozen=True, slots=True)
class SlotCrc:
    """The slots' checksum: `fn(addrs, lens)` -> one CRC per row of [items, segments] host addresses and byte counts."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], list[int]]


def _zlib_segments(addrs: np.ndarray, lens: np.ndarray) -> list[int]:
    out = []
    for row_a, row_l in zip(addrs.tolist(), lens.tolist(), strict=True):
        c = 0
        for a, n in zip(row_a, row_l, strict=True):
            c = zlib.crc32((ctypes.c_char * n).from_address(a), c) if n else c
        out.append(c)
    return out


ZLIB = SlotCrc("zlib.crc32", _zlib_segments)
CRC32C = SlotCrc("crc32c", lambda a, n: checksum.crc32c_segments(a, n, impl="cxx"))


@functools.cache
def slot_crc() -> SlotCrc:
    """This process's slot checksum, fixed at its first use: CRC32C when kvsched._C carries it, else zlib.crc32."""
    return CRC32C if checksum.has_cxx_crc32c() else ZLIB


def carve(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]], row_bytes: Sequence[int],
          layout: ChunkLayout) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each view's `[slots, heads, rows, row_bytes]` rows and `[slots, heads]` float32 scales in `buf` (uint8, at least
    `layout.nbytes`), where `layout` places them."""
    out = []
    for (heads, rows, *_), rb, (at_q, at_s) in zip(shapes, row_bytes, layout.offsets, strict=True):
        n = layout.slots
        q = buf[at_q:at_q + n * heads * rows * rb].view(n, heads, rows, rb)
        s = buf[at_s:at_s + n * heads * 4].view(torch.float32).view(n, heads) if at_s is not None else None
        out.append((q, s))
    return out


class HostSlots:
    """Slot rows per view, `[slots, heads, rows, content]` bytes (+ `[slots, heads]` float32 scales), in chunks
    allocated on first write."""

    def __init__(self, views: Sequence[LayerView], quantize: bool, pin: bool, slot_bytes: int,
                 chunk_bytes: int = CHUNK_BYTES, crc: SlotCrc | None = None) -> None:
        self.crc_fn = crc if crc is not None else slot_crc()  # never changes: what sealed a slot checks it
        self.shapes = [tuple(v.cache.shape[1:]) for v in views]
        self.row_bytes = [v.cache.shape[3] * (1 if quantize else v.cache.element_size()) for v in views]
        self.quantize, self.pin = quantize, pin
        self.view_bytes = view_slot_bytes(self.shapes, self.row_bytes, quantize)  # per slot
        self.layout = chunk_layout(self.shapes, self.row_bytes, quantize, max(1, chunk_bytes // max(slot_bytes, 1)),
                                   whole_power_of_two=pin)
        self.per_chunk = self.layout.slots
        self.chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.bases: dict[int, np.ndarray] = {}  # chunk -> its segments' addresses for slot 0 (scales, rows per view)
        # a slot's segments, view by view (scales, then rows): each as long as one slot's share, so also the stride
        self.seg_bytes = np.array([n for (h, r, *_), rb in zip(self.shapes, self.row_bytes, strict=True)
                                   for n in ((4 * h,) if quantize else ()) + (h * r * rb,)], dtype=np.int64)
        self.allocated_bytes = 0
        self._alloc = threading.Lock()  # the levels' fetch thread fills slots too: a chunk is allocated once

    def _chunk(self, c: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        chunk = self.chunks.get(c)
        if chunk is not None:
            return chunk
        with self._alloc:
            chunk = self.chunks.get(c)
            if chunk is not None:
                return chunk
            layout = self.layout
            # A normal tensor even when a demotion (the forward pass's inference mode) takes the chunk: the levels'
            # fetch thread, outside inference mode, fills its slots too (found by the soak: every disk fill failed)
            with normal_tensors():
                buf = host_empty((layout.nbytes,), torch.uint8, self.pin)  # one allocation: see `chunk_layout`
                chunk = carve(buf, self.shapes, self.row_bytes, layout)
            self.allocated_bytes += layout.nbytes
            self.bases[c] = np.array([t.data_ptr() for q, s in chunk for t in ((s,) if s is not None else ()) + (q,)],
                                     dtype=np.uint64)
            self.chunks[c] = chunk
        return chunk

    def _by_chunk(self, slots: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        out: dict[int, tuple[list[int], list[int]]] = {}
        for i, s in enumerate(slots):
            pos, local = out.setdefault(s // self.per_chunk, ([], []))
            pos.append(i)
            local.append(s % self.per_chunk)
        return out

    def write(self, v: int, slots: Sequence[int], q: torch.Tensor, s: torch.Tensor | None) -> None:
        self._copy(v, slots, q, s, into_slots=True)

    def read(self, v: int, slots: Sequence[int], q: torch.Tensor, s: torch.Tensor | None) -> None:
        self._copy(v, slots, q, s, into_slots=False)

    def _copy(self, v: int, slots: Sequence[int], q: torch.Tensor, s: torch.Tensor | None, into_slots: bool) -> None:
        """Rows `q` (and scales `s`) of view `v`, row i for `slots[i]`: into the slots, or out of them."""
        for c, (pos, local) in self._by_chunk(slots).items():
            cq, cs = self._chunk(c)[v]
            p, loc = torch.tensor(pos), torch.tensor(local)
            for held, given in ((cq, q), (cs, s)):
                if held is None or given is None:
                    continue
                if into_slots:
                    held.index_copy_(0, loc, given.index_select(0, p))
                else:
                    given.index_copy_(0, p, held.index_select(0, loc))

    def payload(self, slot: int) -> bytes:
        """The slot's bytes, view by view (scales, then pages): what the disk and shared levels keep."""
        parts: list[bytes] = []
        for cq, cs in self._chunk(slot // self.per_chunk):
            local = slot % self.per_chunk
            if cs is not None:
                parts.append(cs[local].numpy().tobytes())
            parts.append(cq[local].numpy().tobytes())
        return b"".join(parts)

    def put_payload(self, slot: int, payload: bytes) -> None:
        """Write `payload` (as `payload` returns it; its length already checked) into the slot."""
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        at = 0
        for cq, cs in self._chunk(slot // self.per_chunk):
            local = slot % self.per_chunk
            if cs is not None:
                n = cs[local].numel() * 4
                cs[local].view(torch.uint8).view(-1).copy_(data[at:at + n])
                at += n
            n = cq[local].numel()
            cq[local].view(-1).copy_(data[at:at + n])
            at += n

    def checksum(self, slot: int) -> int:
        """The slot's CRC (`self.crc_fn`) over its bytes, view by view (scales, then pages)."""
        return self.checksums([slot])[0]

    def checksums(self, slots: Sequence[int]) -> list[int]:
        """`checksum` of each of `slots`, in one call to the checksum (the per-slot Python work is a few array ops)."""
        if not slots:
            return []
        at = np.asarray(slots, dtype=np.int64)
        chunk, local = at // self.per_chunk, at % self.per_chunk
        for c in set(chunk.tolist()):
            self._chunk(c)
        bases = np.stack([self.bases[c] for c in chunk.tolist()])
        addrs = bases + (local[:, None] * self.seg_bytes[None, :]).astype(np.uint64)
        return self.crc_fn.fn(addrs, np.broadcast_to(self.seg_bytes, addrs.shape))
