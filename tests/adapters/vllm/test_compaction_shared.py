"""Summaries in the shared store between replicas (found by review: a save wrote only the replica's own checkpoints,
so two replicas serving one `user:` id erased each other's summaries; and no test checked that a moved session is
served compacted from the store)."""

import asyncio
import threading

from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints
from kvsched.core.shared_state import compaction_key, decode_checkpoints, merge_checkpoints
from tests.adapters.vllm.test_compaction import SCOPE, SYSTEM, FakeVllm, compactor, request, run
from tests.adapters.vllm.test_compaction_refusal import TEMPLATE_ERROR, answer


class MemoryStore:
    """The state half of the shared store's interface, in memory."""

    def __init__(self):
        self.data = {}

    def get_state(self, key):
        return self.data.get(key)

    def put_state(self, key, value, ttl_s):
        self.data[key] = value
        return True

    def delete_state(self, key):
        self.data.pop(key, None)
        return True

    def update_state(self, key, update, ttl_s):
        value = update(self.data.get(key))
        return self.put_state(key, value, ttl_s) if value is not None else self.delete_state(key)


def replica(store):
    comp = compactor(FakeVllm(), wait_for_summary=True)
    comp.shared = SharedCheckpoints(store)
    return comp


async def turn(comp, payload, **kw):
    out = await comp.prepare(SCOPE, payload, {}, **kw)
    await asyncio.gather(*comp.shared._tasks)  # the writes behind the request
    return out


def chat_b(turns, end=False):
    payload = request(0, session="user:alice")
    payload["messages"] = [SYSTEM, *({"role": "user", "content": f"other chat {i} with more words"}
                                     for i in range(turns))]
    if end:
        payload["vllm_xargs"]["session_end"] = 1
    return payload


def rows(store):
    (key,) = store.data
    return decode_checkpoints(store.data[key])


def test_a_moved_session_is_served_compacted_at_once_from_the_store():
    store = MemoryStore()
    a, b = replica(store), replica(store)

    async def scenario():
        assert (await turn(a, request(8))).replaced > 0
        return await turn(b, request(9))

    out = asyncio.run(scenario())
    assert out.replaced > 0 and b.app.calls == [] and b.stats()["shared_checkpoints_loaded"] == 1
    key = next(iter(b.store.sessions))
    assert compaction_key(key) in store.data and b.store.checkpoints(key) == a.store.checkpoints(key)


def test_two_replicas_keep_each_others_summaries_of_one_id():
    store = MemoryStore()
    a, b, c = replica(store), replica(store), replica(store)

    async def scenario():
        assert (await turn(b, chat_b(2))).replaced == 0  # b knows the id before a saves anything
        assert (await turn(a, request(8, session="user:alice"))).replaced > 0
        assert (await turn(b, chat_b(9))).replaced > 0  # b's own summary of chat B: saved beside a's
        assert len(rows(store)) == 2
        served = [await turn(c, request(9, session="user:alice")), await turn(c, chat_b(10))]
        assert [o.replaced > 0 for o in served] == [True, True] and c.app.calls == []  # both from the store
        await turn(b, chat_b(10, end=True))  # B ends on b: its summaries go, A's stay
        assert [cp.root for cp in rows(store)] == [cp.root for cp in a.store.checkpoints(next(iter(a.store.sessions)))]
        refused = await turn(c, request(10, session="user:alice"))
        await answer(refused, 400, TEMPLATE_ERROR)  # A's rewrite refused on c, and its next turn taken as sent:
        await answer(await turn(c, request(11, session="user:alice")), 200, b"{}")  # A's rows leave the store too
        await asyncio.gather(*c.shared._tasks)

    asyncio.run(scenario())
    assert store.data == {}


# ---- against the real store: two replicas saving one id at the same moment --------------------------------------
def redis_replica(url):
    from kvsched.adapters.store.redis_store import RedisStore

    comp = compactor(FakeVllm(), wait_for_summary=True)
    comp.shared = SharedCheckpoints(RedisStore(url))  # a client of its own, as another replica's process has
    return comp


