"""The shared level against a store that holds junk or answers with errors, on a real redis-server (found by review,
scripts in /tmp/rev_store): nothing it holds raises into the engine core or fails a request, a failed or dropped
put is published again next turn, error replies are not outages, metadata keys do not collide, and the scheduler
side's tables stay small."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path

import pytest
import redis

from kvsched.adapters.store.redis_store import RedisStore
from kvsched.adapters.vllm import tier_levels
from kvsched.adapters.vllm.tier_levels import LevelOps, TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker
from kvsched.core.sessions import SessionKey
from kvsched.core.shared_state import SessionMeta, compaction_key, session_key
from tests.adapters.vllm.conftest import promote_answered

IDENT = "ab" * 16
KEYS = [bytes([i]) * 32 for i in range(8)]


class Host:
    """A host tier that holds nothing and admits everything."""

    def match(self, chain, start, n):
        return []

    def admit(self, owner, keys):
        return [(k, i) for i, k in enumerate(keys)]

    def hold(self, slots):
        pass


def levels(url: str | None, replica: str = "b") -> TierLevels:
    return TierLevels(LevelsConfig(store_url=url, replica=replica), IDENT, {}, 1024, 1)


# ---- 1: malformed session metadata never reaches the engine as an exception ------------------------------------------
BAD_META = [b"\xff\xfe\x00garbage", b'{"turns":1e999,"replica":"A","blocks":0}',
            b'{"turns":1,"replica":"A","blocks":Infinity}', b"[" * 100_000 + b"]" * 100_000]


@pytest.mark.parametrize("slow", [False, True], ids=["inline", "lookup-thread"])
def test_malformed_session_metadata_is_counted_and_served_as_absent(redis_server, slow: bool) -> None:
    r = redis.Redis.from_url(redis_server.url)
    lv = levels(redis_server.url)
    lv.read_cost.mean_s = 1.0 if slow else 0.0  # where the arrival's reads run (ReadCost)
    for i, raw in enumerate(BAD_META):
        owner = SessionKey(f"s{i}")
        r.set(session_key(IDENT, owner.session_id, None, None), raw)
        assert promote_answered(lv, owner, [KEYS[i]], 0, 1, Host()) == 0  # no exception; nothing in the store to fetch
    owner = SessionKey("s-hash")  # a key another program wrote as a hash: WRONGTYPE, an error reply
    r.hset(session_key(IDENT, "s-hash", None, None), "x", "1")
    # the reads above taught ReadCost their measured time (the 200-kB bracket parse): set the path again, so which
    # one this read takes is the test's choice, not the machine's speed (found failing once in a full run: inline 0)
    lv.read_cost.new_step()
    lv.read_cost.mean_s = 1.0 if slow else 0.0
    assert promote_answered(lv, owner, [KEYS[5]], 0, 1, Host()) == 0
    stats = lv.stats()
    assert stats["store_bad_values"] == len(BAD_META) and stats["moved_sessions"] == 0
    # GET of a hash: WRONGTYPE; the lookup thread's MGET (one for all its lookups) reads it as absent
    assert lv.store.up and stats["store_outages"] == 0 and stats["store_error_replies"] == (0 if slow else 1)


@pytest.mark.parametrize("slow", [False, True], ids=["inline", "lookup-thread"])
def test_a_store_read_that_raises_never_reaches_the_engine(redis_server, monkeypatch, slow: bool) -> None:
    lv = levels(redis_server.url)
    lv.read_cost.mean_s = 1.0 if slow else 0.0

    def boom(*a, **k):
        raise RuntimeError("client bug")

    monkeypatch.setattr(lv.store, "get_state", boom)
    monkeypatch.setattr(lv.store, "get_states", boom)
    monkeypatch.setattr(lv.store, "has_blocks", boom)
    assert promote_answered(lv, SessionKey("s"), KEYS[:3], 0, 3, Host()) == 0
    assert lv.stats()["store_bad_values"] == 2
    # a metadata read that failed is asked again by the session's next request (found by review: the session was
    # marked seen, never read again, and a moved session went uncounted)
    r = redis.Redis.from_url(redis_server.url)
    r.set(session_key(IDENT, "s", None, None), SessionMeta(role=None, ttl_s=None, turns=1, replica="A",
                                                           blocks=1).encode())
    monkeypatch.undo()
    for rid in ("r2", "r3"):  # (off the thread, the answer's second promote may have queued the retry already)
        assert promote_answered(lv, SessionKey("s"), KEYS[:3], 0, 3, Host(), request_id=rid) == 0
    assert lv.stats()["moved_sessions"] == 1


# ---- 2: malformed compaction checkpoints never fail a request --------------------------------------------------------
def test_malformed_checkpoints_leave_the_session_to_local_state(redis_server) -> None:
    from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints
    from kvsched.core.compaction import CompactionStore
    from kvsched.core.compaction_config import CompactionConfig

    r = redis.Redis.from_url(redis_server.url)
    shared = SharedCheckpoints(RedisStore(redis_server.url))
    good = {"digest": "a" * 64, "replaced": 3, "system_count": 1, "summary": "s", "summary_tokens": 4, "root": ""}
    cases = [b"\xff[]", json.dumps([dict(good, replaced=1e999)]).encode(), b"[" * 50_000 + b"]" * 50_000,
             json.dumps([dict(good, summary_tokens=float("inf")), good]).encode()]

    async def main() -> list[int]:
        out = []
        for i, raw in enumerate(cases):
            sess = json.dumps(["tiny", None, None, f"s{i}"])
            r.set(compaction_key(sess), raw)
            out.append(await shared.load_into(CompactionStore(CompactionConfig()), sess))
        return out

    assert asyncio.run(main()) == [0, 0, 0, 1]  # the well-formed row of the last value is adopted
    assert shared.counters["shared_checkpoints_bad"] == 3 and shared.counters["shared_store_bad_values"] == 1


def test_a_failing_shared_load_serves_the_request(monkeypatch) -> None:
    """The request path's guard: whatever the load raises, the request is planned from this server's state."""
    from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints
    from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request

    class Store:
        def get_state(self, key):
            return '[{"digest":"' + "a" * 64 + '","replaced":1e999,"system_count":0,"summary":"x"}]'

    comp = compactor(FakeVllm())
    comp.shared = SharedCheckpoints(Store())
    out = asyncio.run(comp.prepare(SCOPE, request(2), {}))
    assert out.status in (None, 200) and out.error is None
    monkeypatch.setattr(comp.shared, "load_into", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    out = asyncio.run(comp.prepare(SCOPE, request(2, session="wf/2"), {}))
    assert out.error is None and comp.stats()["shared_checkpoint_errors"] == 1


# ---- 5: a put that failed or was dropped is published again next turn ------------------------------------------------
def test_a_failed_or_dropped_shared_put_is_published_again_next_turn(tmp_path: Path, redis_server) -> None:
    from kvsched.adapters.vllm.fp8_tier_store import TierStore
    from tests.adapters.vllm.test_fp8_tier_store import caches, views_of

    lv = levels(redis_server.url, replica="a")
    lv.clock = lambda: 1000.0
    cfg = LevelsConfig(store_url=redis_server.url, replica="a")
    w = TierLevelsWorker(cfg, IDENT, {}, 0, 1, TierStore(views_of(caches()), "quantize"))
    owner = SessionKey("s")

    def turn(n: int) -> LevelOps:
        lv.turn_finished(owner, [(k, i) for i, k in enumerate(KEYS[:n])], None)
        return lv.take_ops()

    ops = turn(3)
    assert [p.shared for p in ops.publishes] == [True] * 3
    w.shared.put_blocks = lambda items, ttl: False  # the store fails the put (down, OOM, a timeout)
    w.before_stores(ops)
    assert w.writer.flush(5.0)
    failures = w.report()[2]
    assert sorted(failures) == sorted((k, getattr(tier_levels, "SHARED_PUT", "shared_put")) for k in KEYS[:3])
    lv.fetch_failed(failures)  # what absorb_worker_meta hands over
    ops = turn(4)
    assert sorted(p.key for p in ops.publishes if p.shared) == sorted(KEYS[:4])  # the holes are refilled
    w.writer.submit = lambda job, nbytes=0: False  # the writer's queue is full: the job is dropped
    w.before_stores(ops)
    lv.fetch_failed(w.report()[2])
    assert sorted(p.key for p in turn(4).publishes if p.shared) == sorted(KEYS[:4])
    assert lv.stats()["shared_tier_put_failures"] == 7
    del w.shared.put_blocks  # a put that lands: not sent again within half its TTL
    del w.writer.submit
    ops = turn(4)
    w.before_stores(ops)
    assert w.writer.flush(5.0)
    lv.fetch_failed(w.report()[2])
    assert not turn(4).publishes


# ---- 6: an error reply fails that call only --------------------------------------------------------------------------
def test_an_oom_reply_fails_the_put_but_is_not_an_outage(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    r.set("present", b"v")
    st = RedisStore(redis_server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # every write is refused with an OOM reply; reads still work
    try:
        for _ in range(3):
            assert st.put_blocks({"kvsched:kv:x": b"y" * 1024}, 60) is False
            assert st.get_state("present") == "v"
    finally:
        r.config_set("maxmemory", "0")
        r.config_set("maxmemory-policy", "volatile-lru")
    assert st.up and st.health.outages == 0 and st.counters["skipped_calls"] == 0
    assert st.stats()["store_error_replies"] == 3
    assert st.put_blocks({"kvsched:kv:x": b"y"}, 60) is True


def test_an_unreachable_store_is_still_an_outage() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    st = RedisStore(f"redis://127.0.0.1:{port}/0")
    assert st.get_state("k") is None and not st.up and st.health.outages == 1
    assert st.get_state("k") is None and st.counters["skipped_calls"] == 1  # backoff: not tried again at once


# ---- 7: metadata keys of inferred sessions and branches ------------------------------------------------------------
class Rec:
    role, ttl_s, turns = "coder", 30.0, 3


def test_inferred_sessions_have_keys_of_their_own(redis_server) -> None:
    """Found by review: each replica's `inferred-1` and a client's session named `inferred-1` shared one key."""
    a, b = levels(redis_server.url, "a"), levels(redis_server.url, "b")
    inferred = SessionKey("inferred-1", inferred=True)  # what each replica's lineage names its first one
    a.turn_finished(inferred, [], Rec())
    assert a.meta_writer is not None and a.meta_writer.flush(5.0)
    assert len({a._session_key(inferred), b._session_key(inferred), b._session_key(SessionKey("inferred-1"))}) == 3
    promote_answered(b, inferred, [KEYS[0]], 0, 1, Host())
    promote_answered(b, SessionKey("inferred-1"), [KEYS[1]], 0, 1, Host())
    assert b.stats()["moved_sessions"] == 0  # none of b's sessions ran on a


def test_a_branch_counts_as_its_session_and_ending_one_keeps_the_ids_metadata(redis_server) -> None:
    """Branch numbers are each engine's own: a session compacted into branch 2 on a arrives as branch 0 on b, and
    must count as moved there (tests/integration/test_tier_levels.py). Ending a branch, or a session whose metadata
    another replica wrote, leaves the id's metadata (found by review: b ending an unrelated branch deleted a's)."""
    a, b = levels(redis_server.url, "a"), levels(redis_server.url, "b")
    a.turn_finished(SessionKey("s", branch=2), [], Rec())
    assert a.meta_writer is not None and a.meta_writer.flush(5.0)
    b.session_ended(SessionKey("s", branch=1))
    b.session_ended(SessionKey("s"))  # b's own main branch of the id: the metadata is a's
    assert b.meta_writer is not None and b.meta_writer.flush(5.0)
    assert a.store.get_state(a._session_key(SessionKey("s"))) is not None
    promote_answered(b, SessionKey("s"), [KEYS[2]], 0, 1, Host())
    assert b.stats()["moved_sessions"] == 1
    a.session_ended(SessionKey("s"))  # the replica that wrote it: gone
    assert a.meta_writer.flush(5.0) and a.store.get_state(a._session_key(SessionKey("s"))) is None


# ---- 8: the scheduler side's tables ---------------------------------------------------------------------------------
def test_an_ended_session_leaves_the_seen_table() -> None:
    lv = levels(None)
    owner = SessionKey("s", None, "tenant")
    lv._first_arrival(owner)
    lv.session_ended(owner)
    assert owner not in lv._seen_sessions


@pytest.mark.parametrize(("cap", "fill", "mib"), [
    ("PUBLISHED_MEMORY", lambda lv, i: lv._remember_published(i.to_bytes(32, "big"), float(i)), 48),
    ("SEEN_SESSIONS_MEMORY", lambda lv, i: lv._first_arrival(SessionKey(f"session-{i:032d}", None, "t" * 24)), 24),
])
def test_the_tables_are_bounded_in_memory(cap: str, fill, mib: int) -> None:
    """Found by review: 1,000,000 entries each, 171 + 252 MiB at their caps."""
    n = getattr(tier_levels, cap)
    lv = levels(None)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n + 10):
            fill(lv, i)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(lv._published) + len(lv._seen_sessions) == n
    assert used < mib * 2**20, f"{cap}={n}: {used / 2**20:.0f} MiB"
