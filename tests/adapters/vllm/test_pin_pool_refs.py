"""The pins' reference counts on vLLM's block pool (`VllmPinPool`): an array over the block ids and a count of the
held ones, which must say exactly what a per-block counter of the pins' holds says, since the budget pass counts the
blocks a release freed by `num_pinned` (BENCHMARKS.md, "Scheduler overhead": why not a dict)."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import (  # noqa: E402
    KVSCHED_SCHEDULER,
    HarnessConfig,
    RequestFactory,
    build_scheduler,
    step,
)
from kvsched.adapters.vllm.pin_pool import VllmPinPool  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402

BLOCK = 16


class FakeBlockPool:
    """vLLM's `BlockPool` as far as the pins' pool calls it: reference counts and the order blocks are returned in."""

    def __init__(self, n: int) -> None:
        self.blocks = [SimpleNamespace(block_id=i, ref_cnt=0) for i in range(n)]
        self.returned: list[int] = []

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            b.ref_cnt -= 1
            self.returned.append(b.block_id)

    def get_num_free_blocks(self) -> int:
        return sum(b.ref_cnt == 0 for b in self.blocks)


def _pool(n: int) -> tuple[VllmPinPool, FakeBlockPool]:
    fake = FakeBlockPool(n)
    return VllmPinPool(SimpleNamespace(kv_cache_manager=SimpleNamespace(block_pool=fake))), fake


def test_counts_follow_the_holds_and_returns_of_shared_blocks():
    pool, fake = _pool(8)
    b = fake.blocks
    pool.hold([b[1], b[2], b[3]])
    pool.hold([b[1], b[2]])  # a second session's pin sharing the head
    assert dict(pool.refs) == {1: 2, 2: 2, 3: 1} and pool.num_pinned() == 3 == len(pool.refs)
    pool.give_back([b[3]])
    assert dict(pool.refs) == {1: 2, 2: 2} and pool.num_pinned() == 2
    pool.give_back([b[2], b[1]])
    assert dict(pool.refs) == {1: 1, 2: 1} and pool.num_pinned() == 2  # still held by the first pin
    assert 3 not in pool.refs and 1 in pool.refs and pool.refs.get(0) is None and pool.refs.get(-1) is None
    with pytest.raises(KeyError):
        pool.refs[99]
    pool.hold_allocated([b[5]])  # a prefetch's new block: allocated with its reference, counted, not touched
    assert b[5].ref_cnt == 0 and pool.refs[5] == 1 and pool.num_pinned() == 3
    pool.give_back([b[2], b[1], b[5]])
    assert not pool.refs and pool.num_pinned() == 0 and fake.returned == [3, 2, 1, 2, 1, 5]


def test_a_block_no_pin_holds_is_returned_to_vllm_and_its_count_stays_zero():
    """A refused prefetch gives back blocks it allocated and no pin held (`PinApplier.adopt`): as the dict it replaces
    did, vLLM gets them and no count goes below zero (an unsigned array would raise) or moves another block's."""
    pool, fake = _pool(4)
    pool.hold([fake.blocks[1]])
    pool.give_back([fake.blocks[2], fake.blocks[3]])
    assert dict(pool.refs) == {1: 1} and pool.num_pinned() == 1 and fake.returned == [2, 3]


def test_random_holds_and_returns_match_a_counter_of_the_pins():
    rng = random.Random(7)
    pool, fake = _pool(64)
    pins: list[list[SimpleNamespace]] = []
    for _ in range(2_000):
        if pins and rng.random() < 0.45:
            pin = pins.pop(rng.randrange(len(pins)))
            cut = rng.randrange(len(pin))  # a tail (a partial release) or the whole pin
            pool.give_back(pin[cut:][::-1])
            if cut:
                pins.append(pin[:cut])
        else:
            blocks = rng.sample(fake.blocks[1:], rng.randint(1, 6))
            (pool.hold if rng.random() < 0.9 else pool.hold_allocated)(blocks)
            pins.append(blocks)
        held = Counter(b.block_id for pin in pins for b in pin)
        assert dict(pool.refs) == dict(held) and pool.num_pinned() == len(held) == len(pool.refs)


def test_turns_on_vllms_pool_over_the_budget_keep_the_counts_and_vllms_references(tiny_model_dir, clock,
                                                                                   monkeypatch):
    """Sessions whose turns extend their prompts (the pin's unhit tail released at each start, the new blocks held at
    each finish) and share a head, on a pin budget the pins overflow (a budget pass counting freed blocks by
    `num_pinned`): after every step each block's vLLM reference count is its requests' plus its pins', and the pins'
    counts are the blocks their pins hold (`pool_violations`)."""
    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "0.3")
    s = build_scheduler(KVSCHED_SCHEDULER, HarnessConfig(model_dir=tiny_model_dir, num_blocks=96, block_size=BLOCK,
                                                         max_model_len=1024))
    s.kvsched.policy.clock = clock
    f = RequestFactory(BLOCK)
    head = list(range(40))  # shared by every session: the pins count its blocks once
    prompts = {sid: head + [1000 * (k + 1)] * 10 for k, sid in enumerate("abcdef")}
    for turn in range(5):
        for sid, prompt in prompts.items():
            s.add_request(f.make(prompt, 20, session_id=sid))
        while s.has_requests():
            step(s)
            assert pool_violations(s) == []
        for sid in prompts:
            prompts[sid] = prompts[sid] + [7 + turn] * 24  # the next turn: the prompt, not the answer, plus more
        clock.advance(1.0)
    c = s.kvsched.policy.counters
    assert c["pins"] >= 24 and c["released_turn_partial"] > 0 and c["released_budget"] + c["released_budget_partial"]
