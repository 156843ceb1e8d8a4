"""The FP8 tier's host memory: slots of KV blocks (every attention layer's page, and its scales when quantized), taken
in chunks when a slot in them is first written, so a large tier costs nothing at start-up.

A chunk is one host allocation sliced into each layer's rows and scales (`chunk_layout`). For a CUDA cache it is
pinned, and torch's pinned-memory allocator rounds every request up to a power of two
(`CachingHostAllocator`): one pinned tensor per layer, as before, took up to ~1.75x the bytes counted (found by review:
Qwen2.5-7B's pages), and pinned memory cannot be swapped out. So a pinned chunk asks for a power of two and holds as
many slots as fit in it: what is allocated is what is counted (`HostSlots.allocated_bytes`).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.adapters.vllm.tier_layout import LayerView
from kvsched.adapters.vllm.tier_link import host_empty

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


class HostSlots:
    """Slot rows per view, `[slots, heads, rows, content]` bytes (+ `[slots, heads]` float32 scales), in chunks
    allocated on first write."""

    def __init__(self, views: Sequence[LayerView], quantize: bool, pin: bool, slot_bytes: int,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.shapes = [tuple(v.cache.shape[1:]) for v in views]
        self.row_bytes = [v.cache.shape[3] * (1 if quantize else v.cache.element_size()) for v in views]
        self.quantize, self.pin = quantize, pin
        self.view_bytes = view_slot_bytes(self.shapes, self.row_bytes, quantize)  # per slot
        self.layout = chunk_layout(self.shapes, self.row_bytes, quantize, max(1, chunk_bytes // max(slot_bytes, 1)),
                                   whole_power_of_two=pin)
        self.per_chunk = self.layout.slots
        self.chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
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
            buf = host_empty((layout.nbytes,), torch.uint8, self.pin)  # one allocation: see `chunk_layout`
            chunk = []
            for (heads, rows, _content), row_bytes, (at_q, at_s) in zip(self.shapes, self.row_bytes, layout.offsets,
                                                                        strict=True):
                n = layout.slots
                q = buf[at_q:at_q + n * heads * rows * row_bytes].view(n, heads, rows, row_bytes)
                s = buf[at_s:at_s + n * heads * 4].view(torch.float32).view(n, heads) if at_s is not None else None
                chunk.append((q, s))
            self.allocated_bytes += layout.nbytes
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
        """CRC32 of the slot's bytes, view by view (scales, then pages)."""
        crc = 0
        for cq, cs in self._chunk(slot // self.per_chunk):
            local = slot % self.per_chunk
            if cs is not None:
                crc = zlib.crc32(cs[local].numpy().tobytes(), crc)
            crc = zlib.crc32(cq[local].numpy().data, crc)
        return crc
