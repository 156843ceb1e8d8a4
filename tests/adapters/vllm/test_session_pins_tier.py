"""kvsched's FP8 tier on vLLM's real scheduler, KV cache manager and block pool (no model, no worker: the connector's
scheduler side plans the stores and loads; see harness.py): demotion of pressure releases, partial last blocks,
checksum failures and prefetch."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import (  # noqa: E402
    FAKE_TOKEN,
    PrefillCounts,
    RequestFactory,
    free_blocks,
    run_until_idle,
    step,
    usable_blocks,
)
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def test_fp8_tier_demotes_pressure_releases_and_the_next_turn_restores_them(harness_cfg, clock):
    """With the tier, the blocks pressure takes from a session are planned for a copy in the same step, and the
    session's next turn gets them back as external tokens where kvsched alone recomputes them."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    history = list(range(100, 260))  # 10 full blocks
    cached, stores, loads = {}, {}, {}
    for tier in (False, True):
        cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01) if tier else None)
        s, f = sched(cfg, clock=clock), RequestFactory(BLOCK)
        s.add_request(f.make(history, 4, session_id="agent-1"))
        run_until_idle(s)
        n_stores = n_loads = n_prefetched = 0
        for i in range(4):  # 4 x 21 blocks through a 63-block pool: the pin must yield
            s.add_request(f.make([5000 + i] * 330, 4))
        while s.has_requests():
            out, _ = step(s)
            meta = out.kv_connector_metadata
            n_stores += len(meta.stores) if meta is not None else 0
        turn2 = PrefillCounts()
        s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="agent-1"))
        while s.has_requests():
            out, _ = step(s)
            turn2.record(out, s)
            meta = out.kv_connector_metadata
            n_loads += len(meta.loads) + len(meta.prefetches) if meta is not None else 0
            n_prefetched += len(meta.prefetches) if meta is not None else 0
        cached[tier], stores[tier], loads[tier] = turn2.cached_tokens, n_stores, n_loads
        if tier:  # queued before it was scheduled: restored ahead of scheduling, and its turn hit every block
            stats = s.kvsched.stats()
            assert n_prefetched == n_loads and stats["tier_prefetched_restores"] == stats["tier_restores"] == 1
            assert stats["tier_prefetch_useful_blocks"] == n_prefetched and stats["tier_wasted_prefetches"] == 0
            assert stats["tier_prefetch_hit_tokens"] == n_prefetched * BLOCK
        # every pin and request gone: the pool is whole again, and the tier's directory holds only whole slots
        s.kvsched.handle("end", "agent-1")
        s.kvsched.handle("end_all")  # the flood's inferred sessions
        assert free_blocks(s) == usable_blocks(s)
        if tier:
            d = s.kvsched.tier.directory
            assert len(set(d.slot_of.values())) == d.used_slots == 0  # the session ended: its tier blocks went
    assert stores[False] == loads[False] == 0
    assert stores[True] >= 10 and loads[True] >= 9
    assert cached[True] >= cached[False] + 9 * BLOCK


def _tier_run(cfg, clock, turn2_tail):
    """Turn 1 of a 10-block history (decoding 4 tokens), then turn 2 re-sending it plus `turn2_tail`: the tier's stores
    after turn 1, the loads of turn 2, and turn 2's cached tokens."""
    s, f = sched(cfg, clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))
    s.add_request(f.make(history, 4, session_id="agent-1"))
    stores = []
    while s.has_requests():
        out, _ = step(s)
        stores += out.kv_connector_metadata.stores if out.kv_connector_metadata is not None else []
    out, _ = step(s)  # the step after the finish carries the tail's copy
    stores += out.kv_connector_metadata.stores if out.kv_connector_metadata is not None else []
    turn2, loads = PrefillCounts(), []
    s.add_request(f.make(history + turn2_tail, 4, session_id="agent-1"))
    while s.has_requests():
        out, _ = step(s)
        turn2.record(out, s)
        loads += out.kv_connector_metadata.loads if out.kv_connector_metadata is not None else []
    return s, stores, loads, turn2.cached_tokens


