"""A moved session's restore from the shared level, on vLLM's real scheduler, KV cache manager and block pool, with the
connector's worker side played by a real `TierLevelsWorker` over real KV tensors and a slow in-memory store (its
MGET blocks until the test opens it). The session's request waits while its fetch runs and every other request is
scheduled; once the fetch has landed the request runs on exactly the published blocks; a garbage block is recomputed,
never served; a session ended, a request aborted or a prefix-cache reset while the fetch runs neither leaks its slots
nor lets the late fetch write a slot another block then holds."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from kvsched.adapters.vllm import tier_blob  # noqa: E402
from kvsched.adapters.vllm.fp8_tier_store import TierStore  # noqa: E402
from kvsched.adapters.vllm.harness import RequestFactory, step  # noqa: E402
from kvsched.adapters.vllm.tier_layout import LayerView  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker  # noqa: E402
from kvsched.adapters.vllm.tier_lookups import StoreLookups  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta  # noqa: E402
from kvsched.core.shared_state import block_key  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402
from tests.adapters.vllm.test_tier_levels_fetch import BOUND_S, SlowStore  # noqa: E402

HISTORY = list(range(100, 260))  # 10 full blocks of a session another replica served


class Engine:
    """kvsched's scheduler plus the connector's worker side on KV tensors shaped like the tiny model's cache."""

    def __init__(self, harness_cfg: Any, clock: Any, tmp_path: Any) -> None:
        from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

        tier = kv_transfer_config(0.01, disk_dir=str(tmp_path / "disk"), disk_gb=0.01)
        self.s = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock)
        conn = self.s.connector
        self.levels, self.directory, self.book = conn.levels, conn.directory, conn.fetches
        g = conn.geometry
        shape = (harness_cfg.num_blocks, g.heads, g.rows, g.content)
        gen = torch.Generator().manual_seed(7)
        self.kv = {name: torch.randn(shape, generator=gen).to(g.dtype) for name in g.layers}
        self.store = SlowStore()
        self.levels.store = self.store  # the scheduler's block lookup (EXISTS) and the worker's MGET: one store
        self.levels.lookups = conn.fetches.lookups = StoreLookups(self.store, clock=clock)
        self.w = TierLevelsWorker(LevelsConfig(), self.levels.identity, {}, 0, 1,
                                  TierStore([LayerView(n, t) for n, t in self.kv.items()], "quantize"))
        self.w.shared = self.store
        self.loaded: dict[int, int] = {}  # pool block -> the slot a load restored it from
        self.written: list[int] = []  # slots this step's stores and fetches wrote

    def add(self, request: Any) -> None:
        """The request arrives and the store's lookup (tier_lookups) answers before the next step."""
        self.s.add_request(request)
        assert self.levels.lookups.flush(BOUND_S)

    def publish(self, keys: list[bytes], source_kv_seed: int = 11) -> list[bytes]:
        """Another replica's frames of `keys` in the store; returns their payloads."""
        gen = torch.Generator().manual_seed(source_kv_seed)
        src_kv = {n: torch.randn(t.shape, generator=gen).to(t.dtype) for n, t in self.kv.items()}
        src = TierStore([LayerView(n, t) for n, t in src_kv.items()], "quantize")
        src.store(list(range(len(keys))), list(range(len(keys))))
        payloads = [src.slot_payload(i) for i in range(len(keys))]
        for k, p in zip(keys, payloads, strict=True):
            self.store.frames[block_key(self.levels.identity, k, 0)] = tier_blob.encode(self.levels.identity, 0, k, p)
        return payloads

    def worker(self, out: Any) -> Any:
        from vllm.v1.outputs import KVConnectorOutput

        meta, failed = out.kv_connector_metadata, []
        self.written = [st.slot for st in meta.stores] + ([f.slot for f in meta.levels.fetches] if meta.levels else [])
        if meta.levels:
            self.w.before_stores(meta.levels)
        if meta.stores:
            self.w.tier.store([st.block_id for st in meta.stores], [st.slot for st in meta.stores])
        if meta.levels:
            self.w.start_fetch(meta.levels)
        for ld in meta.prefetches + meta.loads:
            self.loaded[ld.block_id] = ld.slot
            failed += self.w.tier.load([ld.slot], [ld.block_id])
        report = TierWorkerMeta()
        self.w.fill(report)
        return KVConnectorOutput(invalid_block_ids=set(failed), kv_connector_worker_meta=report)

    def step(self) -> Any:
        return step(self.s, self.worker)[0]


