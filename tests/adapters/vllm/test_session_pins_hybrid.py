"""Pins on a hybrid model's KV cache (a full-attention group and a sliding-window group, as Gemma-3 or gpt-oss have), on
vLLM's real scheduler, KV cache manager and block pool (harness.py). Found by review (s3_hybrid_window, s3b_hybrid_swa_
first, s2_hybrid_partial): once a session was longer than the window its sliding-window group was never pinned, so its
next turn hit nothing; with that group first the pin counted 0 tokens; a partial release gave back more than counted."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import harness  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402

WINDOW = 64  # tokens: a hit needs the 4 blocks before its end (vLLM: cdiv(window - 1, block size))
HISTORY = list(range(100, 100 + 20 * BLOCK))  # 20 full blocks, far past the window


@pytest.fixture
def hybrid(harness_cfg, clock, monkeypatch):
    """A scheduler over the hybrid layout (`sliding_first`: the sliding-window group first), 96 blocks."""
    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")  # the floods' blocks are free, not pinned, once they are done

    def build(sliding_first=False, cls=None, window=WINDOW):
        cfg = replace(harness_cfg, num_blocks=96, sliding_window=window, sliding_first=sliding_first)
        return sched(cfg, clock=clock) if cls is None else sched(cfg, cls)
    return build


def _groups(s, key):
    """(full-attention group, sliding-window group) of the session's pin, whichever order the engine has them in."""
    groups = s.kvsched.pinned[key]
    return (groups[1], groups[0]) if _sliding_first(s) else (groups[0], groups[1])


def _sliding_first(s):
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    return isinstance(s.kv_cache_manager.coordinator.single_type_managers[0], SlidingWindowManager)


def _flood(s, f):
    for i in range(4):  # 4 x 19 blocks of each group through the pool: whatever no pin holds is evicted
        s.add_request(f.make([5000 + i] * 300, 2))
        harness.run_until_idle(s)


def _next_turn(s, f, prompt):
    counts = harness.PrefillCounts()
    s.add_request(f.make(prompt, 4, session_id="a"))
    harness.run_until_idle(s, counts=counts)
    return counts.cached_tokens


@pytest.mark.parametrize("sliding_first", [False, True])
def test_the_window_a_hit_needs_is_pinned_and_the_next_turn_hits_the_whole_history(hybrid, sliding_first):
    s, f = hybrid(sliding_first), harness.RequestFactory(BLOCK)
    s.add_request(f.make(HISTORY, 4, session_id="a"))
    harness.run_until_idle(s)
    key = next(iter(s.kvsched.pinned))
    full, window = _groups(s, key)
    assert len(full) == 20 and [b.block_hash_num_tokens for b in window] == [(i + 1) * BLOCK for i in range(16, 20)]
    rec = s.kvsched.policy.sessions[key]
    assert rec.pinned_tokens == 20 * BLOCK and rec.pinned_blocks == 24 and not pool_violations(s)
    _flood(s, f)
    assert _next_turn(s, f, HISTORY + [3] * 40) == 20 * BLOCK and not pool_violations(s)
    # the next turn's window replaces the old one (the window slid: no block in common), the old one is given back
    full, window = _groups(s, key)
    assert len(full) == 22 and [b.block_hash_num_tokens // BLOCK for b in window] == [19, 20, 21, 22]
    s.kvsched.handle("end", "a")
    assert harness.free_blocks(s) == harness.usable_blocks(s)

    stock = hybrid(sliding_first, cls=harness.STOCK_SCHEDULER)  # the flood does evict what no pin holds
    stock.add_request(f.make(HISTORY, 4, session_id="a"))
    harness.run_until_idle(stock)
    _flood(stock, f)
    counts = harness.PrefillCounts()
    stock.add_request(f.make(HISTORY + [3] * 40, 4, session_id="a"))
    harness.run_until_idle(stock, counts=counts)
    assert counts.cached_tokens == 0


def test_a_window_block_the_request_already_let_go_is_taken_back_from_the_prefix_cache(hybrid):
    """A 72-token window needs 5 blocks before a hit's end; 12 tokens decoded, the request's last block holds 11
    computed tokens and its window reaches back to token 331 - 71 = 260 only: block 15 (tokens 240..255) left it, though
    a hit at token 320 needs it. It is still cached: the pin takes it back."""
    s, f = hybrid(window=72), harness.RequestFactory(BLOCK)
    s.add_request(r := f.make(HISTORY, 12, session_id="a"))
    held = []
    while s.has_requests():
        held = list(s.kv_cache_manager.coordinator.get_blocks(r.request_id)[1]) or held
        harness.step(s)
    assert held[15].is_null and not held[16].is_null  # the request's sliding-window blocks in its last step
    key = next(iter(s.kvsched.pinned))
    full, window = _groups(s, key)
    assert len(full) == 20 and [b.block_hash_num_tokens // BLOCK for b in window] == [16, 17, 18, 19, 20]
    assert s.kvsched.policy.sessions[key].pinned_tokens == 20 * BLOCK and not pool_violations(s)
    _flood(s, f)
    assert _next_turn(s, f, HISTORY + [3] * 40) == 20 * BLOCK


def test_a_partial_release_of_a_hybrid_pin_gives_back_exactly_what_the_policy_counted(hybrid):
    s, f = hybrid(window=512), harness.RequestFactory(BLOCK)
    s.add_request(f.make(HISTORY[:10 * BLOCK], 1, session_id="a"))  # inside the window: 10 blocks in each group
    harness.run_until_idle(s)
    key = next(iter(s.kvsched.pinned))
    assert [len(g) for g in s.kvsched.pinned[key]] == [10, 10]
    s.kvsched.apply(s.kvsched.policy.release_for_pressure(3))
    assert sum(map(len, s.kvsched.pinned[key])) == s.kvsched.policy.sessions[key].pinned_blocks == 17
    assert not pool_violations(s)


def test_a_pressure_release_of_a_pin_past_its_window_takes_it_whole(hybrid):
    """Past the window the sliding-window group holds only the 4 blocks before the prefix's end: a release of 3
    blocks from its tail would leave 21 pinned blocks no hit can use (the hybrid hit needs the window's blocks at the
    hit's end), so the whole pin goes and every block of it is back in the free queue."""
    s, f = hybrid(), harness.RequestFactory(BLOCK)
    s.add_request(f.make(HISTORY, 4, session_id="a"))
    harness.run_until_idle(s)
    key = next(iter(s.kvsched.pinned))
    assert [len(g) for g in _groups(s, key)] == [20, 4] and s.kvsched.policy.sessions[key].whole_only
    s.kvsched.apply(s.kvsched.policy.release_for_pressure(3))
    assert key not in s.kvsched.pinned and s.kvsched.policy.sessions[key].pinned_blocks == 0
    assert harness.free_blocks(s) == harness.usable_blocks(s) and not pool_violations(s)