def test_fp8_tier_keeps_the_partial_last_block_and_the_next_turn_loads_it(harness_cfg, clock):
    """vLLM's prefix cache shares full blocks only: the 3 tokens of KV past turn 1's last full block (4 decoded, the
    last never fed back) are recomputed by kvsched alone and loaded from the tier with it."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    follow = [FAKE_TOKEN] * 3 + list(range(900, 940))  # turn 1's decoded tokens, re-sent
    plain = _tier_run(replace(harness_cfg, kv_transfer_config=None), clock, follow)
    s, stores, loads, cached = _tier_run(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock,
                                         follow)
    assert plain[3] == 160
    assert [st.tokens for st in stores] == [3]  # one partial store, of exactly the tokens that have KV
    assert cached == 163 and len(loads) == 1  # the pinned 10 blocks from the pool, the tail from the tier
    assert s.kvsched.stats()["tier_restored_tail_tokens"] == 3
    s.kvsched.handle("end", "agent-1")
    assert s.kvsched.tier.directory.used_slots == 0 and free_blocks(s) == usable_blocks(s)


def test_fp8_tier_tail_serves_only_the_tokens_the_next_turn_shares(harness_cfg, clock):
    """A next turn that diverges inside the tail gets the common tokens only; one that diverges at once, nothing."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01))
    _, _, loads, cached = _tier_run(cfg, clock, [FAKE_TOKEN, 4, 4] + list(range(900, 940)))
    assert cached == 161 and len(loads) == 1
    _, _, loads, cached = _tier_run(cfg, clock, [4, 4, 4] + list(range(900, 940)))
    assert cached == 160 and loads == []


def test_a_restore_that_fails_its_checksum_is_recomputed_and_the_request_finishes(harness_cfg, clock):
    """The worker reports every block the tier restored for turn 2 as failed (a corrupt slot): vLLM rolls the request
    back and recomputes them, and the request still runs to its end (vLLM 0.32's AsyncScheduler lost such a request:
    its output placeholder was never given back; compat.fix_load_failure_recovery)."""
    from dataclasses import replace

    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))
    s.add_request(f.make(history, 4, session_id="agent-1"))
    run_until_idle(s)
    for i in range(4):  # 4 x 21 blocks at once through a 63-block pool: the pin must yield (to the tier)
        s.add_request(f.make([5000 + i] * 330, 4))
    run_until_idle(s)
    s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="agent-1"))
    failed, computed, steps = set(), 0, 0
    while s.has_requests():
        steps += 1
        assert steps < 50, "the request never finished"
        out = s.schedule()
        meta = out.kv_connector_metadata
        bad = {ld.block_id for ld in meta.prefetches + meta.loads} if meta is not None and not failed else set()
        failed |= bad
        computed += sum(out.num_scheduled_tokens.values())
        ids = list(out.num_scheduled_tokens)
        sampled = [[] if s.requests[r].is_prefill_chunk else [FAKE_TOKEN] for r in ids]
        s.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(invalid_block_ids=bad) if bad else None))
    assert len(failed) >= 10  # the restored prefix (10 blocks, prefetched) and its partial last block
    assert computed >= len(history) + 3 + 40  # the whole prompt was computed again
    stats = s.kvsched.stats()
    assert stats["tier_load_failures"] == len(failed)
    s.kvsched.handle("end", "agent-1")
    s.kvsched.handle("end_all")  # the flood's inferred sessions
    assert free_blocks(s) == usable_blocks(s)