def scheduled(out: Any) -> dict[str, int]:
    """Requests newly scheduled this step -> their prefix-cache hit (tokens)."""
    return {new.req_id: int(new.num_computed_tokens) for new in out.scheduled_new_reqs}


def hit_once_fetched(e: Engine, request: Any) -> int | None:
    """Step once (the request's fetch starts; the request waits), let the fetch thread finish, then step until the
    request is scheduled (the report comes with the next step, the restore in the one after): its cached tokens."""
    hit = scheduled(e.step()).get(request.request_id)
    assert hit is None and e.w.fetcher.flush(BOUND_S)
    for _ in range(5):
        hit = scheduled(e.step()).get(request.request_id, hit)
        if hit is not None:
            break
    return hit


def arrive(e: Engine, f: RequestFactory, session: str, prompt: list[int]) -> tuple[Any, list[bytes]]:
    r = f.make(prompt, 4, session_id=session)
    return r, [bytes(h) for h in r.block_hashes]


def test_the_request_waits_for_its_fetch_while_others_run_then_runs_on_the_fetched_blocks(harness_cfg, clock,
                                                                                          tmp_path) -> None:
    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.add(ra)
    rb = f.make(list(range(3000, 3100)), 4, session_id="other")
    e.add(rb)
    out = e.step()  # plans the fetch; the worker starts it and the step returns with the MGET under way
    assert e.store.reading.wait(BOUND_S) and not e.store.gate.is_set()
    assert ra.request_id not in scheduled(out) and rb.request_id in scheduled(out)  # the other session runs
    for _ in range(3):  # any number of steps: it waits, nothing is restored from the unfilled slots
        assert ra.request_id not in scheduled(e.step())
    assert e.loaded == {} and len(e.book.slots) == 10
    e.store.gate.set()
    assert e.w.fetcher.flush(BOUND_S)
    hit = None
    for _ in range(5):  # the report comes with the next step; the prefetch is planned in the step after it
        hit = scheduled(e.step()).get(ra.request_id, hit)
        if hit is not None:
            break
    assert hit == 10 * BLOCK  # every published block, as prefix-cache hits
    assert e.s.kvsched.stats()["levels_fetch_waits"] == 1 and not e.book.slots
    blocks = e.s.kv_cache_manager.get_blocks(ra.request_id).get_block_ids()[0][:10]
    ref_kv = {n: torch.zeros_like(t) for n, t in e.kv.items()}
    ref = TierStore([LayerView(n, t) for n, t in ref_kv.items()], "quantize")
    for i, (b, p) in enumerate(zip(blocks, payloads, strict=True)):
        assert e.w.tier.slot_payload(e.loaded[b]) == p  # each block came from the slot its own key was fetched into
        ref.fill(i, p)
        assert ref.load([i], [b]) == []
    for n in e.kv:  # the pool holds exactly what a restore of the published blocks writes
        assert torch.equal(e.kv[n][blocks], ref_kv[n][blocks])