def test_two_replicas_saving_at_the_same_moment_keep_both_rows(redis_server, monkeypatch):
    """Found by review: a save read the store's rows, merged and wrote them back, so two replicas saving one id at the
    same moment could each write what it read before the other's write: one row was lost. Here both replicas read
    before either writes (each thread waits for the other after its first read)."""
    from kvsched.adapters.vllm import compaction_shared

    both_read = threading.Barrier(2, timeout=10)
    waited = set()

    def merge_after_both_read(*args, **kwargs):
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            both_read.wait()
        return merge_checkpoints(*args, **kwargs)

    monkeypatch.setattr(compaction_shared, "merge_checkpoints", merge_after_both_read)
    a, b = redis_replica(redis_server.url), redis_replica(redis_server.url)

    async def scenario():
        out = await asyncio.gather(a.prepare(SCOPE, request(8, session="user:alice"), {}),
                                   b.prepare(SCOPE, chat_b(9), {}))
        await asyncio.gather(*a.shared._tasks, *b.shared._tasks)
        return out

    assert [o.replaced > 0 for o in run(scenario())] == [True, True] and len(waited) == 2
    (key,) = a.store.sessions
    stored = decode_checkpoints(a.shared.store.get_state(compaction_key(key)))
    assert sorted(cp.root for cp in stored) == sorted(cp.root for c in (a, b) for cp in c.store.checkpoints(key))
    assert len(stored) == 2


def test_one_replicas_saves_of_an_id_land_in_the_order_they_were_made(redis_server):
    """Found by review: each save ran in a thread of its own, so a later save (the conversation ended: its rows go)
    could land before an earlier one (its summary), which then wrote the ended conversation's summary back. Here the
    earlier save's store call is slow."""
    a = redis_replica(redis_server.url)
    run(turn(a, request(8)))
    (key,) = a.store.sessions
    store, calls = a.shared.store, []
    update_state = store.update_state

    def slow_first(*args):
        calls.append(args[0])
        if len(calls) == 1:
            threading.Event().wait(0.5)
        return update_state(*args)

    store.update_state = slow_first
    end = request(9)
    end["vllm_xargs"]["session_end"] = 1

    async def scenario():
        a.shared.save(a.store, key)  # e.g. a summary's commit, still being written when the conversation ends
        await turn(a, end)

    run(scenario())
    assert len(calls) == 2 and store.get_state(compaction_key(key)) is None


def test_an_update_of_the_real_store_writes_deletes_and_reads_a_bad_value_as_absent(redis_server):
    from kvsched.adapters.store.redis_store import RedisStore

    store, seen = RedisStore(redis_server.url), []
    assert store.update_state("k", lambda v: seen.append(v) or "one", 60) and store.get_state("k") == "one"
    assert store.update_state("k", lambda v: seen.append(v) or None, 60) and store.get_state("k") is None
    store.client.set("k", b"\xff")
    assert store.update_state("k", lambda v: seen.append(v) or "two", 60) and seen == [None, "one", None]
    assert 0 < store.client.pttl("k") <= 60_000


def test_a_turn_right_after_an_end_waits_for_the_ends_write_and_adopts_nothing():
    """Found by review: a conversation's end drops its rows from the store behind the request; the next request under
    the id, at once, found no local state, loaded the store before the drop landed and adopted the ended
    conversation's summary. A load now waits (briefly) for this server's pending write of the key."""
    store = MemoryStore()
    a = replica(store)
    update_state = store.update_state

    def slow(*args):
        threading.Event().wait(0.3)
        return update_state(*args)

    async def scenario():
        assert (await turn(a, request(8))).replaced > 0
        store.update_state = slow
        end = request(9)
        end["vllm_xargs"]["session_end"] = 1
        await a.prepare(SCOPE, end, {})  # its drop is still being written
        await a.prepare(SCOPE, request(9), {})  # the id again, at once
        await asyncio.gather(*a.shared._tasks)

    asyncio.run(scenario())
    assert a.stats().get("shared_checkpoints_loaded", 0) == 0  # its own new summary is saved, not the old adopted
