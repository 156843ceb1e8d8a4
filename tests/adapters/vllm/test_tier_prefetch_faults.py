"""The FP8 tier's prefetch when a slot fails its checksum, on vLLM's real scheduler (no model, no worker: the test
reports the worker's invalid blocks itself). Found by review: on async scheduling a failed prefetch was cached anyway
(the failure arrives before the prefetch is due), and a failure walked blocks a release had given to another session."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, run_until_idle, step  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def _report(s, out, invalid, connector_output=None):
    """The step's output as a worker whose loads into `invalid` failed their checksum reports it (or as
    `connector_output`, a worker connector's own report, says)."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    sampled = [[] if s.requests[r].is_prefill_chunk else [FAKE_TOKEN] for r in ids]
    s.update_from_output(out, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled,
        kv_connector_output=connector_output or KVConnectorOutput(invalid_block_ids=set(invalid))))


def _demoted(harness_cfg, clock, monkeypatch, names):
    """A scheduler whose sessions `names` (10 blocks each) were pushed into the tier by a flood."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv("KVSCHED_INFER_SESSIONS", "0")
    tier = kv_transfer_config((200 * 8208 + 100) / 2**30)
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    histories = {}
    for i, name in enumerate(names):
        histories[name] = list(range(100 + 1000 * i, 260 + 1000 * i))
        s.add_request(f.make(histories[name], 4, session_id=name))
        run_until_idle(s)
        clock.advance(1)
    for i in range(4):
        s.add_request(f.make([5000 + i] * 330, 4))
    run_until_idle(s)
    return s, f, histories


def test_an_async_prefetch_whose_load_failed_is_not_cached_and_its_turn_recomputes(harness_cfg, clock, monkeypatch):
    s, f, hist = _demoted(harness_cfg, clock, monkeypatch, ["A"])
    s.scheduler_config.async_scheduling = True
    busy = f.make([6000] * 20, 6)  # holds the only running slot: A's next request waits
    s.add_request(busy)
    step(s)
    s.max_num_running_reqs = s.max_num_active_reqs = len(s.running)
    ra = f.make(hist["A"] + [4] * 3 + list(range(900, 940)), 4, session_id="A")
    s.add_request(ra)
    p = s.kvsched.prefetcher.pending[next(k for k in s.kvsched.policy.sessions if k.session_id == "A")]
    out = s.schedule()
    bad = {load.block_id for load in out.kv_connector_metadata.prefetches}
    assert len(bad) == 10
    _report(s, out, bad)  # every prefetched slot failed
    pool = s.kv_cache_manager.block_pool
    for _ in range(20):
        out = s.schedule()
        new = [n for n in out.scheduled_new_reqs if n.req_id == ra.request_id]
        cached = [b for h in p.chain[:10] if (b := (pool.get_cached_block(h, [0]) or [None])[0])]
        assert not {b.block_id for b in cached} & bad  # never a hit on a block whose load failed
        _report(s, out, ())
        if new:
            break
    assert new and not set(new[0].block_ids[0]) & bad
    meta = out.kv_connector_metadata
    assert new[0].num_computed_tokens == 0 or len(meta.loads) > 0  # recomputed or restored again, never the bad KV
    s.max_num_running_reqs = s.max_num_active_reqs = 256
    run_until_idle(s)
    assert s.kvsched.prefetcher.counters["failed_prefetch_blocks"] == 10


def test_a_failure_on_a_released_prefetch_leaves_the_blocks_another_session_took_alone(harness_cfg, clock,
                                                                                       monkeypatch):
    """A's queued turn is prefetched then aborted; C's prefetch makes room by taking 6 of A's blocks and caches its own
    KV in them. A failure on A's first slot evicts A's remaining blocks, never C's."""
    from vllm.v1.request import RequestStatus

    s, f, hist = _demoted(harness_cfg, clock, monkeypatch, ["A", "C"])
    s.max_num_scheduled_tokens = 800
    s.add_request(f.make(list(range(20000, 20000 + 49 * BLOCK - 8)), 200, session_id="B"))
    step(s)
    step(s)
    s.max_num_scheduled_tokens = 1
    ra = f.make(hist["A"] + [4] * 3 + list(range(900, 940)), 4, session_id="A")
    s.add_request(ra)
    s.finish_requests(ra.request_id, RequestStatus.FINISHED_ABORTED)
    keys = {k.session_id: k for k in s.kvsched.policy.sessions}
    pa = s.kvsched.prefetcher.pending[keys["A"]]
    s.add_request(f.make(hist["C"] + [4] * 3 + list(range(900, 940)), 4, session_id="C"))
    pc = s.kvsched.prefetcher.pending[keys["C"]]
    assert len({b.block_id for b in pa.blocks} & {b.block_id for b in pc.blocks}) == 6
    pool = s.kv_cache_manager.block_pool

    def hits(p):
        return sum(1 for h in p.chain[:10] if pool.get_cached_block(h, [0]))

    assert hits(pc) == 10 and hits(pa) == 4
    out = s.schedule()
    _report(s, out, {pa.blocks[0].block_id})
    assert hits(pc) == 10 and hits(pa) == 0