def test_a_garbage_block_is_recomputed_never_served(harness_cfg, clock, tmp_path) -> None:
    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    name = block_key(e.levels.identity, keys[4], 0)
    frame = bytearray(e.store.frames[name])
    frame[-1] ^= 0x01  # one bit of block 4's payload
    e.store.frames[name] = bytes(frame)
    e.store.gate.set()
    e.add(ra)
    hit = hit_once_fetched(e, ra)
    assert hit == 4 * BLOCK  # blocks 0-3 restored; block 4 and everything after it computed
    assert keys[4] not in e.directory.slot_of and e.s.kvsched.stats()["shared_tier_read_failures"] == 1
    bad_slot = next(s for k, s in zip(keys, range(10), strict=False) if k == keys[4])  # slots were admitted in order
    assert bad_slot not in e.loaded.values()


@pytest.mark.parametrize("event", ["session ended", "request aborted", "prefix-cache reset"])
def test_an_end_while_the_fetch_runs_leaks_no_slot_and_the_late_fetch_overwrites_no_other_block(
        harness_cfg, clock, tmp_path, event) -> None:
    from vllm.v1.request import RequestStatus

    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.add(ra)
    e.step()
    assert e.store.reading.wait(BOUND_S)
    fetching = set(e.book.slots)
    assert len(fetching) == 10
    if event == "session ended":
        e.s.kvsched.handle("end", "moved")
    elif event == "request aborted":
        e.s.finish_requests(ra.request_id, RequestStatus.FINISHED_ABORTED)
    else:
        assert e.s.reset_prefix_cache() is True
    still = [k for k in keys[:10] if k in e.directory.slot_of]
    assert still == (keys[:10] if event == "request aborted" else [])  # an abort leaves the session's blocks coming
    # every slot of the tier wanted meanwhile (evicting the session's blocks too): none being written is handed out
    taken = e.directory.admit("flood", [i.to_bytes(4, "big") * 8 for i in range(e.directory.num_slots)])
    assert len(taken) == e.directory.num_slots - len(fetching) and not {slot for _, slot in taken} & fetching
    e.step()
    assert not set(e.written) & fetching
    e.store.gate.set()
    assert e.w.fetcher.flush(BOUND_S)
    e.directory.drop_owner("flood")
    for _ in range(3):  # the report lands; the held slots are free again from the next step on
        e.step()
    assert not e.book.slots and not e.directory.inflight
    e.s.kvsched.handle("end", "moved")
    e.step()
    d = e.directory
    assert len(d._free) == d.num_slots and d.used_slots == 0  # every slot back, none lost


def test_past_its_deadline_the_request_runs_without_the_missing_blocks_and_the_late_fetch_serves_the_next_turn(
        harness_cfg, clock, tmp_path) -> None:
    """A stalled store: the request does not wait for good. Once the fetch's deadline passed it is scheduled and vLLM
    computes the blocks; the fetch goes on and lands into the tier, where the session's next turn can find them."""
    from kvsched.adapters.vllm.tier_fetches import WAIT_FLOOR_S

    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    e.book.clock = clock
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.add(ra)
    assert ra.request_id not in scheduled(e.step())
    assert e.store.reading.wait(BOUND_S)
    clock.advance(WAIT_FLOOR_S / 2)
    assert ra.request_id not in scheduled(e.step())  # before the deadline: it waits
    clock.advance(WAIT_FLOOR_S)  # past it (10 blocks of 8 KiB add microseconds at the assumed rate)
    assert scheduled(e.step()).get(ra.request_id) == 0  # scheduled, the whole prompt computed
    stats = e.s.kvsched.stats()
    assert stats["levels_fetch_waits"] == 1 and stats["levels_fetch_overdue"] == 1
    while e.s.has_requests():
        e.step()
    e.store.gate.set()
    assert e.w.fetcher.flush(BOUND_S)
    e.step()  # the late report lands
    assert not e.book.slots
    slots = e.directory.match(keys, 0, 10)  # in the tier now, restorable for the session's next turn
    assert [e.w.tier.slot_payload(slot) for slot in slots] == payloads


