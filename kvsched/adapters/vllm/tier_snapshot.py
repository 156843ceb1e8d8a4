"""Blocks copied out of the KV cache for the FP8 tier's disk and shared levels (TierStore.snapshot), read on the
levels' writer thread.

On a GPU each piece of a snapshot lands in one of the tier's counted staging buffers (the store buffers,
tier_link.StagePool) and is copied out to pageable host memory once its device-to-host copy completed: by the engine
thread (`TierStore.seal_ready`, each step, or when a store needs the buffer) or by the writer thread, whichever comes
first; the buffer is free again after that. So a snapshot pins nothing outside the tier's budget (found by the
gpustage stop: each group took pinned tensors of its own, held until the writer serialized them, not counted). Its
pageable copies are bounded by the writer's queue (tier_writer.BackgroundWriter counts the payload bytes). On the CPU
the kernels' outputs are the copies: nothing to copy out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from kvsched.adapters.vllm.tier_link import Event, host_empty

Staged = list[tuple[torch.Tensor, torch.Tensor | None]]  # per view: rows (+ float32 scales)


@dataclass(eq=False)
class SnapPiece:
    """One group's blocks of the views `views` [lo, hi): `staged` in a staging buffer until `copy_out` (`in_buffer`),
    then in pageable memory of their own."""

    event: Event
    staged: Staged
    views: tuple[int, int]
    in_buffer: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    def copy_out(self) -> None:
        """Once the copy completed (waited for here): the staged bytes into pageable tensors, freeing the buffer.
        Either thread may call it; the first does the copy."""
        with self.lock:
            if not self.in_buffer:
                return
            self.event.synchronize()
            self.staged = [(_pageable(q), _pageable(s) if s is not None else None) for q, s in self.staged]
            self.in_buffer = False


def _pageable(t: torch.Tensor) -> torch.Tensor:
    out = host_empty(tuple(t.shape), t.dtype, pin=False)
    out.copy_(t)
    return out


@dataclass(eq=False)
class Snapshot:
    """Blocks copied out of the KV cache for a lower level: payload(i) once its pieces' copies completed, on any
    thread. `pieces` run group by group, each group's in view order; `per_group` blocks a group."""

    pieces: list[SnapPiece]
    per_group: int
    spans: int  # pieces a group

    def payload(self, i: int) -> bytes:
        """Block i's bytes, view by view (scales, then pages), as `HostSlots.payload` lays a slot out."""
        parts: list[bytes] = []
        g, i = divmod(i, self.per_group)
        for piece in self.pieces[g * self.spans:(g + 1) * self.spans]:
            piece.copy_out()
            for q, s in piece.staged:
                if s is not None:
                    parts.append(s[i].contiguous().numpy().tobytes())
                parts.append(q[i].contiguous().numpy().tobytes())
        return b"".join(parts)
