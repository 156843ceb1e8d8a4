"""How the FP8 tier's copies cut their blocks to fit the staging buffers (tier_link.StagePool): pure arithmetic on the
slots' layout, the same on the scheduler (the budget) and the worker (the copies), testable without a GPU.

A copy group is `blocks` blocks, moved as one piece per span of views (layers, or kernel blocks of a layer): when a
whole slot fits a buffer there is one span (every view) and as many blocks as fit; a slot larger than a buffer goes a
block at a time in several spans, each fitting a buffer. The buffers never grow past what the setting made and the
scheduler took off the tier's budget (found by the gpustage stop: a slot above a buffer rounded the buffers up to
its power of two, on the worker past the bytes counted). Only one view's block larger than a buffer is refused
(TierConfigError naming KVSCHED_TIER_STAGE_MB / stage_mb and the least value that holds it), where buffers are pinned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Context, Decimal

from kvsched.adapters.vllm.tier_slots import ALIGN, chunk_layout, view_slot_bytes
from kvsched.core.tier_config import TierConfigError

STAGE_SETTING = "KVSCHED_TIER_STAGE_MB (or stage_mb in --kv-transfer-config's extra config)"


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """A copy group's `blocks` blocks, in one piece per `spans` [lo, hi) range of views; `piece_bytes`: the most host
    bytes one piece stages (at most a buffer when `fits`)."""

    blocks: int
    spans: tuple[tuple[int, int], ...]
    piece_bytes: int
    fits: bool

    @property
    def whole(self) -> bool:
        """One piece a group: every view of each block together."""
        return len(self.spans) == 1


def copy_plan(shapes: Sequence[tuple[int, ...]], row_bytes: Sequence[int], quantize: bool, buffer_bytes: int,
              device_bytes: int) -> CopyPlan:
    """The groups for views of `shapes` / `row_bytes` through host buffers of `buffer_bytes`, a group's device buffers
    bounded by `device_bytes` (at least one view of one block). `fits` is False when one view's block alone exceeds a
    buffer (it then goes as its own piece: only where the buffers are not allocated, the CPU, may it run)."""

    def staged(lo: int, hi: int, blocks: int) -> int:
        return chunk_layout(shapes[lo:hi], row_bytes[lo:hi], quantize, blocks).nbytes

    n = len(shapes)
    per_view = view_slot_bytes(shapes, row_bytes, quantize)
    limit = min(buffer_bytes, device_bytes)
    if staged(0, n, 1) <= buffer_bytes and sum(per_view) <= max(device_bytes, 1):
        k = max(1, limit // max(sum(per_view), 1))
        while k > 1 and staged(0, n, k) > buffer_bytes:
            k -= 1
        return CopyPlan(k, ((0, n),), staged(0, n, k), True)
    spans: list[tuple[int, int]] = []
    lo, dev = 0, 0
    for v in range(n):  # greedy: a span grows while it fits a buffer and the device bound
        if v > lo and (staged(lo, v + 1, 1) > buffer_bytes or dev + per_view[v] > device_bytes):
            spans.append((lo, v))
            lo, dev = v, 0
        dev += per_view[v]
    spans.append((lo, n))
    most = max(staged(a, b, 1) for a, b in spans)
    return CopyPlan(1, tuple(spans), most, most <= buffer_bytes)


def view_bound(layer_bytes: int) -> int:
    """One view's block staged alone, at most: its bytes and the alignment of its scales."""
    return layer_bytes + ALIGN


def refuse_unless_fits(plan_fits: bool, buffer_bytes: int, view_bytes: int, buffers: int) -> None:
    """TierConfigError when a staging buffer cannot hold one view's block: named by the setting, with the least
    setting (in MiB) that holds it, rounded UP to 6 significant figures (found by review: rounded to nearest, a small
    block's 0.001953125 MiB read 0.00195312, itself refused)."""
    if plan_fits:
        return
    need = 1 << max(view_bytes - 1, 0).bit_length()  # buffers are powers of two
    mib = Context(prec=6, rounding=ROUND_CEILING).divide(Decimal(need * buffers), Decimal(2**20))
    raise TierConfigError(
        f"{STAGE_SETTING} gives staging buffers of {buffer_bytes} bytes, below one layer's KV block of this model "
        f"({view_bytes} bytes staged); give at least {mib.normalize():f} MiB")
