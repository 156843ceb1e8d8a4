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

Staging (`StagePlan`, `StagePool`): a store or restore moves its blocks in groups, each through one of STAGE_BUFFERS
host buffers (two for stores, two for restores: one fills while the other's copy runs) and at most one group's device
buffers. The host buffers are one pinned allocation of `StagePlan.host_bytes`, made at the first copy and counted in
the tier's host budget (the scheduler takes it off the slots' share: what the process pins is the budget); a group
whose buffer is still in flight waits for it (the engine thread blocks on that copy only in a store, restore or
snapshot larger than two buffers). A slot larger than a buffer goes in pieces of its views (tier_pieces); the disk and
shared levels' snapshots go through the store buffers too and are copied out to pageable memory once their copy
completed, so nothing else is pinned for them. The device buffers come after vLLM's memory profile
(register_kv_caches runs once the KV cache is allocated, gpu_model_runner.initialize_kv_cache), so they are bounded by
`device_stage_bytes`: the setting, or min(a buffer, 1/32 of the device's free memory at registration). On the CPU
nothing is pinned and the kernels' outputs are the staging, taken in the same groups.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

DEFAULT_STAGE_BYTES = 128 << 20  # host staging per worker (KVSCHED_TIER_STAGE_MB), counted in the tier's budget
STAGE_BUFFERS = 4  # two for stores, two for restores
STORE_BUFFERS, LOAD_BUFFERS = (0, 1), (2, 3)
DEVICE_FREE_SHARE = 32  # default device staging: at most this fraction of the free device memory at registration


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
    """A host buffer; pinned (page-locked) when it is the end of an asynchronous device copy. Taken in vLLM's forward
    pass (its `torch.inference_mode()`), it is an inference tensor, which nothing outside that mode may write in place
    (the levels' writer and fetch threads run outside it: the mode is per thread). A buffer that lives on and that
    another thread may write is taken with `normal_tensors()` (the slot chunks, the staging arena); a per-copy one is
    left plain: the context costs ~1.5 us a call (Xeon model 167), and such buffers are written in the step only."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def normal_tensors() -> AbstractContextManager[Any]:
    """Tensors made in this context are normal ones even in vLLM's forward pass (found by the soak: host slot chunks
    first taken by a demotion could not be filled from disk). Views too: a view with another dtype made in inference
    mode (`.view(torch.float32)`) is an inference tensor even of a normal buffer, so carve inside the context."""
    return torch.inference_mode(False)


def _pow2_floor(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


@dataclass(frozen=True, slots=True)
class StagePlan:
    """Host staging: STAGE_BUFFERS buffers of `buffer_bytes` (a power of two, so the one pinned allocation of
    `host_bytes` is what torch's power-of-two pinned allocator takes). A slot larger than a buffer is copied in
    pieces (tier_pieces), never by growing the buffers past the setting the budget counted."""

    buffer_bytes: int

    @property
    def host_bytes(self) -> int:
        return self.buffer_bytes * STAGE_BUFFERS


def stage_plan(stage_bytes: int) -> StagePlan:
    """`stage_bytes` of host staging (the setting) in STAGE_BUFFERS buffers, each a quarter rounded down to a power of
    two: `host_bytes` is never above the setting (but for a setting below STAGE_BUFFERS bytes, refused where pinned)."""
    return StagePlan(_pow2_floor(max(stage_bytes // STAGE_BUFFERS, 1)))


def device_stage_bytes(device: torch.device, plan: StagePlan, setting: int | None) -> tuple[int, str]:
    """The device bytes one copy group may stage, and how that figure was chosen (for the start-up log): the setting
    when given; on CUDA min(a buffer, 1/DEVICE_FREE_SHARE of the free memory now); a buffer elsewhere."""
    if setting is not None:
        return min(setting, plan.buffer_bytes), "KVSCHED_TIER_STAGE_MB"
    if device.type != "cuda":
        return plan.buffer_bytes, "a host buffer"
    free, total = torch.cuda.mem_get_info(device)
    return (min(plan.buffer_bytes, max(free // DEVICE_FREE_SHARE, 1)),
            f"min(a host buffer, 1/{DEVICE_FREE_SHARE} of the {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB)")


class StagePool:
    """The host staging buffers of `plan`: one allocation (pinned when `pin`), made at the first use; None on the CPU
    (`allocate` False), where the kernels' outputs are the staging. `device_bytes` bounds one group's device buffers."""

    def __init__(self, plan: StagePlan, pin: bool, allocate: bool, device_bytes: int | None = None) -> None:
        self.plan, self.pin, self.allocate = plan, pin, allocate
        self.device_bytes = plan.buffer_bytes if device_bytes is None else device_bytes
        self.arena: torch.Tensor | None = None

    @property
    def allocated_bytes(self) -> int:
        return 0 if self.arena is None else int(self.arena.numel())

    def buffer(self, i: int) -> torch.Tensor | None:
        if not self.allocate:
            return None
        if self.arena is None:  # a normal tensor: it outlives the step that takes it first
            with normal_tensors():
                self.arena = host_empty((self.plan.host_bytes,), torch.uint8, self.pin)
        n = self.plan.buffer_bytes
        return self.arena[i * n:(i + 1) * n]