def test_an_async_queued_request_waits_for_its_prefetch_instead_of_restoring_it_twice(harness_cfg, clock,
                                                                                     monkeypatch):
    """Found by review: on async scheduling a queued request admitted before its prefetch entered the prefix cache
    missed the prefetched blocks, restored the same tier slots again into blocks of its own, and its pin held the 10
    prefetched ones, unused, for the whole turn. It now waits the step or two until they are cached, then hits them."""
    s, f, hist = _demoted(harness_cfg, clock, monkeypatch, ["A"])
    s.scheduler_config.async_scheduling = True
    ra = f.make(hist["A"] + [4] * 3 + list(range(900, 940)), 40, session_id="A")
    s.add_request(ra)
    p = s.kvsched.prefetcher.pending[next(k for k in s.kvsched.policy.sessions if k.session_id == "A")]
    prefetched = {b.block_id for b in p.blocks}
    loads = 0
    steps = 0
    for _ in range(5):
        out, _ = step(s)
        steps += 1
        meta = out.kv_connector_metadata
        loads += len(meta.loads) if meta is not None else 0
        new = [n for n in out.scheduled_new_reqs if n.req_id == ra.request_id]
        if new:
            break
    assert new and 2 <= steps <= 3  # held a step or two, never longer
    assert loads == 0 and new[0].num_computed_tokens >= 10 * BLOCK  # the prefetched blocks, as prefix-cache hits
    assert prefetched <= set(s.kv_cache_manager.get_block_ids(ra.request_id)[0])
    run_until_idle(s)
    assert s.kvsched.prefetcher.counters["useful_blocks"] == 10


