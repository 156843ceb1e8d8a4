"""The FP8 tier's slot checksum (tier_slots.SlotCrc): CRC32C through kvsched._C when built, else zlib.crc32, fixed once
per process and kept by each HostSlots, so what sealed a slot always checks it; the disk and store blobs keep zlib."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvsched.adapters.vllm import tier_slots
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_layout import QUANTIZE, RAW
from kvsched.ops import checksum
from tests.adapters.vllm.test_fp8_tier_store import caches, views_of
from tests.ops.conftest import require_cxx

FUNCTIONS = [tier_slots.ZLIB, tier_slots.CRC32C]


def _need(fn: tier_slots.SlotCrc) -> None:
    if fn is tier_slots.CRC32C:
        require_cxx()


def test_the_process_picks_one_slot_checksum_once(monkeypatch):
    tier_slots.slot_crc.cache_clear()
    try:
        first = tier_slots.slot_crc()
        assert first is (tier_slots.CRC32C if checksum.has_cxx_crc32c() else tier_slots.ZLIB)
        monkeypatch.setattr(checksum, "has_cxx_crc32c", lambda: first is tier_slots.ZLIB)  # the extension "changes"
        assert tier_slots.slot_crc() is first  # never: slots sealed earlier are checked with what sealed them
        tier_slots.slot_crc.cache_clear()
        assert tier_slots.slot_crc() is not first  # a new process (no extension) would take the other one
    finally:
        tier_slots.slot_crc.cache_clear()


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", [QUANTIZE, RAW])
def test_a_slots_crc_is_its_functions_crc_of_its_bytes_and_a_changed_byte_fails_the_restore(fn, mode):
    _need(fn)
    kv = caches(torch.bfloat16 if mode == QUANTIZE else torch.uint8)
    store = TierStore(views_of(kv), mode)
    store.slots.crc_fn = fn  # as if this process had picked it
    store.store([3, 7, 1], [4, 0, 2])
    for slot in (4, 0, 2):
        payload = store.slots.payload(slot)  # the slot's bytes in checksum order (scales, then rows, per view)
        want = zlib.crc32(payload) if fn is tier_slots.ZLIB else checksum.crc32c_python(payload)
        assert store.crc[slot] == want
    assert store.load([4, 0, 2], [9, 10, 11]) == []
    cq, _ = store.slots._chunk(0)[1]
    cq[0].view(-1)[-1] ^= 1  # the last byte of slot 0's second view
    assert store.load([4, 0, 2], [9, 10, 11]) == [10]


def test_slots_default_to_the_process_choice_and_the_tier_blob_format_stays_zlib():
    kv = caches()
    store = TierStore(views_of(kv), QUANTIZE)
    assert store.slots.crc_fn is tier_slots.slot_crc()
    from kvsched.adapters.vllm import tier_blob

    assert "zlib" in open(tier_blob.__file__).read()  # the on-disk format is not the in-memory one


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.name)
def test_checksums_of_many_slots_across_chunks_equal_one_at_a_time(fn):
    _need(fn)
    kv = caches()
    store = TierStore(views_of(kv), QUANTIZE, chunk_bytes=1)  # one slot per chunk: each slot its own allocation
    store.slots.crc_fn = fn
    store.store([0, 1, 2, 3], [5, 1, 3, 0])
    together = store.slots.checksums([5, 1, 3, 0])
    assert together == [store.slots.checksum(s) for s in (5, 1, 3, 0)] == [store.crc[s] for s in (5, 1, 3, 0)]
    assert len(set(together)) == 4 and store.slots.checksums([]) == []
