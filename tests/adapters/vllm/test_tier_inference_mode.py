"""The FP8 tier's host buffers against torch's inference mode. vLLM 0.32 runs every worker-side connector hook inside
`torch.inference_mode()` (GPUModelRunner.execute_model / sample_tokens, which the CPU model runner inherits; only
register_kv_caches and shutdown run outside it), and the mode is per thread: the tier's writer and fetch threads run
outside it. A tensor first allocated in the step is an inference tensor, and an in-place write to one outside the
mode raises ("Inplace update to inference tensor outside InferenceMode"). Found by the soak with the disk level on: a
host slot chunk first taken by a demotion could not be filled by the fetch thread, so the disk level never served a
block (tier_slots). Here the whole path runs as the engine runs it: the steps in inference mode, the real worker's
writer and fetch threads outside it, the staging buffers allocated (as on a GPU, unpinned here)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_fetches import FetchBook
from kvsched.adapters.vllm.tier_levels import DISK
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.adapters.vllm.tier_link import StagePool, stage_plan
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of
from tests.adapters.vllm.test_tier_levels_disk_order import BLOCK, CHAIN, IDENT, host, levels
from tests.adapters.vllm.test_tier_levels_disk_reads import BOUND_S, Engine
from tests.plain_thread import raised_on_a_thread


class StagedEngine(Engine):
    """tests/adapters/vllm/test_tier_levels_disk_reads.Engine with the staging buffers a GPU worker has (one
    allocation, taken at the first copy: here in a step, so in inference mode)."""

    def __init__(self, tmp_path: Path) -> None:  # noqa: D107 - Engine's, with a StagePool
        self.lv = levels(tmp_path, 3)
        self.host = host(6)
        self.host.on_evict = self.lv.on_host_evict
        self.book = FetchBook(self.host, 1, BLOCK)
        self.lv.on_fetch = self.book.started
        store = TierStore(views_of(caches(seed=7)), "quantize",
                          stage=StagePool(stage_plan(1 << 20), pin=False, allocate=True))
        self.worker = TierLevelsWorker(LevelsConfig(disk_dir=str(tmp_path / "disk")), IDENT, {"model": "t"}, 0, 1,
                                       store)
        self.conn = SimpleNamespace(fetches=self.book, levels=self.lv, stats=Counter(), disabled_reason="")
        assert self.worker.files is not None and self.lv.disk is not None
        self.files, self.disk = self.worker.files, self.lv.disk

    def step(self):  # noqa: ANN201 - Engine's
        with torch.inference_mode():  # as vLLM's execute_model runs handle_preemptions
            return super().step()


def test_blocks_written_and_read_back_by_the_levels_threads_around_inference_mode_steps(tmp_path: Path) -> None:
    """A turn's blocks published to disk through the staging buffers in an inference-mode step (the writer thread
    copies them out), a demotion in such a step taking the host chunk first, then a restore from disk: the fetch
    thread fills a slot of that chunk, and the slot serves the bytes the disk holds."""
    e = StagedEngine(tmp_path)
    tier = e.worker.tier
    e.turn("a", CHAIN[:3])
    assert e.worker.writer.counters["failed_jobs"] == 0 and e.worker.counters["disk_written_blocks"] == 3
    assert tier.stage.arena is not None  # taken by the publish's snapshot, in the step
    with torch.inference_mode():  # a demotion (the worker's save path) takes the host chunk first
        tier.store([5], [5])
        tier.seal_ready()
    assert tier.slots.chunks and tier.slot_payload(5) is not None
    assert e.lv.promote("a", CHAIN, 2, 6, e.host) == 1
    (fetch,) = e.step().fetches
    assert fetch.source == DISK
    assert e.worker.fetcher.flush(BOUND_S)
    e.report()
    assert e.worker.fetches.counters["failed_fetch_jobs"] == 0 and e.worker.fetcher.counters["failed_jobs"] == 0
    assert e.lv.counters["disk_restored_blocks"] == 1 and e.lv.counters["disk_read_failures"] == 0, e.lv.counters
    assert tier.counters["filled_slots"] == 1 and tier.slot_payload(fetch.slot) is not None


def test_every_host_buffer_that_outlives_the_step_taking_it_is_writable_from_another_thread() -> None:
    """The buffers that outlive a step (the slot chunks and every view of them, the staging arena) are normal tensors
    whoever takes them first (tier_link.normal_tensors): the levels' threads may write them. A dtype view made in
    inference mode is an inference tensor whatever its base, hence the chunks' float32 scales carved in the context
    too. No thread but the engine's writes the staging arena today (the writer thread only reads a snapshot's):
    hardening, so that the next buffer a thread fills cannot fail as the slots did."""
    with torch.inference_mode():
        kv = caches(seed=3)
        store = TierStore(views_of(kv), "quantize", stage=StagePool(stage_plan(1 << 20), pin=False, allocate=True))
        store.store([1, 2], [0, 1])
        store.load([0], [4])
    buffers = [store.stage.arena, *(t for chunk in store.slots.chunks.values() for q, s in chunk
                                     for t in (q, s) if t is not None)]

    def write() -> None:  # outside inference mode, as the levels' threads run
        for b in buffers:
            assert b is not None
            b.view(-1)[:1].zero_()

    errors = raised_on_a_thread(write)
    assert not errors, errors
