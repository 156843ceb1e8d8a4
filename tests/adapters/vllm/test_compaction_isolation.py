"""Two guarantees of the API-server side that the review's mutation testing found untested: a summary belongs to its
tenant and cache salt (never served to another tenant's session of the same id), and a client that goes away while
its request waits for a summary does not cancel the summary."""

import asyncio
import contextlib

from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run


def test_a_summary_is_served_only_to_its_own_tenant_and_cache_salt():
    app = FakeVllm()
    comp = compactor(app)

    async def scenario():
        await comp.prepare(SCOPE, request(8, cache_salt="A"), {}, tenant="t1")  # summarised in the background
        await asyncio.gather(*comp.tasks.values())
        return [(await comp.prepare(SCOPE, request(9, cache_salt=salt), {}, tenant=tenant)).replaced
                for salt, tenant in (("A", "t2"), ("B", "t1"), (None, "t1"), ("A", None), ("A", "t1"))]

    other_tenant, other_salt, no_salt, no_tenant, same = run(scenario())
    assert (other_tenant, other_salt, no_salt, no_tenant) == (0, 0, 0, 0) and same > 0
    assert app.calls[0][1]["cache_salt"] == "A"


def test_a_client_going_away_while_waiting_never_cancels_the_summary():
    app = FakeVllm("slow")
    comp = compactor(app, wait_for_summary=True)

    async def scenario():
        waiting = asyncio.ensure_future(comp.prepare(SCOPE, request(8), {}))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(app.calls) == 1
        waiting.cancel()  # the client disconnected
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        app.release.set()
        await asyncio.gather(*comp.tasks.values())
        payload = request(9)
        return await comp.prepare(SCOPE, payload, {})

    out = run(scenario())
    assert comp.stats()["summaries"] == 1 and out.replaced > 0 and len(app.calls) == 1