@pytest.mark.parametrize("then", ["abort", "finish"])
def test_blocks_whose_restore_failed_leave_the_prefix_cache_when_their_request_goes_before_recomputing(
        harness_cfg, clock, monkeypatch, then):
    """Found by review: vLLM's `recompute` policy keeps a block whose load failed (and those its forward computed from
    it) in the prefix cache, counting on the rolled-back request to recompute it. Aborted first, the next request with
    the same prefix hit the garbage (and the aborted turn's pin held it for the session's own next turn)."""
    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm import compat

    s, f, hist = _demoted(harness_cfg, clock, monkeypatch, ["A"])
    ra = f.make(hist["A"] + [4] * 3 + list(range(900, 940)), 4, session_id="A")
    s.add_request(ra)  # restored from the tier as it is scheduled
    out = s.schedule()
    meta = out.kv_connector_metadata
    bad = {load.block_id for load in meta.prefetches + meta.loads}
    assert len(bad) == 10 and s.requests[ra.request_id].num_computed_tokens >= 160
    _report(s, out, bad)  # every restored slot failed its checksum
    assert s.requests[ra.request_id].num_computed_tokens == 0  # rolled back to recompute
    if then == "abort":
        s.finish_requests(ra.request_id, RequestStatus.FINISHED_ABORTED)
    cached = {b.block_id for b in compat.cached_prefix(s, ra.block_hashes, 10)}
    assert not cached & bad
    rb = f.make(hist["A"] + [1, 2, 3], 4)  # anyone sending the same prefix
    s.add_request(rb)
    out = s.schedule()
    new = next(n for n in out.scheduled_new_reqs if n.req_id == rb.request_id)
    assert not set(new.block_ids[0][:new.num_computed_tokens // BLOCK]) & bad
    fresh = new.block_ids[0][:10]  # where rb computes A's prefix again
    _report(s, out, ())
    run_until_idle(s)
    if then == "abort":  # A's next turn hits what rb computed, not the garbage its aborted turn would have pinned
        rc = f.make(hist["A"] + [4] * 3 + list(range(900, 960)), 4, session_id="A")
        s.add_request(rc)
        out = s.schedule()
        new = next(n for n in out.scheduled_new_reqs if n.req_id == rc.request_id)
        assert new.num_computed_tokens >= 10 * BLOCK and new.block_ids[0][:10] == fresh
        _report(s, out, ())
    run_until_idle(s)


@pytest.mark.parametrize("how", ["load", "prefetch", "queued"])
def test_a_worker_that_turned_its_tier_off_reports_every_load_it_is_sent_as_failed(harness_cfg, clock, monkeypatch,
                                                                                   how):
    """Found by review: a worker whose KV caches the tier cannot hold (here: not on a CPU or CUDA device) turns its tier
    off at register_kv_caches, and the scheduler learns it from that worker's first step output; until then (with
    async scheduling, a step or two) it plans restores, which the worker skipped without reporting them, so vLLM took
    the blocks as restored: stale KV. Each block is now reported as failed, and vLLM recomputes it. (The loads are
    planned by a scheduler whose sessions were demoted beforehand: the worker is driven directly.)"""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.outputs import KVConnectorOutput

    from kvsched.adapters.vllm import compat
    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector

    s, f, hist = _demoted(harness_cfg, clock, monkeypatch, ["A"])
    if how == "queued":  # behind a request holding the only running slot: A's blocks are prefetched while it waits
        s.add_request(f.make([6000] * 20, 6))
        step(s)
        s.max_num_running_reqs = s.max_num_active_reqs = len(s.running)
    w = KVSchedFP8TierConnector(s.connector.engine_config, KVConnectorRole.WORKER, s.kv_cache_config)
    g = w.geometry
    w.register_kv_caches({name: torch.empty((s.connector.num_blocks, g.heads, g.rows, g.content), dtype=g.dtype,
                                            device="meta") for name in g.layers})
    assert w.store is None and w._worker_meta.disabled

    def worker(out):  # the worker's side of a step, as vLLM's model runner calls it
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.handle_preemptions(out.kv_connector_metadata)
        w.start_load_kv(None)
        w.clear_connector_metadata()
        return KVConnectorOutput(invalid_block_ids=w.get_block_ids_with_load_errors(),
                                 kv_connector_worker_meta=w.build_connector_worker_meta())

    assert s.connector.enabled  # the scheduler has not heard of the worker yet (no load was sent to it)
    # A's next turn is prefetched as it arrives; a request of no session restores A's prefix as vLLM admits it
    ra = f.make(hist["A"] + [4] * 3 + list(range(900, 940)), 4, session_id=None if how == "load" else "A")
    s.add_request(ra)
    out = s.schedule()
    meta = out.kv_connector_metadata
    planned = {load.block_id for load in meta.prefetches + meta.loads}
    assert len(planned) == 10 and len(meta.loads if how == "load" else meta.prefetches) == 10
    report = worker(out)
    assert report.invalid_block_ids == planned
    _report(s, out, (), report)
    assert not s.connector.enabled  # its output said so
    s.max_num_running_reqs = s.max_num_active_reqs = 256
    first = s.requests[ra.request_id].num_computed_tokens if how != "queued" else None  # after the rollback
    while s.has_requests():
        out, _ = step(s, worker)
        first = next((n.num_computed_tokens for n in out.scheduled_new_reqs if n.req_id == ra.request_id), first)
    assert first == 0  # nothing of A's prefix taken as restored: computed again (and no load sent any more)
    assert not {b.block_id for b in compat.cached_prefix(s, ra.block_hashes, 10)} & planned
