"""The FP8 tier's host memory (kvsched/adapters/vllm/tier_slots.py): a pinned chunk is one power-of-two allocation,
sliced per layer, holding every slot that fits (torch's pinned allocator rounds each request up to a power of two)."""

from __future__ import annotations

import torch

from kvsched.adapters.vllm.tier_layout import QUANTIZE, view_bytes
from tests.adapters.vllm.test_fp8_tier_store import views_of
from tests.plain_thread import raised_on_a_thread


def test_a_pinned_chunk_is_one_power_of_two_allocation_holding_every_slot_that_fits(monkeypatch):
    """torch's pinned-memory allocator rounds each request up to a power of two: one pinned tensor per layer took
    ~1.75x the bytes counted for Qwen2.5-7B's pages (28 layers of [4 heads, 16 tokens, 256 bytes] rows, 2.28 MiB per
    layer and chunk, 4 MiB taken; found by review). A chunk is now one power-of-two request, sliced, and counted whole."""
    from kvsched.adapters.vllm import tier_slots

    asked = []

    def host_empty(shape, dtype, pin):  # a CPU-only torch cannot pin: record what would be asked, allocate plainly
        asked.append((shape, dtype, pin))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(tier_slots, "host_empty", host_empty)
    kv = {f"layer.{i}": torch.zeros(2, 4, 16, 256, dtype=torch.bfloat16) for i in range(28)}
    slot = view_bytes(views_of(kv), QUANTIZE)
    slots = tier_slots.HostSlots(views_of(kv), True, True, slot)
    q = torch.randint(0, 255, (1, 4, 16, 256), dtype=torch.uint8)
    for v in range(28):
        slots.write(v, [slots.per_chunk - 1], q + v, torch.full((1, 4), float(v)))
    assert len(asked) == 1 and asked[0][2] is True
    nbytes = asked[0][0][0]
    assert nbytes == 64 << 20 == slots.allocated_bytes and slots.per_chunk * slot <= nbytes
    assert tier_slots.chunk_layout(slots.shapes, slots.row_bytes, True, slots.per_chunk + 1).nbytes > nbytes
    for v in range(28):  # each layer's rows and scales are its own bytes of the one buffer
        out_q, out_s = torch.empty_like(q), torch.empty(1, 4)
        slots.read(v, [slots.per_chunk - 1], out_q, out_s)
        assert torch.equal(out_q, q + v) and torch.equal(out_s, torch.full((1, 4), float(v)))
    unpinned = tier_slots.HostSlots(views_of(kv), True, False, slot)  # plain memory is taken as counted
    assert unpinned.per_chunk == (64 << 20) // slot and unpinned.layout.nbytes < 64 << 20


def test_a_power_of_two_chunk_holds_every_slot_that_fits_with_its_padding():
    """Found by review: the slots per pinned chunk were estimated from the padded size of the slots asked for, so 1
    slot of two layers (200 bytes, 324 with their 64-byte-aligned regions) took a 512-byte chunk that holds 2."""
    from kvsched.adapters.vllm.tier_slots import chunk_layout

    shapes, row_bytes = [(1, 1, 96)] * 2, [96, 96]  # two views of 96 bytes of rows and 4 of scales a slot
    layout = chunk_layout(shapes, row_bytes, True, 1, whole_power_of_two=True)
    assert layout.nbytes == 512 and layout.slots == 2  # two slots take 456 bytes
    for slots in (2, 3, 5, 40):
        layout = chunk_layout(shapes, row_bytes, True, slots, whole_power_of_two=True)
        assert layout.nbytes & (layout.nbytes - 1) == 0
        assert chunk_layout(shapes, row_bytes, True, layout.slots).nbytes <= layout.nbytes
        assert chunk_layout(shapes, row_bytes, True, layout.slots + 1).nbytes > layout.nbytes, slots


def test_a_slot_first_written_in_inference_mode_is_filled_from_disk_by_a_thread_outside_it():
    """Found by the soak (tools/soak.py with the disk level on): a chunk first written by a demotion, in the forward
    pass's inference mode, was an inference tensor, and the levels' fetch thread (no inference mode: it is per thread)
    could not fill a slot of it ("Inplace update to inference tensor outside InferenceMode"): every disk read failed,
    none restored. A chunk is now a normal tensor wherever it is first taken."""

    from kvsched.adapters.vllm import tier_slots

    kv = {f"layer.{i}": torch.zeros(2, 2, 4, 8, dtype=torch.bfloat16) for i in range(2)}
    slots = tier_slots.HostSlots(views_of(kv), True, False, view_bytes(views_of(kv), QUANTIZE))
    q = torch.randint(0, 255, (1, 2, 4, 8), dtype=torch.uint8)
    with torch.inference_mode():  # a demotion: the worker's save path, inside the forward pass
        for v in range(2):
            slots.write(v, [0], q + v, torch.full((1, 2), float(v)))
    payload = slots.payload(0)
    # the levels' fetch thread: a block read from disk into another slot of the same chunk
    errors = raised_on_a_thread(lambda: slots.put_payload(1, payload))
    assert not errors, errors
    assert slots.payload(1) == payload
    with torch.inference_mode():  # and a demotion writes the chunk on as before
        slots.write(0, [1], q + 9, torch.full((1, 2), 9.0))
    out_q, out_s = torch.empty_like(q), torch.empty(1, 2)
    slots.read(0, [1], out_q, out_s)
    assert torch.equal(out_q, q + 9) and torch.equal(out_s, torch.full((1, 2), 9.0))
