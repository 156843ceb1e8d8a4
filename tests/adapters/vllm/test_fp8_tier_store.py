"""The FP8 tier's worker-side bytes on real KV-shaped tensors: round trip, checksums, FP8 caches stored as they are,
host memory taken in chunks, and copies that complete later (a GPU's side stream) sealed only once they have."""

from __future__ import annotations

import torch

from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_layout import QUANTIZE, RAW, LayerView, view_bytes
from kvsched.adapters.vllm.tier_link import SyncLink

BLOCKS, HEADS, N, C = 12, 2, 32, 128


def caches(dtype=torch.bfloat16, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.randn(BLOCKS, HEADS, N, C, generator=g, dtype=torch.float32)
        out[f"layer.{i}"] = t.to(dtype) if dtype.is_floating_point and dtype.itemsize > 1 else \
            (t * 20).clamp(-100, 100).to(torch.int8).view(torch.uint8)
    return out


def views_of(kv):
    return [LayerView(name, t) for name, t in kv.items()]


def tier(kv, mode=QUANTIZE, **kw):
    return TierStore(views_of(kv), mode, **kw)


def test_store_then_load_restores_every_layer_within_the_e4m3_bound():
    kv = caches()
    store = tier(kv)
    original = {k: v.clone() for k, v in kv.items()}
    store.store([3, 7, 1], [4, 0, 2])
    for v in kv.values():
        v.zero_()  # the blocks are reused by other requests
    assert store.load([0, 4], [9, 10]) == []
    for name, v in kv.items():
        for src, dst in ((7, 9), (3, 10)):
            x, y = original[name][src].float(), v[dst].float()
            rel = float((x - y).norm() / x.norm())
            assert rel < 0.07, (name, rel)
            assert not torch.equal(v[dst], torch.zeros_like(v[dst]))
        assert torch.count_nonzero(v[:9]) == 0  # nothing else written
    assert store.relative_rms_error is not None and 0 < store.relative_rms_error < 0.07


def test_a_partial_last_block_is_stored_whole_and_garbage_cannot_poison_its_scale():
    """A session's last block holds KV in some positions and stale memory in the others; where they sit is the
    backend's layout, so the block is stored whole. Never-written memory may hold NaN or inf: zeroed in the copy, so
    the scale of the (block, head) stays set by real values and every finite element comes back within the bound."""
    kv = caches()
    for v in kv.values():
        v[5, :, 10, :3] = float("nan")
        v[5, :, 11, :3] = float("inf")
    original = {k: v.clone() for k, v in kv.items()}
    store = tier(kv)
    store.store([5, 6], [0, 1], [10, 0])
    assert all(torch.equal(v.view(torch.int16), original[k].view(torch.int16)) for k, v in kv.items())  # pool untouched
    for v in kv.values():
        v.fill_(3.0)
    assert store.load([0, 1], [2, 3]) == []
    for name, v in kv.items():
        x, y = original[name][5].float(), v[2].float()
        finite = torch.isfinite(x)
        assert torch.count_nonzero(~finite) == 2 * HEADS * 3 and torch.all(y[~finite] == 0), name
        assert torch.isfinite(y).all()
        assert float((x[finite] - y[finite]).norm() / x[finite].norm()) < 0.07, name
        full = original[name][6].float()
        assert float((full - v[3].float()).norm() / full.norm()) < 0.07  # a whole block in the same call is whole


def test_a_corrupt_slot_fails_its_checksum_and_is_not_written():
    kv = caches(layers=2)
    store = tier(kv)
    store.store([1, 2], [0, 1])
    store.slots.chunks[0][1][0][1, 0, 0, 0] ^= 0x5A  # one byte of layer 1, slot 1
    before = kv["layer.0"][5].clone()
    failed = store.load([0, 1], [4, 5])
    assert failed == [5]
    assert torch.equal(kv["layer.0"][5], before)  # the failed slot wrote nothing
    assert store.counters["checksum_failures"] == 1 and store.counters["loaded_blocks"] == 1


def test_an_invalidated_slot_is_never_read():
    kv = caches(layers=1)
    store = tier(kv)
    store.store([1], [0])
    store.invalidate([0])
    assert store.load([0], [3]) == [3]


def test_an_fp8_cache_is_copied_as_is_without_scales():
    kv = caches(dtype=torch.uint8)
    assert view_bytes(views_of(kv), RAW) == 3 * HEADS * N * C  # one byte per element, no scales
    store = tier(kv, RAW)
    original = {k: v.clone() for k, v in kv.items()}
    store.store([2, 5], [1, 2])
    assert store.load([2, 1], [8, 9]) == []
    for name, v in kv.items():
        assert torch.equal(v[8], original[name][5]) and torch.equal(v[9], original[name][2])  # bit-exact
    assert store.relative_rms_error is None


def test_bf16_block_bytes_count_fp8_pages_and_scales():
    assert view_bytes(views_of(caches(layers=2)), QUANTIZE) == 2 * HEADS * (N * C + 4)


def test_host_memory_is_taken_a_chunk_at_a_time_as_slots_fill():
    kv = caches(layers=1)
    slot = view_bytes(views_of(kv), QUANTIZE)
    store = tier(kv, chunk_bytes=4 * slot)  # 4 slots per chunk
    assert store.slots.allocated_bytes == 0  # nothing at start-up
    store.store([1], [0])
    assert len(store.slots.chunks) == 1 and store.slots.allocated_bytes == 4 * slot
    store.store([2, 3], [9, 1000])  # slots in two more chunks, far apart
    assert sorted(store.slots.chunks) == [0, 2, 250]
    original = kv["layer.0"].clone()
    kv["layer.0"].zero_()
    assert store.load([1000, 9, 0], [5, 6, 7]) == []
    for src, dst in ((3, 5), (2, 6), (1, 7)):
        x, y = original[src].float(), kv["layer.0"][dst].float()
        assert float((x - y).norm() / x.norm()) < 0.07


class LaterEvent:
    """A copy that completes when the test says (a CUDA event on a side stream, as the store sees one)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


class LaterLink(SyncLink):
    """The store's device link with copies that complete later; records what the compute stream was told to wait on."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.events: list[LaterEvent] = []
        self.fenced: list[LaterEvent] = []

    def record(self):
        self.events.append(LaterEvent())
        return self.events[-1]

    def fence_compute(self, event) -> None:
        self.fenced.append(event)


def test_a_store_is_sealed_only_once_its_copy_completed_and_the_compute_stream_waits_for_it():
    kv = caches(layers=2)
    link = LaterLink()
    store = tier(kv, link=link)
    store.store([1, 2], [0, 1])
    read, copied = link.events  # the blocks were read (into device buffers); their copy to the host completed
    assert link.fenced == [read]  # the step that may reuse the blocks runs after they were read, not after the copy
    read.done = True
    assert store.seal_ready() == 0 and store.crc == {0: -1, 1: -1}  # not yet: those slots fail any check
    copied.done = True
    assert store.seal_ready() == 1 and all(c >= 0 for c in store.crc.values())
    assert store.load([1, 0], [5, 6]) == []


def test_a_load_of_a_slot_whose_store_is_in_flight_waits_for_that_copy():
    kv = caches(layers=1)
    original = kv["layer.0"][2].clone()
    link = LaterLink()
    store = tier(kv, link=link)
    store.store([2], [0])
    kv["layer.0"].zero_()
    assert store.load([0], [7]) == []
    assert link.events[1].waited  # the copy's event: synchronized, then sealed, then read
    assert float((original.float() - kv["layer.0"][7].float()).norm() / original.float().norm()) < 0.07
    assert "layer.0" in store.layer_events  # the layer's attention waits for this restore
    store.fence_layer("layer.0")
    assert link.fenced[-1] is link.events[-1] and "layer.0" not in store.layer_events


def test_only_the_newest_of_two_in_flight_stores_of_a_slot_seals_it():
    kv = caches(layers=1)
    link = LaterLink()
    store = tier(kv, link=link)
    store.store([1], [0])
    store.store([2], [0])  # the slot was reused before the first copy completed
    link.events[1].done = True  # (each store records two events: read, then copied)
    store.seal_ready()
    assert store.crc[0] == -1  # the first copy must not seal the slot the second one now owns
    link.events[3].done = True
    store.seal_ready()
    kv_before = kv["layer.0"][2].clone()
    kv["layer.0"].zero_()
    assert store.load([0], [5]) == []
    assert float((kv_before.float() - kv["layer.0"][5].float()).norm() / kv_before.float().norm()) < 0.07


def test_an_invalidated_store_in_flight_never_seals():
    kv = caches(layers=1)
    link = LaterLink()
    store = tier(kv, link=link)
    store.store([1], [0])
    store.invalidate([0])
    link.events[0].done = True
    store.seal_ready()
    assert store.load([0], [3]) == [3]


def test_fault_injection_corrupts_every_nth_sealed_slot_and_those_are_never_restored():
    kv = caches(layers=1)
    store = tier(kv)
    store.corrupt_every = 2
    store.store([1, 2, 3, 4], [0, 1, 2, 3])
    failed = store.load([0, 1, 2, 3], [5, 6, 7, 8])
    assert failed == [6, 8] and store.counters["corrupted_slots"] == 2


def test_a_block_loaded_twice_in_one_call_gets_the_last_load():
    kv = caches(layers=1)
    original = kv["layer.0"].clone()
    store = tier(kv)
    store.store([1, 2], [0, 1])
    kv["layer.0"].zero_()
    assert store.load([0, 1], [5, 5]) == []  # slot 1 (block 2's KV) is the last planned into block 5
    x, y = original[2].float(), kv["layer.0"][5].float()
    assert float((x - y).norm() / x.norm()) < 0.07


def test_a_slot_stored_twice_in_one_step_keeps_only_the_last_store():
    """The directory can evict a block it planned to store this very step and give its slot to another (a tier much
    smaller than the pool): only the last store of a slot is copied. Before, sealing the slot twice raised (KeyError),
    the connector invalidated every store of the step, and their restores failed their checksums (21 and 41 blocks in
    `kvsched bench agents --quick --fp8-tier-gb 0.015` runs); and a repeated index in `index_copy_` leaves which row
    lands undefined."""
    kv = caches(layers=2)
    original = {k: v.clone() for k, v in kv.items()}
    store = tier(kv)
    store.store([1, 2, 3], [0, 1, 0])  # slot 0: block 1, then (evicted, given again) block 3
    assert store.counters["stored_blocks"] == 2
    for v in kv.values():
        v.zero_()
    assert store.load([0, 1], [5, 6]) == []
    for name, v in kv.items():
        for src, dst in ((3, 5), (2, 6)):
            x, y = original[name][src].float(), v[dst].float()
            assert float((x - y).norm() / x.norm()) < 0.07, (name, src)


def test_the_connector_runs_only_the_last_load_planned_into_a_block():
    from kvsched.adapters.vllm.tier_meta import TierStepMeta
    from kvsched.core.tier import Load

    meta = TierStepMeta(prefetches=[Load(0, 7), Load(1, 8), Load(2, 7)], loads=[Load(3, 8), Load(4, 9)])
    assert meta.drop_superseded() == 2
    assert meta.prefetches == [Load(2, 7)] and meta.loads == [Load(3, 8), Load(4, 9)]
    assert meta.drop_superseded() == 0


def test_the_side_stream_waits_for_the_compute_stream_as_it_was_before_the_switch(monkeypatch):
    """A store reads blocks the compute stream wrote; a restore writes blocks a step still in flight may write (vLLM's
    async scheduler plans a step ahead). The side stream must wait for the *compute* stream. Found by review: the wait
    ran inside the side stream's context, where the current stream is the side stream itself, so it waited on itself.
    The stream calls are faked (no CUDA here): the order of calls is the logic under test."""
    from contextlib import contextmanager

    from kvsched.adapters.vllm import tier_link

    class FakeStream:
        def __init__(self, name):
            self.name, self.waited_on = name, []

        def wait_stream(self, other):
            self.waited_on.append(other.name)

    compute = FakeStream("compute")
    current = [compute]

    @contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(tier_link.torch.cuda, "Stream", lambda device=None: FakeStream("side"))
    monkeypatch.setattr(tier_link.torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(tier_link.torch.cuda, "stream", stream)
    link = tier_link.CudaLink(torch.device("cpu"))
    with link.side():
        assert current[-1] is link.stream  # work here is enqueued on the side stream
    with link.side():
        pass
    assert link.stream.waited_on == ["compute", "compute"]  # each entry (a store's and a restore's) waits


def test_every_restore_of_a_step_is_fenced_before_the_forward(monkeypatch):
    """vLLM skips `wait_for_layer_load` while it replays a FULL CUDA graph (its default mode runs uniform decode
    batches that way), so the connector fences every restore at the end of `start_load_kv` and after its prefetches
    (found by review: only a partial last block was fenced before the forward; the rest waited per layer)."""
    from kvsched.adapters.vllm import fp8_tier_connector as fc
    from kvsched.adapters.vllm.tier_meta import TierStepMeta, TierWorkerMeta
    from kvsched.core.tier import Load

    kv = caches(layers=2)
    link = LaterLink()
    store = tier(kv, link=link)
    store.store([1, 2, 3], [0, 1, 2])
    for e in link.events:
        e.done = True
    link.fenced.clear()
    conn = object.__new__(fc.KVSchedFP8TierConnector)  # the worker side only: no vLLM config needed
    conn.store, conn._errors, conn._worker_meta, conn.levels_worker = store, set(), TierWorkerMeta(), None
    meta = TierStepMeta(prefetches=[Load(0, 7)], loads=[Load(1, 8), Load(2, 9)])
    monkeypatch.setattr(fc.compat, "connector_metadata", lambda c: meta)
    conn._before_step(meta)
    assert store.layer_events == {} and len(link.fenced) == 2  # the prefetch's two layers, before any forward
    conn.start_load_kv(None)
    assert store.layer_events == {} and len(link.fenced) == 4  # and the loads' two layers
    assert conn._worker_meta.loaded_blocks == 3 and not conn._errors


def test_the_compute_stream_waits_for_the_blocks_to_be_read_not_for_their_copy_to_the_host():
    """Found by review: the store's fence was recorded after the device-to-host copies, so on a GPU the next forward
    waited for the PCIe transfer of every stored block; the quantized pages are private buffers once the kernels ran.
    A store larger than a copy group (tier_link.StagePool) goes in groups: the fence follows the last group's kernels,
    and each group's copy seals its own slots."""
    from kvsched.adapters.vllm.tier_link import StagePool, stage_plan

    kv = caches(layers=4)
    original = {k: v.clone() for k, v in kv.items()}
    slot = view_bytes(views_of(kv), QUANTIZE)
    for device_bytes, groups in ((None, 1), (slot, 2)):  # a device stage of one block: a group per block
        link = LaterLink()
        pool = StagePool(stage_plan(1 << 20), pin=False, allocate=True, device_bytes=device_bytes)
        store = tier(kv, link=link, stage=pool)
        store.store([3, 7], [0, 1])
        assert len(link.events) == 2 * groups and (store.group_blocks == 1) == (groups == 2)
        reads, copies = link.events[0::2], link.events[1::2]
        assert link.fenced == [reads[-1]] and [p.event for p in store.pending] == copies
        for c in copies:
            c.done = True
        for v in kv.values():
            v.zero_()
        assert store.load([0, 1], [3, 7]) == []
        for k, v in kv.items():
            for b in (3, 7):
                x, y = original[k][b].float(), v[b].float()
                assert float((x - y).norm() / x.norm()) < 0.07
        for k, v in kv.items():
            v.copy_(original[k])
