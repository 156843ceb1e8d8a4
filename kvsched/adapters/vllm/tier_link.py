"""How the FP8 tier's copies between the KV cache and host memory are ordered against the engine's own work.

On a GPU the cache lives in device memory: the tier quantizes and dequantizes on the device (the Triton kernels) and
moves FP8 bytes to and from pinned host memory with non-blocking copies on a dedicated CUDA stream, so the copies
overlap the forward pass. Two orderings keep them correct, the same ones vLLM's OffloadingConnector keeps:
- a store reads blocks the previous steps wrote on the compute stream, so the side stream waits for the compute stream
  first; the step that follows may write into the very blocks being stored (vLLM already handed them out again), so
  the compute stream waits for the store's event before it runs: a block is reused only after its copy completed;
- a restore writes blocks the forward pass reads, so the compute stream waits for the restore's event of each layer
  before that layer's attention (`wait_for_layer_load`), and for every restore before the forward when it must.
The host bytes of a store are sealed (copied into their slot, CRC computed) once the event says the copy completed.

On the CPU the cache is host memory: `SyncLink` runs every copy on the calling thread, so each "event" has completed
by the time it exists, and the same store code runs with the waits as no-ops.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Done:
    """An event that has already happened (synchronous copies)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class SyncLink:
    """The KV cache is in host memory (vLLM's CPU backend): copies are synchronous, host buffers need no pinning."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = False

    def side(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def after_compute(self) -> None:
        return None

    def record(self) -> Event:
        return Done()

    def fence_compute(self, event: Event) -> None:
        return None


class CudaLink:
    """The KV cache is on a CUDA device: a dedicated stream, events, pinned host memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = True
        self.stream = torch.cuda.Stream(device=device)

    def side(self) -> AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream)

    def after_compute(self) -> None:
        """The side stream's next work starts after everything the compute stream has enqueued so far."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def fence_compute(self, event: Event) -> None:
        """The compute stream's next work starts after `event` (a GPU-side wait: the host does not block)."""
        torch.cuda.current_stream(self.device).wait_event(event)  # type: ignore[arg-type]


def link_for(device: torch.device) -> SyncLink | CudaLink:
    if device.type == "cuda":
        return CudaLink(device)
    if device.type == "cpu":
        return SyncLink(device)
    raise ValueError(f"the FP8 tier runs on CPU and CUDA KV caches, not {device.type}")


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host buffer; pinned (page-locked) when it is the end of an asynchronous device copy."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)