def test_fetches_a_worker_cannot_run_land_at_once_unfilled(harness_cfg, clock, tmp_path) -> None:
    """A worker whose tier is off (its KV cache layout refused, say) runs no fetch: it reports them over at once, so
    their slots come back and the request is not held for nothing."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.outputs import KVConnectorOutput

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector

    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    conn = KVSchedFP8TierConnector(e.s.connector.engine_config, KVConnectorRole.WORKER, e.s.kv_cache_config)
    assert conn.store is None  # no KV caches registered

    def worker(out: Any) -> Any:
        conn.handle_preemptions(out.kv_connector_metadata)
        return KVConnectorOutput(kv_connector_worker_meta=conn.build_connector_worker_meta())

    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.add(ra)
    hit = None
    for _ in range(4):
        hit = scheduled(step(e.s, worker)[0]).get(ra.request_id, hit)
        if hit is not None:
            break
    assert hit == 0 and not e.book.slots and not e.directory.inflight and keys[0] not in e.directory.slot_of


def test_a_reset_between_a_requests_arrival_and_the_next_step_leaves_no_slot_held(harness_cfg, clock, tmp_path):
    """Found by review: the arrival plans its fetches (slots held), a prefix-cache reset (an engine utility call,
    handled before the next step) turns the levels off, and the planned fetches were never sent, so never reported:
    their slots stayed held for good. (The store's answer plans the fetches at the start of the next step, and its
    metadata sends them: here the reset comes between the two, as it can for a disk fetch planned at arrival.)"""
    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.store.gate.set()
    e.add(ra)
    e.s.kvsched.before_schedule()
    assert len(e.book.slots) == 10
    assert e.s.reset_prefix_cache() is True
    while e.s.has_requests():
        e.step()
    e.w.fetcher.flush(BOUND_S)
    e.step()
    d = e.directory
    assert not e.book.slots and not d.inflight
    assert len(d._free) + d.used_slots == d.num_slots


def test_a_fill_that_raises_on_the_fetch_thread_is_reported_and_the_request_goes_on(harness_cfg, clock, tmp_path):
    """Found by review: anything the slot's fill raised (a host chunk that cannot be allocated) lost the whole chunk's
    reports: the request waited to its deadline and the chunk's slots stayed held after the session ended."""
    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    calls = {"n": 0}
    real_fill = e.w.tier.fill

    def fill(slot, payload):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("pinned host chunk: out of memory")
        return real_fill(slot, payload)

    e.w.tier.fill = fill
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.store.gate.set()
    e.add(ra)
    assert ra.request_id not in scheduled(e.step())
    assert e.w.fetcher.flush(BOUND_S)
    assert any(ra.request_id in scheduled(e.step()) for _ in range(5))  # no deadline needed (the clock stands still)
    while e.s.has_requests():
        e.step()
    e.s.kvsched.handle("end", "moved")
    for _ in range(3):
        e.step()
    assert not e.book.slots and len(e.directory._free) == e.directory.num_slots


def test_an_arrival_fetches_no_block_past_what_its_prefill_can_hit(harness_cfg, clock, tmp_path):
    """Found by review: the arrival passed the index of the last block a hit may cover as a count past the pool's hit,
    so with a pool hit and a prompt of whole blocks the last block, which vLLM computes anyway, was fetched too."""
    e, f = Engine(harness_cfg, clock, tmp_path), RequestFactory(BLOCK)
    e.store.gate.set()
    e.add(f.make(HISTORY[:2 * BLOCK] + [9] * 5, 4, session_id="warm"))
    while e.s.has_requests():
        e.step()
    ra, keys = arrive(e, f, "moved", HISTORY)  # exactly 10 blocks, the first 2 cached in the pool
    e.publish(keys)
    e.add(ra)
    e.s.kvsched.before_schedule()  # the store's answer: the fetches are planned
    assert sorted(keys.index(x.key) for x in e.book.slots.values()) == list(range(2, 9))
    hit = hit_once_fetched(e, ra)
    assert hit == 9 * BLOCK
