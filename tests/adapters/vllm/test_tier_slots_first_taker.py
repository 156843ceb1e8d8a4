"""The FP8 tier's host chunks (kvsched/adapters/vllm/tier_slots.py) are normal tensors whichever call takes a chunk
first inside vLLM's forward pass (its `torch.inference_mode()`): a demotion's write, a promotion's read, a payload or
a checksum for a publish, or a disk fill. review70's check of every allocation path (all go through
`HostSlots._chunk`): sound on main; a slot of each such chunk is then filled from a plain thread (the levels' fetch
thread) and read back."""

from __future__ import annotations

import pytest
import torch

from kvsched.adapters.vllm import tier_slots
from kvsched.adapters.vllm.tier_layout import QUANTIZE, view_bytes
from tests.adapters.vllm.test_fp8_tier_store import views_of
from tests.plain_thread import raised_on_a_thread

KV = {f"layer.{i}": torch.zeros(2, 2, 4, 8, dtype=torch.bfloat16) for i in range(2)}
Q = torch.randint(0, 255, (1, 2, 4, 8), dtype=torch.uint8)


def first_takers() -> dict[str, object]:
    return {
        "write": lambda s: s.write(0, [0], Q, torch.ones(1, 2)),
        "read": lambda s: s.read(0, [0], torch.empty_like(Q), torch.empty(1, 2)),
        "payload": lambda s: s.payload(0),
        "checksums": lambda s: s.checksums([0]),
        "put_payload": lambda s: s.put_payload(0, bytes(sum(s.view_bytes))),
    }


@pytest.mark.parametrize("taker", list(first_takers()))
def test_a_chunk_first_taken_in_inference_mode_is_normal(taker: str) -> None:
    slots = tier_slots.HostSlots(views_of(KV), True, False, view_bytes(views_of(KV), QUANTIZE))
    with torch.inference_mode():
        first_takers()[taker](slots)
    (chunk,) = slots.chunks.values()
    assert not any(t.is_inference() for q, s in chunk for t in (q, s) if t is not None), taker
    payload = bytes(range(256)) * (sum(slots.view_bytes) // 256) + bytes(sum(slots.view_bytes) % 256)
    errors = raised_on_a_thread(lambda: slots.put_payload(1, payload))
    assert not errors, errors
    assert slots.payload(1) == payload