def test_a_session_due_soon_is_prefetched_before_its_request_arrives(harness_cfg, clock, monkeypatch):
    """The policy expects the session back `expected_next_use_s` after its last turn: that much later (less the
    restore's horizon) its tier blocks are restored into the pool and pinned, before any request exists, and its next
    turn hits them; a session not yet due is left in the tier. (A due prefetch takes free blocks only: the flood runs
    without session inference so that its blocks are free, not pinned as inferred sessions, once it is done.)"""
    from dataclasses import replace

    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))
    s.add_request(f.make(history, 4, session_id="agent-1"))
    run_until_idle(s)
    for i in range(4):  # pressure: the pin goes to the tier
        s.add_request(f.make([5000 + i] * 330, 4))
    run_until_idle(s)
    assert s.kvsched.tier.directory.blocks_of(next(iter(s.kvsched.policy.sessions))) >= 9
    rec = next(iter(s.kvsched.policy.sessions.values()))
    due_in = s.kvsched.policy.expected_next_use_s(rec, 0.0)
    out, _ = step(s)
    assert out.kv_connector_metadata.prefetches == []  # not due yet
    clock.advance(due_in)
    out, _ = step(s)
    prefetched = len(out.kv_connector_metadata.prefetches)
    assert prefetched >= 9 and s.kvsched.stats()["tier_prefetches_due"] == 1
    turn2 = PrefillCounts()
    s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="agent-1"))
    run_until_idle(s, counts=turn2)
    stats = s.kvsched.stats()
    assert turn2.cached_tokens >= prefetched * BLOCK and stats["tier_prefetch_useful_blocks"] == prefetched
    assert stats["tier_wasted_prefetches"] == 0 and stats["tier_prefetches_queued"] == 0
    s.kvsched.handle("end", "agent-1")
    assert free_blocks(s) == usable_blocks(s)


def test_a_side_turn_that_keeps_the_sessions_longer_pin_leaves_its_tier_tail_alone(harness_cfg, clock):
    """The title request beside a session's turn ends last and the session keeps the long turn's pin: the tier keeps
    the long turn's partial last block as the session's tail too (not the side request's)."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock)
    f = RequestFactory(BLOCK)
    system = list(range(100, 100 + BLOCK))
    s.add_request(f.make(system + [300, 301, 302], 12, session_id="chat"))  # its first words: a tail of its own
    s.add_request(f.make(system + list(range(300, 300 + 9 * BLOCK)), 4, session_id="chat"))  # 10 blocks + 3 tokens
    run_until_idle(s)
    [(key, rec)] = s.kvsched.policy.sessions.items()
    assert rec.pinned_blocks == 10 and rec.kept_over
    tail = s.kvsched.tier.directory.tail_of[key]
    assert tail.tokens == (FAKE_TOKEN,) * 3  # the long turn's: its 4 decoded tokens but the last


@pytest.mark.parametrize("tier_slots", [11, 200])
def test_a_queued_prefetch_releases_other_pins_only_into_free_tier_slots(harness_cfg, clock, monkeypatch, tier_slots):
    """Session A's 10 blocks sit in the tier; B and C pin 54 of the 63 blocks. A's next request arrives: its prefetch
    needs one block more than is free. With tier slots to spare, B's pin yields it (demoted) and the prefetch runs;
    with the tier full (11 slots: A's blocks and a tail), the release would evict KV from it, so no pin yields and A's
    turn restores its blocks when it is scheduled instead. Either way the turn gets its 10 blocks back."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")  # the flood's blocks are free, not pinned, once it is done
    tier = kv_transfer_config((tier_slots * 8208 + 100) / 2**30)  # the test model: 8,208 tier bytes a block
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    d = s.kvsched.tier.directory
    assert d.num_slots == tier_slots
    history = list(range(100, 260))  # 10 blocks
    s.add_request(f.make(history, 4, session_id="A"))
    run_until_idle(s)
    for i in range(4):  # pressure: A's pin goes to the tier
        s.add_request(f.make([5000 + i] * 330, 4))
    run_until_idle(s)
    for name, base in (("B", 20000), ("C", 30000)):  # 27 blocks pinned each: 9 of 63 left free
        s.add_request(f.make(list(range(base, base + 27 * BLOCK + 8)), 4, session_id=name))
        run_until_idle(s)
    pinned = {k.session_id: r.pinned_blocks for k, r in s.kvsched.policy.sessions.items()}
    assert pinned == {"A": 0, "B": 27, "C": 27} and free_blocks(s) == 9
    full = d.used_slots == d.num_slots
    assert full == (tier_slots == 11)
    turn2 = PrefillCounts()
    s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="A"))
    counters = s.kvsched.prefetcher.counters
    released = 54 - sum(r.pinned_blocks for k, r in s.kvsched.policy.sessions.items() if k.session_id != "A")
    if full:
        assert released == 0 and counters["prefetches_without_room"] == 1 and counters["prefetches_queued"] == 0
    else:
        assert released == 1 and counters["prefetches_queued"] == 1 and counters["prefetched_blocks"] == 10
    run_until_idle(s, counts=turn2)
    assert turn2.cached_tokens >= 10 * BLOCK


