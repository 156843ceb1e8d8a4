"""The shared store's reads at a request's arrival run off vLLM's scheduler thread (tier_lookups): on vLLM's real
scheduler with the connector's worker side (tests/adapters/vllm/test_tier_levels_async.py's Engine), against a store
whose metadata GET and EXISTS block until the test opens them. While they block, `add_request` and every step return,
other sessions' requests run, the session's request waits; once answered it runs on the published blocks and counts as
a moved session once. Past the deadline it runs on what the other levels hold, a late answer plans nothing and holds
no slot; a prefix-cache reset ends the wait. No test waits on a timer: the gates order events, a fake clock the
deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import RequestFactory  # noqa: E402
from kvsched.adapters.vllm.tier_lookups import WAIT_S, Lookup, StoreLookups  # noqa: E402
from kvsched.core.sessions import SessionKey  # noqa: E402
from kvsched.core.shared_state import SessionMeta  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.test_tier_levels_async import HISTORY, Engine, arrive, scheduled  # noqa: E402
from tests.adapters.vllm.test_tier_levels_fetch import BOUND_S, SlowStore  # noqa: E402

HUNG_S = 5.0  # a lookup the test never opens times out then, as a client's socket timeout would (the code before
# the change blocked the scheduler thread that long)


class HungStore(SlowStore):
    """SlowStore whose metadata GET and EXISTS block until `lookup_gate` is set (then raise TimeoutError, as the real
    client would, if it never is); records the threads that asked."""

    def __init__(self, meta: dict[str, str] | None = None) -> None:
        super().__init__()
        self.gate.set()  # the workers' MGETs are not what is tested here
        self.meta = dict(meta or {})
        self.lookup_gate = threading.Event()
        self.asked = threading.Event()
        self.threads: list[str] = []
        self.state_reads = 0

    def _wait(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.asked.set()
        if not self.lookup_gate.wait(HUNG_S):
            raise TimeoutError("the store did not answer")

    def get_state(self, key: str) -> str | None:
        return self.get_states([key])[0]

    def get_states(self, keys: list[str]) -> list[str | None]:
        self._wait()
        self.state_reads += len(keys)
        return [self.meta.get(k) for k in keys]

    def has_blocks(self, names: list[str]) -> list[bool]:
        self._wait()
        return super().has_blocks(names)

    def put_blocks(self, items: Any, ttl_s: float) -> bool:
        return True


def hung_engine(harness_cfg: Any, clock: Any, tmp_path: Any, moved: bool = True,
                slow: bool = True) -> tuple[Engine, RequestFactory]:
    """`slow`: the store's reads are known to be slow (`ReadCost`), so the arrivals' reads go to the lookup thread."""
    e = Engine(harness_cfg, clock, tmp_path)
    if slow:
        e.levels.read_cost.mean_s = 1.0
    store = HungStore()
    if moved:  # another replica served the session's last turn
        key = e.levels._session_key(SessionKey("moved"))
        store.meta[key] = SessionMeta(role=None, ttl_s=None, turns=1, replica="elsewhere", blocks=10).encode()
    e.store = e.levels.store = e.w.shared = store
    e.levels.lookups = e.s.connector.fetches.lookups = StoreLookups(store, clock=clock)
    return e, RequestFactory(BLOCK)


def runs_on(e: Engine, request: Any, payloads: list[bytes], steps: int = 6) -> bool:
    """Step (letting each step's fetches land) until `request` is scheduled: True if it ran on exactly the 10 published
    blocks, restored from the tier."""
    hit = None
    for _ in range(steps):
        hit = scheduled(e.step()).get(request.request_id)
        if hit is not None:
            break
        assert e.w.fetcher.flush(BOUND_S)
    blocks = e.s.kv_cache_manager.get_blocks(request.request_id).get_block_ids()[0][:10] if hit is not None else []
    return hit == 10 * BLOCK and [e.w.tier.slot_payload(e.loaded[b]) for b in blocks] == payloads


def moved_request_waiting(e: Engine, f: RequestFactory) -> tuple[Any, list[bytes]]:
    """The moved session's request arrives, its first 10 blocks in the store; its lookup hangs; a step leaves it
    waiting."""
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.s.add_request(ra)
    assert store_asked(e)
    assert ra.request_id not in scheduled(e.step())
    return ra, keys


def test_a_hung_store_costs_the_scheduler_thread_nothing_and_the_request_runs_on_its_blocks_once_answered(
        harness_cfg, clock, tmp_path) -> None:
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.s.add_request(ra)  # returns with the store's answer outstanding
    assert store_asked(e) and not e.store.lookup_gate.is_set()
    rb = f.make(HISTORY[:BLOCK] + list(range(3000, 3100)), 4, session_id="other")
    e.s.add_request(rb)  # its lookup queues behind ra's
    others = 0
    for _ in range(4):  # any number of steps: ra waits for its answer, nothing is fetched or restored for it
        out = scheduled(e.step())
        assert ra.request_id not in out and rb.request_id not in out
    rc = f.make([5] * (BLOCK - 2), 4, session_id="short")  # no full block before the one vLLM computes: no lookup
    e.s.add_request(rc)
    for _ in range(4):
        others += rc.request_id in scheduled(e.step())
    assert others == 1 and e.loaded == {} and not e.book.slots
    assert threading.current_thread().name not in e.store.threads  # no store call on the scheduler's thread
    e.store.lookup_gate.set()
    assert e.levels.lookups.flush(BOUND_S)
    assert runs_on(e, ra, payloads)  # the answer plans the fetch; it lands; the prefetch restores; the request runs
    stats = e.s.kvsched.stats()
    assert stats["moved_sessions"] == 1 and stats["moved_sessions_restored"] == 1
    assert stats["store_lookup_waits"] == 2 and stats["store_lookup_overdue"] == 0  # ra and rb; rc never waited
    while e.s.has_requests():
        e.step()
    assert not e.book.slots and not e.directory.inflight
    # the session's next request: its metadata is not read again, nor counted again
    reads = e.store.state_reads
    e.s.add_request(f.make(HISTORY + [7] * 20 + [8] * 3, 4, session_id="moved"))
    assert e.levels.lookups.flush(BOUND_S)
    for _ in range(3):
        e.step()
    assert e.store.state_reads == reads and e.s.kvsched.stats()["moved_sessions"] == 1


def test_with_the_store_down_a_request_does_not_wait(harness_cfg, clock, tmp_path) -> None:
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    e.publish(keys[:10])
    e.s.add_request(ra)  # a lookup the store never answers ...
    assert store_asked(e)
    e.store.up = False  # ... and the store goes down: the next session's request is not looked up
    rb = f.make(list(range(3000, 3100)), 4, session_id="fresh")
    e.s.add_request(rb)
    assert rb.request_id in scheduled(e.step())
    assert e.levels.lookups.counters["waits"] == 1 and len(e.store.threads) == 1  # only ra's (its GET)


def test_past_the_deadline_the_request_runs_without_the_store_and_a_late_answer_holds_nothing(
        harness_cfg, clock, tmp_path) -> None:
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra, keys = moved_request_waiting(e, f)
    clock.advance(WAIT_S / 2)
    assert ra.request_id not in scheduled(e.step())  # before the deadline: it waits
    clock.advance(WAIT_S)
    assert scheduled(e.step()).get(ra.request_id) == 0  # past it: scheduled, the prompt computed
    e.store.lookup_gate.set()  # the answer comes late
    assert e.levels.lookups.flush(BOUND_S)
    while e.s.has_requests():
        e.step()
    stats = e.s.kvsched.stats()
    assert stats["store_lookup_overdue"] == 1 and stats["store_lookup_waits"] == 1
    assert stats["moved_sessions"] == 1 and stats["moved_sessions_restored"] == 0  # counted; nothing restored
    d = e.directory
    assert not e.book.slots and not d.inflight and e.loaded == {}
    assert len(d._free) + d.used_slots == d.num_slots and not d.fetching(keys, 0, 10)  # the late answer took none


def test_a_reset_while_a_lookup_is_outstanding_ends_the_wait(harness_cfg, clock, tmp_path) -> None:
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra, keys = moved_request_waiting(e, f)
    assert e.s.reset_prefix_cache() is True  # the levels go off: nothing will take the answer
    assert scheduled(e.step()).get(ra.request_id) == 0  # the clock stands still: no deadline needed
    e.store.lookup_gate.set()
    while e.s.has_requests():
        e.step()
    assert not e.book.slots and not e.directory.inflight


# ---- the lookup book alone ------------------------------------------------------------------------------------------
class GateStore:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.up = True
        self.calls: list[tuple[str, int]] = []

    def get_states(self, keys: list[str]) -> list[str]:
        assert self.gate.wait(BOUND_S)
        self.calls.append(("GET", len(keys)))
        return ["meta"] * len(keys)

    def has_blocks(self, names: list[str]) -> list[bool]:
        assert self.gate.wait(BOUND_S)
        self.calls.append(("EXISTS", len(names)))
        if names == ["boom"]:
            raise ConnectionResetError("reset by peer")
        return [n.endswith("yes") for n in names]


def test_a_fast_store_is_read_at_the_arrival_on_the_scheduler_thread_and_nothing_waits_a_step(
        harness_cfg, clock, tmp_path) -> None:
    """While the store's reads are fast they run inline: the arrival plans the store's fetch itself, the request never
    waits for a lookup, and it runs on its blocks."""
    e, f = hung_engine(harness_cfg, clock, tmp_path, slow=False)
    e.store.lookup_gate.set()  # answers at once
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.s.add_request(ra)
    assert e.levels.counters["shared_planned_fetches"] == 10  # no step has run
    assert e.s.kvsched.stats()["moved_sessions"] == 1
    assert runs_on(e, ra, payloads) and e.s.kvsched.stats()["store_lookup_waits"] == 0
    assert set(e.store.threads) == {threading.current_thread().name}  # the GET and the EXISTS, inline


class SleepyStore(HungStore):
    """Every metadata GET and EXISTS takes `delay_s` (a store across a slow network)."""

    delay_s = 0.05

    def _wait(self) -> None:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay_s)


def test_once_the_stores_reads_are_slow_the_next_reads_run_off_the_scheduler_thread(harness_cfg, clock, tmp_path):
    e = Engine(harness_cfg, clock, tmp_path)
    store = SleepyStore()
    e.store = e.levels.store = e.w.shared = store
    e.levels.lookups = e.s.connector.fetches.lookups = StoreLookups(store, clock=clock)
    key = e.levels._session_key(SessionKey("moved"))  # another replica served the session's last turn
    store.meta[key] = SessionMeta(role=None, ttl_s=None, turns=1, replica="elsewhere", blocks=10).encode()
    f = RequestFactory(BLOCK)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.s.add_request(ra)  # nothing known of the store yet: its GET inline, found slow; the EXISTS on the lookup thread
    me = threading.current_thread().name
    assert store.threads == [me] and not e.levels.read_cost.inline() and e.levels.lookups.waiting(ra.request_id)
    assert e.levels.lookups.flush(BOUND_S) and len(store.threads) == 2 and store.threads[1] != me
    assert runs_on(e, ra, payloads)
    stats = e.s.kvsched.stats()
    assert stats["moved_sessions"] == 1 and stats["moved_sessions_restored"] == 1  # the inline GET's, carried
    rb, _ = arrive(e, f, "second", list(range(4000, 4100)))
    e.s.add_request(rb)  # both reads on the lookup thread; the request waits for the answer
    assert e.levels.lookups.waiting(rb.request_id)
    assert e.levels.lookups.flush(BOUND_S) and len(store.threads) == 4 and me not in store.threads[1:]
    assert scheduled(e.step()).get(rb.request_id) == 0  # the answer, taken before this step, found nothing: it runs


def test_a_request_of_a_session_still_waits_for_its_lookup_after_another_of_the_session_started(
        harness_cfg, clock, tmp_path) -> None:
    """Found by review: a session's request that started dropped every request of the session from those waiting for
    a store answer, and the other request's answer, when it came, was never used: its blocks were computed again."""
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra = f.make([5] * (BLOCK - 2), 4, session_id="moved")  # no full block to look up: only the metadata, no wait
    e.s.add_request(ra)
    assert store_asked(e)
    rb, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.s.add_request(rb)  # its lookup queues behind the metadata's
    assert ra.request_id in scheduled(e.step())
    e.store.lookup_gate.set()
    assert e.levels.lookups.flush(BOUND_S)
    assert runs_on(e, rb, payloads)


def test_lookups_answer_in_order_and_a_full_queue_makes_no_request_wait(clock) -> None:
    store = GateStore()
    book = StoreLookups(store, clock=clock, max_queued=2)
    first = Lookup("r1", "s1", "m1", (b"a", b"b"), ("a/0-yes", "a/1-yes", "b/0-yes", "b/1-no"))
    assert book.submit(first) and book.waiting("r1")
    deadline = time.monotonic() + BOUND_S
    while book._q.qsize() and time.monotonic() < deadline:  # the thread has taken the first: it blocks on the gate
        time.sleep(0.001)
    assert book.submit(Lookup("r2", "s2", None, (b"c",), ("boom",)))
    assert book.submit(Lookup(None, "s3", "m3"))  # metadata only: nobody waits
    assert not book.submit(Lookup("r4", "s4", None, (b"d",), ("d-yes",)))  # full: not made, r4 does not wait
    assert book.counters["dropped"] == 1 and not book.waiting("r4") and not book.must_wait("r4")
    assert book.poll() == [] and book.must_wait("r1") and book.must_wait("r1")
    store.gate.set()
    assert book.flush(BOUND_S)
    answers = book.poll()
    assert [a.lookup.owner for a in answers] == ["s1", "s2", "s3"] and [a.live for a in answers] == [True, True, False]
    assert answers[0].meta == "meta" and answers[0].held() == {b"a": True, b"b": False}  # every rank's frame, or not
    assert answers[1].held() == {} and "ConnectionResetError" in answers[1].errors[0]  # raised: absent, carried
    assert answers[2].meta == "meta" and answers[2].held() == {}
    assert not book.waiting("r1") and book.counters["waits"] == 1 and book.counters["overdue"] == 0
    # the first alone (the thread had taken it); the two queued behind it in one round trip each
    assert store.calls == [("GET", 1), ("EXISTS", 4), ("GET", 1), ("EXISTS", 1)]


def test_lookups_queued_behind_a_slow_one_are_asked_in_one_round_trip_each_answer_its_own() -> None:
    store = GateStore()
    book = StoreLookups(store, max_queued=8)
    assert book.submit(Lookup("r0", "s0", "m0", (b"a",), ("a-yes",)))
    deadline = time.monotonic() + BOUND_S
    while book._q.qsize() and time.monotonic() < deadline:  # the thread holds the first, blocked on the gate
        time.sleep(0.001)
    for i, names in enumerate([("b-yes", "c-no"), ("d-no", "e-yes"), ("f-yes", "g-yes")], start=1):
        assert book.submit(Lookup(f"r{i}", f"s{i}", f"m{i}", (names[0][:1].encode(), names[1][:1].encode()), names))
    store.gate.set()
    assert book.flush(BOUND_S)
    answers = book.poll()
    assert store.calls == [("GET", 1), ("EXISTS", 1), ("GET", 3), ("EXISTS", 6)]
    assert [a.held() for a in answers] == [{b"a": True}, {b"b": True, b"c": False}, {b"d": False, b"e": True},
                                           {b"f": True, b"g": True}]
    assert all(a.meta == "meta" and a.live for a in answers)


def test_a_read_that_fails_for_a_batch_is_one_error_not_one_per_lookup() -> None:
    class Boom(GateStore):
        def get_states(self, keys: list[str]) -> list[str]:
            super().get_states(keys)
            raise ConnectionResetError("reset by peer")

        def has_blocks(self, names: list[str]) -> list[bool]:
            super().has_blocks(names)
            raise ConnectionResetError("reset by peer")

    store = Boom()
    book = StoreLookups(store, max_queued=8)
    assert book.submit(Lookup(None, "s0", "m0"))
    deadline = time.monotonic() + BOUND_S
    while book._q.qsize() and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(1, 4):
        assert book.submit(Lookup(f"r{i}", f"s{i}", f"m{i}", (b"a",), ("a-yes",)))
    store.gate.set()
    assert book.flush(BOUND_S)
    answers = book.poll()
    assert [len(a.errors) for a in answers] == [1, 2, 0, 0]  # the first's GET; the batch's GET and EXISTS
    assert all(a.held() == {} and a.meta is None for a in answers)


def test_an_answer_that_comes_after_the_deadline_while_vllm_never_looked_at_the_request_is_used(
        harness_cfg, clock, tmp_path) -> None:
    """Found by review: with the engine full vLLM never asks about a queued request, so its lookup's deadline passed
    without it waiting a step; the answer then came while it was still queued and was thrown away (it ran on
    nothing the store held)."""
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    busy = f.make([5] * (BLOCK - 2), 200, session_id="short")  # a long decode that fills the engine
    e.s.add_request(busy)
    assert store_asked(e)  # its metadata lookup holds the lookup thread (nobody waits for it)
    assert busy.request_id in scheduled(e.step())
    e.s.max_num_running_reqs = e.s.max_num_active_reqs = 1
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.s.add_request(ra)
    e.step()
    clock.advance(WAIT_S + 0.1)  # the deadline passes; vLLM never looked at ra (the engine is full)
    e.step()
    e.store.lookup_gate.set()  # the answer comes: ra is still queued
    assert e.levels.lookups.flush(BOUND_S)
    e.step()
    e.s.max_num_running_reqs = e.s.max_num_active_reqs = 8
    assert runs_on(e, ra, payloads, steps=8)


def test_a_close_with_the_queue_full_ends_the_lookup_thread() -> None:
    """Found by review: the end marker did not fit, and the thread drained the queue and then waited on it for good."""
    store = GateStore()
    book = StoreLookups(store, max_queued=1)
    assert book.submit(Lookup("r1", "s1", "m1"))
    deadline = time.monotonic() + BOUND_S
    while book._q.qsize() and time.monotonic() < deadline:  # the thread holds the first, blocked on the gate
        time.sleep(0.001)
    assert book.submit(Lookup("r2", "s2", "m2"))  # the queue is full now
    book.close()
    store.gate.set()
    book._thread.join(BOUND_S)
    assert not book._thread.is_alive() and not book.waiting("r1") and not book.submit(Lookup("r3", "s3", "m3"))


def store_asked(e: Engine) -> bool:
    return e.store.asked.wait(BOUND_S)


def test_reads_skipped_while_the_store_is_down_leave_the_average_and_a_read_that_timed_out_moves_it() -> None:
    class Flaky(GateStore):
        def has_blocks(self, names: list[str]) -> list[bool]:
            out = super().has_blocks(names)
            self.up = False  # this call timed out: the guard marks the store down
            return out

    store = Flaky()
    store.gate.set()
    book = StoreLookups(store)
    assert book.submit(Lookup("r1", "s1", None, (b"a",), ("a-yes",)))
    assert book.flush(BOUND_S)
    assert book.poll()[0].seconds is not None  # the store was up when asked: its time counts
    assert book.submit(Lookup("r2", "s2", None, (b"b",), ("b-yes",)))  # down now: the guard would skip it
    assert book.flush(BOUND_S)
    assert book.poll()[0].seconds is None

