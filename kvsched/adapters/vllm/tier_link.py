"""How the FP8 tier's copies between the KV cache and host memory are ordered against the engine's own work.

On a GPU the cache lives in device memory: the tier quantizes and dequantizes on the device (the Triton kernels) and
moves FP8 bytes to and from pinned host memory with non-blocking copies on a dedicated CUDA stream, so the copies
overlap the forward pass. Two orderings keep them correct, the same ones vLLM's OffloadingConnector keeps:
- every copy on the side stream starts after the work the compute stream holds when it is enqueued (`side()`): a store
  reads blocks the previous steps wrote, and a restore writes blocks a step still in flight may be writing (vLLM's async
  scheduler plans step N+1 while step N runs: a block freed by a preemption is handed out again at once); the step that
  follows a store may write into the very blocks being stored (vLLM already handed them out again), so
  the compute stream waits for the store's event before it runs: a block is reused only after its copy completed;
- a restore writes blocks the forward pass reads, so the compute stream waits for every restore's event before the
  forward (`TierStore.fence_all` at the end of `start_load_kv`): a GPU-side wait, the host does not block. Not per layer
  (`wait_for_layer_load`): vLLM skips those calls while it replays a FULL CUDA graph (its default
  FULL_AND_PIECEWISE mode runs uniform decode batches as FULL graphs, and a restored request with one token left joins
  one), which would let attention read a block whose copy is still in flight (found by review).
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
        """Work enqueued in this context runs on the side stream, after everything the compute stream has enqueued so
        far. The compute stream is read before switching: inside the context the current stream is the side stream
        itself, and a wait there was a wait on itself (found by review: stores and restores did not wait at all)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

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