def test_a_turn_aborted_inside_its_prefill_keeps_only_the_tail_tokens_a_chunk_computed(harness_cfg, clock):
    """A 170-token prompt prefilled in chunks of 168: after the first chunk vLLM has hashed 10 full blocks and computed
    8 tokens of the 11th. Aborted there, the session's tail in the tier is those 8 tokens, not the 9 up to the prompt's
    last (the 9th has no KV: a later turn loading it would read a row nothing wrote)."""
    from dataclasses import replace

    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01), max_num_batched_tokens=168,
                  max_num_seqs=4)
    s, f = sched(cfg, clock=clock), RequestFactory(BLOCK)
    req = f.make(list(range(100, 270)), 4, session_id="agent-1")
    s.add_request(req)
    step(s)
    assert req.num_computed_tokens == 168 and len(req.block_hashes) == 10
    s.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
    out, _ = step(s)  # the step after the finish carries the tail's copy
    assert [st.tokens for st in out.kv_connector_metadata.stores] == [8]
    tail = s.kvsched.tier.directory.tail_of[next(iter(s.kvsched.policy.sessions))]
    assert tail.tokens == tuple(range(260, 268))


def test_a_request_with_prompt_embeddings_neither_keeps_nor_loads_a_tail(harness_cfg, clock):
    """A tail is keyed by token ids; vLLM's KV at an embedded position depends on the embedding (its token id is 0), so
    such a request must not match a tail stored by a text request with the same ids, nor store one."""
    from dataclasses import replace

    import torch

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    follow = [FAKE_TOKEN] * 3 + list(range(900, 940))
    cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01))
    s, stores, loads, cached = _tier_run(cfg, clock, follow)  # the text run: its tail is stored and loaded
    assert [st.tokens for st in stores] == [3] and len(loads) == 1
    s2, f = sched(cfg, clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))
    s2.add_request(f.make(history, 4, session_id="agent-1"))
    run_until_idle(s2)
    step(s2)
    d = s2.kvsched.tier.directory
    assert len(d.tail_of) == 1  # the text turn's tail
    embedded = f.make(history + follow, 4, session_id="agent-1")
    embedded.prompt_embeds = torch.zeros(len(history + follow), 8)
    loads2 = []
    s2.add_request(embedded)
    while s2.has_requests():
        out, _ = step(s2)
        loads2 += out.kv_connector_metadata.loads if out.kv_connector_metadata is not None else []
    assert loads2 == [] and s2.kvsched.stats()["tier_restored_tail_tokens"] == 0
    out, _ = step(s2)
    assert out.kv_connector_metadata is None or out.kv_connector_metadata.stores == []  # and stores no tail


