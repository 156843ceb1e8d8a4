"""The FP8 tier's bytes, on the worker: slots of quantized KV blocks in host memory, filled and read with kvsched.ops.

One slot holds one KV block of every attention layer: float8_e4m3fn pages plus one float32 scale per (block, head)
(`kvsched.ops.gather_quantize_blocks`); when the KV cache itself is already FP8, the bytes are copied as they are (no
second quantization, no scales). Each slot carries a CRC32 of its bytes, written at store time and checked before a
load: a slot that does not verify is reported, and vLLM recomputes those tokens instead of reading wrong KV.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.ops.fp8 import FP8, KV_DTYPES, dequantize_kv_fp8, gather_quantize_blocks, scatter_dequantize_blocks

RAW_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)  # an fp8 KV cache (vLLM CPU keeps it as uint8)


class TierLayoutError(ValueError):
    """The KV cache tensors are not in a layout the tier can copy (the message names the layer and its shape)."""


@dataclass(frozen=True, slots=True)
class LayerView:
    name: str
    cache: torch.Tensor  # [num_blocks, kv_heads, block_size, 2 * head_size], last dim contiguous


def block_views(kv_caches: dict[str, torch.Tensor], num_blocks: int) -> list[LayerView]:
    """Each layer's cache as the 4-D view the ops take. vLLM's attention backends document one logical shape,
    `[num_blocks, num_kv_heads, block_size, 2 * head_size]`; anything else is refused with its shape."""
    views = []
    seen: set[int] = set()
    for name, t in kv_caches.items():
        if t.data_ptr() in seen:  # layers sharing one cache (KV sharing) are copied once
            continue
        seen.add(t.data_ptr())
        if t.dim() != 4 or t.shape[0] != num_blocks or (t.stride(3) != 1 and t.shape[3] > 1):
            raise TierLayoutError(f"layer {name}: KV cache of shape {tuple(t.shape)} (strides {t.stride()}) is not "
                                  f"[{num_blocks} blocks, kv_heads, block_size, 2*head_size] with a contiguous last dim")
        if t.dtype not in KV_DTYPES + RAW_DTYPES:
            raise TierLayoutError(f"layer {name}: KV cache dtype {t.dtype} is not supported by the FP8 tier")
        views.append(LayerView(name, t))
    if not views:
        raise TierLayoutError("no KV cache tensors to tier")
    if len({v.cache.dtype for v in views}) != 1 or len({tuple(v.cache.shape[1:]) for v in views}) != 1:
        raise TierLayoutError("the FP8 tier needs every layer's KV cache to have one dtype and page shape")
    return views


def block_bytes(views: Sequence[LayerView]) -> int:
    """Tier bytes per KV block, all layers: one byte per element, plus a float32 scale per head when quantizing."""
    _, heads, n, c = views[0].cache.shape
    raw = views[0].cache.dtype in RAW_DTYPES
    return len(views) * heads * (n * c + (0 if raw else 4))


class TierStore:
    """`num_slots` slots for the layers in `views` (the tier's host memory, allocated lazily by the OS)."""

    def __init__(self, views: Sequence[LayerView], num_slots: int, measure_error: bool = True) -> None:
        self.views = list(views)
        self.num_slots = num_slots
        _, heads, n, c = self.views[0].cache.shape
        self.raw = self.views[0].cache.dtype in RAW_DTYPES
        self.q = [torch.empty((num_slots, heads, n, c), dtype=torch.uint8) for _ in self.views]
        self.scales = [torch.empty((num_slots, heads), dtype=torch.float32) for _ in self.views] if not self.raw \
            else []
        self.crc = torch.zeros(num_slots, dtype=torch.int64)
        self.measure_error = measure_error and not self.raw
        self.counters: Counter[str] = Counter()
        self.err_sq = 0.0  # sum over sampled blocks of |x - x'|^2 and |x|^2 (relative RMS = sqrt(err_sq / ref_sq))
        self.ref_sq = 0.0

    # ---- store (demotion) ---------------------------------------------------------------------------------------
    def store(self, block_ids: Sequence[int], slots: Sequence[int], tokens: Sequence[int] | None = None) -> None:
        """Copy blocks into slots. `tokens[i]` > 0: block i is a session's partial last block, whose positions past
        `tokens[i]` hold whatever the block held before (never-written memory included). Where those positions sit in
        the block's bytes is the attention backend's business (vLLM's CPU backend keeps all K rows, then all V rows,
        in its own tiling), so the block is stored whole; only non-finite values are zeroed, in a gathered copy,
        so garbage cannot poison the scale of the (block, head) the real tokens share. A restore writes the stale
        positions back, where the next prefill overwrites them or attention never reads them."""
        if not block_ids:
            return
        ids = torch.tensor(block_ids, dtype=torch.int64)
        dst = torch.tensor(slots, dtype=torch.int64)
        partial = not self.raw and any(t > 0 for t in tokens or ())
        crcs = [0] * len(slots)
        for li, view in enumerate(self.views):
            cache, sel = view.cache, ids
            if partial:
                cache, sel = torch.nan_to_num(view.cache.index_select(0, ids), 0.0, 0.0, 0.0), \
                    torch.arange(len(block_ids))
            if self.raw:
                rows = cache.index_select(0, sel).view(torch.uint8)
            else:
                q, s = gather_quantize_blocks(cache, sel)
                rows = q.view(torch.uint8)
                self.scales[li].index_copy_(0, dst, s)
                if self.measure_error:
                    self._sample_error(cache[int(sel[0])], q[0:1], s[0:1])
                crcs = [zlib.crc32(s[i].numpy().tobytes(), c) for i, c in enumerate(crcs)]
            self.q[li].index_copy_(0, dst, rows)
            crcs = [zlib.crc32(rows[i].numpy().data, c) for i, c in enumerate(crcs)]
        self.crc.index_copy_(0, dst, torch.tensor(crcs, dtype=torch.int64))
        self.counters["stored_blocks"] += len(block_ids)

    # ---- load (restore) -----------------------------------------------------------------------------------------
    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> list[int]:
        """Restore `slots` into `block_ids`; returns the block ids whose slot failed its checksum (not written)."""
        if not slots:
            return []
        bad = [i for i, s in enumerate(slots) if self.checksum(s) != int(self.crc[s])]
        bad_set = set(bad)
        good = [i for i in range(len(slots)) if i not in bad_set]
        if good:
            src = torch.tensor([slots[i] for i in good], dtype=torch.int64)
            ids = torch.tensor([block_ids[i] for i in good], dtype=torch.int64)
            for li, view in enumerate(self.views):
                rows = self.q[li].index_select(0, src)
                if self.raw:
                    view.cache.index_copy_(0, ids, rows.view(view.cache.dtype))
                else:
                    scatter_dequantize_blocks(rows.view(FP8), self.scales[li].index_select(0, src).contiguous(),
                                                  view.cache, ids)
        self.counters["loaded_blocks"] += len(good)
        self.counters["checksum_failures"] += len(bad)
        return [block_ids[i] for i in bad]

    def invalidate(self, slots: Sequence[int]) -> None:
        """Make `slots` fail their checksum (a store that did not complete must never be read)."""
        for slot in slots:
            self.crc[slot] = -1  # a CRC32 is never negative

    def checksum(self, slot: int) -> int:
        """CRC32 of the slot's bytes, layer by layer (scales, then pages), as `store` computed it."""
        crc = 0
        for li, q in enumerate(self.q):
            if not self.raw:
                crc = zlib.crc32(self.scales[li][slot].numpy().tobytes(), crc)
            crc = zlib.crc32(q[slot].numpy().data, crc)
        return crc

    @property
    def relative_rms_error(self) -> float | None:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else None

    def _sample_error(self, page: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
        x = page.float()
        x_hat = dequantize_kv_fp8(q, s, torch.float32)[0]
        self.err_sq += float((x - x_hat).pow(2).sum())
        self.ref_sq += float(x.pow(2).sum())