@pytest.mark.parametrize("reset_connector", [False, True])
def test_a_prefix_cache_reset_empties_the_tier_tails_included(harness_cfg, clock, reset_connector):
    """vLLM resets its caches when weights change (`reset_connector=True` resets connectors too): KV kept from before
    would be stale. Turn 1 leaves a partial last block in the tier; after the reset the next turn loads nothing."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    history = list(range(100, 260))
    s.add_request(f.make(history, 4, session_id="agent-1"))
    run_until_idle(s)
    step(s)
    d = s.kvsched.tier.directory
    assert d.tail_of and d.used_slots == 1
    assert s.reset_prefix_cache(reset_connector=reset_connector) is True
    assert d.used_slots == 0 and d.tail_of == {} and free_blocks(s) == usable_blocks(s)
    s.add_request(f.make(history + [FAKE_TOKEN] * 3 + [5] * 20, 4, session_id="agent-1"))
    loads, counts = [], PrefillCounts()
    while s.has_requests():
        out, _ = step(s)
        counts.record(out, s)
        loads += out.kv_connector_metadata.loads if out.kv_connector_metadata is not None else []
    assert loads == [] and counts.cached_tokens == 0


def test_the_connectors_own_reset_empties_the_tier(harness_cfg, clock):
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    s, f = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)), clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(100, 260)), 4, session_id="agent-1"))
    run_until_idle(s)
    step(s)
    assert s.connector.directory.used_slots == 1
    assert s.connector.reset_cache() is True and s.connector.directory.used_slots == 0


def test_a_prefetch_released_before_it_is_cached_leaves_the_other_sessions_blocks_alone(harness_cfg, clock,
                                                                                         monkeypatch):
    """Async scheduling enters a prefetch into the prefix cache a step late. Meanwhile A's turn is aborted and C's
    prefetch makes room by releasing 6 of A's 10 prefetched blocks, then takes them for C's own KV. A's late caching
    must cover only the 4 blocks A's pin still holds: C's 6 under A's hashes would serve C's KV to A's next turn."""
    from dataclasses import replace

    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")
    tier = kv_transfer_config((200 * 8208 + 100) / 2**30)  # room to spare: make_room may release into it
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    s.scheduler_config.async_scheduling = True  # the engine's flag (GPU); the harness's steps stay in order
    ha, hc = list(range(100, 260)), list(range(3000, 3160))  # 10 blocks each
    for name, h in (("A", ha), ("C", hc)):
        s.add_request(f.make(h, 4, session_id=name))
        run_until_idle(s)
        clock.advance(1)
    for i in range(4):  # pressure: both pins go to the tier
        s.add_request(f.make([5000 + i] * 330, 4))
    run_until_idle(s)
    s.max_num_scheduled_tokens = 800
    s.add_request(f.make(list(range(20000, 20000 + 49 * BLOCK - 8)), 200, session_id="B"))
    step(s)
    step(s)  # B decodes, holding 49 blocks; a one-token step budget from now on keeps C's request waiting
    s.max_num_scheduled_tokens = 1
    assert free_blocks(s) == 14
    ra = f.make(ha + [4] * 3 + list(range(900, 940)), 4, session_id="A")
    s.add_request(ra)  # prefetched into 10 blocks, not yet cached
    s.finish_requests(ra.request_id, RequestStatus.FINISHED_ABORTED)
    keys = {k.session_id: k for k in s.kvsched.policy.sessions}
    pa = s.kvsched.prefetcher.pending[keys["A"]]
    s.add_request(f.make(hc + [4] * 3 + list(range(900, 940)), 4, session_id="C"))
    pc = s.kvsched.prefetcher.pending[keys["C"]]
    taken = {b.block_id for b in pa.blocks} & {b.block_id for b in pc.blocks}
    assert len(taken) == 6 and s.kvsched.policy.sessions[keys["A"]].pinned_blocks == 4
    pool = s.kv_cache_manager.block_pool
    for _ in range(4):
        step(s)
        hits = [(pool.get_cached_block(h, [0]) or [None])[0] for h in pa.chain[:10]]
        assert not {b.block_id for b in hits if b is not None} & taken
    assert [b is not None for b in hits] == [True] * 4 + [False] * 6  # the blocks A's pin kept are hits
    assert s.kvsched.prefetcher.counters["released_before_cached_blocks"] == 6
